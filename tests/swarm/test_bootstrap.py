"""The bootstrap node: stable identity, archive of fused bases, redundancy, clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat

import pytest
import torch

from coldfusion_p2p.cli import main
from coldfusion_p2p.contributor.checkpoints import load_body_state

from conftest import REPO_ROOT, assert_model_card, assert_one_line_error, round_dir, wait_until

pytestmark = pytest.mark.swarm


def test_restart_with_the_same_identity_keeps_the_peer_id(tmp_path, local_swarm, tiny_model_dir, tiny_dataset):
    identity = tmp_path / "keys" / "bootstrap.key"
    first = local_swarm.start_bootstrap("boot-a", identity=str(identity))
    first.wait_ready()
    assert stat.S_IMODE(identity.stat().st_mode) & 0o077 == 0, "the private key must be readable by its owner only"
    peer_id = first.peer_id
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0, first.log()

    second = local_swarm.start_bootstrap("boot-b", identity=str(identity))
    initial_peers = second.wait_ready()
    assert second.peer_id == peer_id
    peer = local_swarm.start_peer(
        "peer", tiny_dataset, tiny_model_dir, rounds=1, min_group_size=1, initial_peers=initial_peers
    )
    assert peer.wait(timeout=120) == 0, peer.log()
    second.send_signal(signal.SIGINT)
    assert second.wait(timeout=30) == 0, second.log()
    assert "Traceback" not in second.log()


PUBLIC_NAMES = ["public-name-0", "public-name-1"]


def test_archive_holds_each_fused_round_with_its_contributors(tmp_path, local_swarm, tiny_model_dir, tiny_datasets):
    archive = tmp_path / "archive"
    boot = local_swarm.start_bootstrap(
        "boot",
        archive_dir=str(archive),
        base_model=str(tiny_model_dir),
        poll_period=0.2,
        push_to_hub="nobody/coldfusion-archive",  # unreachable here: a warning, never a crash
    )
    initial_peers = boot.wait_ready()
    peers = [
        local_swarm.start_peer(
            f"peer{i}",
            tiny_datasets[i],
            tiny_model_dir,
            rounds=2,
            seed=i,
            keep_checkpoints=5,
            dataset_name=f"public-name-{i}",
            dataset_license="cc-by-4.0",
            initial_peers=initial_peers,
        )
        for i in (0, 1)
    ]
    local_swarm.wait_all()  # leaving peers wait until the archive holds their last round
    assert sorted(path.name for path in archive.glob("round_*")) == ["round_00001", "round_00002"]
    for round_number in (1, 2):
        folder = archive / f"round_{round_number:05d}"
        metadata = json.loads((folder / "metadata.json").read_text())
        assert metadata["round"] == round_number and metadata["group_size"] == 2
        assert {c["dataset_name"] for c in metadata["contributors"]} == {"public-name-0", "public-name-1"}
        assert_model_card(folder, round_number, PUBLIC_NAMES, "cc-by-4.0")
        archived = load_body_state(folder)
        for peer in peers:
            assert peer.round_info(round_number)["report"]["outcome"] == "fused"
            fused = load_body_state(peer.output_dir / "rounds" / f"round_{round_number:05d}")
            assert_model_card(round_dir(peer, round_number), round_number, PUBLIC_NAMES, "cc-by-4.0")
            assert all(torch.allclose(archived[name], fused[name], atol=1e-6) for name in fused)
    assert (archive / "latest").resolve().name == "round_00002"
    boot.send_signal(signal.SIGTERM)
    assert boot.wait(timeout=30) == 0, boot.log()
    assert "could not push round 2 to the Hub repo nobody/coldfusion-archive" in boot.log()


def test_swarm_keeps_fusing_when_one_of_two_bootstraps_dies(tmp_path, local_swarm, tiny_model_dir, tiny_datasets):
    first = local_swarm.start_bootstrap("boot-1")
    first_peers = first.wait_ready()
    second = local_swarm.start_bootstrap("boot-2", initial_peers=first_peers)
    both = first_peers + second.wait_ready()
    peers = [
        local_swarm.start_peer(
            f"peer{i}",
            tiny_datasets[i],
            tiny_model_dir,
            rounds=4,
            seed=i,
            local_steps=20,
            keep_checkpoints=10,
            initial_peers=both,
        )
        for i in (0, 1)
    ]
    wait_until(lambda: all(1 in peer.rounds_written() for peer in peers), timeout=120, message="round 1")
    first.kill()
    local_swarm.wait_all()
    killed_after = 1
    later = [peer.round_info(r)["report"] for peer in peers for r in range(killed_after + 2, 5)]
    assert later and all(report["outcome"] == "fused" and report["group_size"] == 2 for report in later), later


def run_bootstrap(capsys, *flags) -> tuple[int, str]:
    code = main(["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *flags])
    return code, capsys.readouterr().err


def test_malformed_multiaddr(capsys):
    assert_one_line_error(*run_bootstrap(capsys, "--announce-maddrs", "/ip4/300.1.1.1/tcp/1"), "malformed multiaddr")


def test_port_already_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["bootstrap", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"])
        assert_one_line_error(code, capsys.readouterr().err, f"port {port}", "already in use")


def test_corrupt_or_unreadable_identity(capsys, tmp_path):
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(os.urandom(40))
    assert_one_line_error(*run_bootstrap(capsys, "--identity", str(corrupt)), "corrupt", "backup")
    truncated = tmp_path / "truncated.key"
    from hivemind.p2p.p2p_daemon import P2P

    P2P.generate_identity(str(tmp_path / "good.key"))
    truncated.write_bytes((tmp_path / "good.key").read_bytes()[:100])
    assert_one_line_error(*run_bootstrap(capsys, "--identity", str(truncated)), "corrupt")
    folder = tmp_path / "a-folder.key"
    folder.mkdir()
    assert_one_line_error(*run_bootstrap(capsys, "--identity", str(folder)), "unreadable")


def test_archive_dir_not_writable(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(
        *run_bootstrap(capsys, "--archive-dir", str(blocker / "archive")), "not a writable", "--archive-dir"
    )


def test_the_shipped_example_config_is_valid():

    from coldfusion_p2p.config import BootstrapConfig, build_config, read_config_file

    example = REPO_ROOT / "bootstrap" / "bootstrap.toml"
    config = build_config(read_config_file(example), config_type=BootstrapConfig)
    assert config.bootstrap.archive_dir and config.bootstrap.keep == 50
    assert config.network.host_maddrs == ["/ip4/0.0.0.0/tcp/31337"]
