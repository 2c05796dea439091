"""Peers of every kind fuse like any others, to the exact mean of their fp32 bodies: on a device in
mixed precision, or training LoRA adapters that they merge into their body before fusing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from coldfusion_p2p.contributor.checkpoints import load_body_state
from coldfusion_p2p.contributor.presets import MPNET_FOLDER, models_dir

from conftest import pre_fusion, round_dir

NO_GPU = "no CUDA GPU on this machine: the GPU path (--device cuda, both peers on one GPU) was not run"


@pytest.mark.swarm
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))],
)
def test_two_bf16_peers_fuse_the_exact_mean_of_their_bodies(local_swarm, tiny_model_dir, tiny_datasets, device):
    settings = dict(rounds=1, min_group_size=2, save_local_body=True, device=device, precision="bf16", quiet=False)
    peers = [local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)]
    local_swarm.wait_all()
    bodies = [pre_fusion(peer, 1, "body") for peer in peers]
    assert not torch.equal(*(next(iter(body.values())) for body in bodies)), "the peers trained alike"
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 2, report
        assert (report["device_copy_seconds"] > 0) == (device == "cuda"), report
        fused = load_body_state(round_dir(peer, 1))
        for name, tensor in fused.items():
            assert tensor.dtype == torch.float32, name
            assert torch.allclose(tensor, (bodies[0][name] + bodies[1][name]) / 2, atol=1e-6), (peer.name, name)
    assert f"trains on {'cuda:0' if device == 'cuda' else 'cpu'} in bf16" in peers[0].log()


@pytest.mark.swarm
def test_a_lora_peer_and_a_full_peer_fuse_the_exact_mean_of_their_merged_bodies(
    local_swarm, tiny_model_dir, tiny_datasets
):
    common = dict(rounds=2, min_group_size=2, save_local_body=True)
    lora = local_swarm.start_peer("lora", tiny_datasets[0], tiny_model_dir, seed=0, lora_rank=2, **common)
    full = local_swarm.start_peer("full", tiny_datasets[1], tiny_model_dir, seed=1, **common)
    local_swarm.wait_all()
    original = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    merged = pre_fusion(lora, 1, "body")  # what the LoRA peer sent: its body with round 1's adapters merged
    moved = {name for name, tensor in merged.items() if not torch.equal(tensor, original[name])}
    assert moved and all(name.endswith(("query.weight", "value.weight")) for name in moved), moved
    for round_number in (1, 2):
        bodies = [pre_fusion(peer, round_number, "body") for peer in (lora, full)]
        for peer in (lora, full):
            report = peer.round_info(round_number)["report"]
            assert report["outcome"] == "fused" and report["group_size"] == 2, report
            fused = load_body_state(round_dir(peer, round_number))
            for name, tensor in fused.items():
                mean = (bodies[0][name] + bodies[1][name]) / 2
                assert torch.allclose(tensor, mean, atol=1e-6), (peer.name, round_number, name)


MPNET_MISSING = "all-mpnet-base-v2 not installed (opt-in: bash scripts/setup.sh --mpnet)"


@pytest.mark.swarm
@pytest.mark.timeout(900)
@pytest.mark.skipif(not (models_dir() / MPNET_FOLDER / "config.json").is_file(), reason=MPNET_MISSING)
def test_two_peers_fuse_on_mpnet(local_swarm, tiny_datasets):
    """The larger preset (109M) in a real 2-peer swarm: a LoRA peer and a full one, the exact mean."""
    common = dict(rounds=1, min_group_size=2, save_local_body=True, local_steps=2, batch_size=8, refit_steps=20)
    common.update(allreduce_timeout=300.0, next_chunk_timeout=60.0)  # 436 MB a peer on 2 busy cores
    peers = [
        local_swarm.start_peer("full", tiny_datasets[0], "mpnet", seed=0, **common),
        local_swarm.start_peer("lora", tiny_datasets[1], "mpnet", seed=1, lora_rank=4, **common),
    ]
    local_swarm.wait_all(timeout=800)
    bodies = [pre_fusion(peer, 1, "body") for peer in peers]
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 2, report
        fused = load_body_state(round_dir(peer, 1))
        assert sum(tensor.numel() for tensor in fused.values()) > 100_000_000
        for name, tensor in fused.items():
            assert torch.allclose(tensor, (bodies[0][name] + bodies[1][name]) / 2, atol=1e-6), (peer.name, name)
    print("mpnet:", {peer.name: peer.round_info(1)["report"]["fusion_seconds"] for peer in peers}, "fusion s")
