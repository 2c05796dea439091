"""The in-process simulator: it is the swarm without the network (same bodies, allclose)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModel

from coldfusion_p2p.apps.simulate import Simulation
from coldfusion_p2p.cli import main
from coldfusion_p2p.config import build_config
from coldfusion_p2p.contributor.checkpoints import load_body_state
from coldfusion_p2p.contributor.model import body_state_names

from conftest import FAST_SWARM_SETTINGS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def peer_settings(dataset, model, seed: int, **overrides) -> dict:
    return {**FAST_SWARM_SETTINGS, "dataset": str(dataset), "model": str(model), "seed": seed, **overrides}


RULES = {
    "plain mean": {},
    "ties with the outer optimizer and anchor": {
        "aggregation": "ties",
        "ties_density": 0.3,
        "outer_lr": 0.8,
        "outer_momentum": 0.5,
        "anchor": 0.1,
    },
}


@pytest.mark.swarm
@pytest.mark.parametrize("rule", list(RULES))
def test_the_simulator_fuses_the_same_body_as_a_real_swarm(rule, local_swarm, tiny_model_dir, tiny_datasets, tmp_path):
    """Same seeds and settings: every swarm peer's fused body of round 2 equals the simulator's."""
    shared = {"rounds": 2, "min_group_size": 3, "keep_checkpoints": 5, "refit_steps": 20, "local_steps": 4}
    # the comparison needs every round fused by all three: roomier chunk timeouts than the fault tests'
    shared.update(next_chunk_timeout=10.0, allreduce_timeout=40.0, **RULES[rule])
    peers = [
        local_swarm.start_peer(f"peer{index}", dataset, tiny_model_dir, seed=index, **shared)
        for index, dataset in enumerate(tiny_datasets)
    ]
    torch.set_num_threads(1)  # as the peers (torch_threads 1): the same float reductions
    simulation = Simulation(
        [
            (f"peer{index}", build_config(peer_settings(dataset, tiny_model_dir, index, **shared)))
            for index, dataset in enumerate(tiny_datasets)
        ],
        tmp_path / "simulation",
    )
    for round_number in (1, 2):
        simulation.run_round(round_number)
    local_swarm.wait_all()

    names = body_state_names(simulation.learners[0].model)
    simulated = dict(zip(names, simulation.base, strict=True))
    start = dict(zip(names, simulation.original, strict=True))
    moved = max(float((simulated[name] - start[name]).abs().max()) for name in names)
    assert moved > 1e-3, "the simulated base did not move: the comparison would be vacuous"
    for peer in peers:
        for round_number in (1, 2):  # a round that did not fuse everywhere is not what the simulator models
            report = peer.round_info(round_number)["report"]
            assert report["outcome"] == "fused" and report["group_size"] == 3, (round_number, report)
        fused = load_body_state(peer.output_dir / "rounds" / "round_00002")
        assert set(fused) == set(simulated)
        close = torch.cat([torch.isclose(fused[name], simulated[name], atol=2e-5).reshape(-1) for name in names])
        if RULES[rule].get("aggregation") == "ties":
            # TIES' trim and sign election are discontinuous: the members' copies of the last base agree
            # only up to float rounding, which flips a handful of near-tie values (7 of 21536 seen)
            assert float(close.float().mean()) >= 0.999, (peer.name, float(close.float().mean()))
        else:
            assert bool(close.all()), (peer.name, int((~close).sum()))
    # the re-fitted heads agree too: the simulated contributor's next round would start like the peer's
    simulated_accuracy = {row.peer: row.accuracy_after for row in simulation.rows if row.round == 2}
    for peer in peers:
        assert peer.round_info(2)["report"]["accuracy_after"] == pytest.approx(simulated_accuracy[peer.name], abs=0.02)


def write_peer_config(path, dataset, seed: int) -> None:
    path.write_text(f'dataset = "{dataset}"\nseed = {seed}\nlocal_steps = 3\nbatch_size = 8\nmax_length = 16\n')


def test_simulate_command_writes_bases_and_rounds(tmp_path, tiny_model_dir, tiny_datasets):
    configs = []
    for index, dataset in enumerate(tiny_datasets[:2]):
        write_peer_config(tmp_path / f"p{index}.toml", dataset, index)
        configs.append(str(tmp_path / f"p{index}.toml"))
    output = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--contributors",
            *configs,
            "--rounds",
            "2",
            "--save-every",
            "1",
            "--peer-settings",
            f"model={tiny_model_dir}",
            "lr=3e-3",
            "outer_lr=0.8",
            "outer_momentum=0.5",
            "--output-dir",
            str(output),
        ]
    )
    assert code == 0
    assert (output / "round_00001").is_dir() and (output / "latest").resolve() == (output / "round_00002").resolve()
    AutoModel.from_pretrained(output / "latest")  # a Hugging Face folder
    assert (output / "latest" / "fusion_state.safetensors").is_file()  # momentum travels with the base
    metadata = json.loads((output / "latest" / "metadata.json").read_text())
    assert metadata["rule"] == "outer_lr=0.8,momentum=0.5,anchor=0" and metadata["contributors"] == ["p0", "p1"]
    with open(output / "rounds.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["peer"], row["round"]) for row in rows] == [("p0", "1"), ("p1", "1"), ("p0", "2"), ("p1", "2")]
    assert all(0.0 < float(row["majority_rate"]) <= 1.0 for row in rows)
    assert (output / "rounds.png").stat().st_size > 1000


def test_simulate_rejects_a_malformed_peer_setting_and_mixed_rules(tmp_path, tiny_model_dir, tiny_datasets, capsys):
    assert main(["simulate", "--peer-settings", "lr:2e-4", "--output-dir", str(tmp_path / "x")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    write_peer_config(tmp_path / "a.toml", tiny_datasets[0], 0)
    (tmp_path / "b.toml").write_text(f'dataset = "{tiny_datasets[1]}"\nouter_lr = 0.5\nmodel = "{tiny_model_dir}"\n')
    arguments = ["simulate", "--contributors", str(tmp_path / "a.toml"), str(tmp_path / "b.toml")]
    assert main([*arguments, "--peer-settings", f"model={tiny_model_dir}", "--output-dir", str(tmp_path / "y")]) == 2
    assert "different fusion rules" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
