"""Volunteers behind home NAT, on the network lab (tests/netlab.py): real peer processes in network
namespaces, a bootstrap and a public peer on the "internet" bridge, homes behind masquerading
routers that drop every new inbound connection.

Without client mode this topology never fused in a group of 3: each home peer's dial to the
other's private address timed out, so either one was left out or the group lost a reducer.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

import pytest
import torch
from netlab import NetLab, lab_unavailable_reason

from coldfusion_p2p.contributor.checkpoints import load_body_state

from conftest import LabSwarm, peer_command, peer_environment, pre_fusion, round_dir, wait_until

_REASON = lab_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"network lab unavailable: {_REASON}", allow_module_level=True)

pytestmark = pytest.mark.swarm

# a wide window closed early once everyone is ready: a slow start on a loaded machine only waits
NAT_SETTINGS = dict(save_local_body=True, keep_checkpoints=10, refit_steps=0, fusion_window=90.0, quiet=False)


@contextlib.contextmanager
def lab_swarm(tmp_path, run_id: str, **lab_options) -> Iterator[LabSwarm]:
    with NetLab(**lab_options) as lab:
        swarm = LabSwarm(lab, tmp_path, run_id=f"nat.{run_id}")
        try:
            yield swarm
        finally:
            swarm.close()


def assert_fused_exact_mean(peers, round_number: int, group_size: int) -> None:
    """Every peer fused ``round_number`` in one group, into the exact mean of their trained bodies."""
    reports = [peer.round_info(round_number)["report"] for peer in peers]
    assert [report["outcome"] for report in reports] == ["fused"] * len(peers), [
        (report["outcome"], report["reason"]) for report in reports
    ]
    assert {report["group_size"] for report in reports} == {group_size}, reports
    trained = [pre_fusion(peer, round_number, "body") for peer in peers]
    for peer in peers:
        fused = load_body_state(round_dir(peer, round_number))
        for name in trained[0]:
            mean = torch.stack([body[name] for body in trained]).mean(0)
            assert torch.allclose(fused[name], mean, atol=1e-6), (peer.name, round_number, name)


def mode_line(peer) -> str:
    return next(line for line in peer.log().splitlines() if line.startswith("reachability: "))


def monitor_snapshot(swarm: LabSwarm) -> dict:
    """``coldfusion-peer monitor --once --json``, run on the bootstrap's host."""
    result = subprocess.run(
        swarm.lab.hosts["bootstrap"].command(
            peer_command(
                "monitor",
                "--once",
                "--json",
                "--settle",
                "3",
                "--run-id",
                swarm.run_id,
                "--host-maddrs",
                f"/ip4/{swarm.lab.hosts['bootstrap'].address}/tcp/0",
                "--initial-peers",
                *swarm.initial_peers,
            )
        ),
        capture_output=True,
        text=True,
        env=peer_environment(),
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_two_peers_behind_nat_and_a_public_peer_fuse_the_exact_mean_in_groups_of_three(
    tmp_path, tiny_model_dir, tiny_datasets
):
    with lab_swarm(tmp_path, "three") as swarm:
        swarm.start_bootstrap()
        hosts = ("public", "home1", "home2")
        peers = [
            swarm.start_peer(
                host,
                host,
                tiny_datasets[i],
                tiny_model_dir,
                seed=i,
                rounds=2,
                min_group_size=3,
                local_steps=1500,  # round 2 trains long enough for the monitor to look
                **NAT_SETTINGS,
            )
            for i, host in enumerate(hosts)
        ]
        wait_until(lambda: all(1 in peer.rounds_written() for peer in peers), timeout=150, message="round 1")
        snapshot = monitor_snapshot(swarm)  # while round 2 trains
        for peer in peers:
            assert peer.wait() == 0, peer.log()

        assert mode_line(peers[0]).startswith("reachability: public (bootstrap ")
        for home in peers[1:]:
            line = mode_line(home)
            assert line.startswith("reachability: client (") and "could not connect back to 192.168." in line, line
        modes = {row["dataset_name"]: row["reachability"] for row in snapshot["peers"]}
        assert sorted(modes.values()) == ["client", "client", "public"], snapshot
        for round_number in (1, 2):
            assert_fused_exact_mean(peers, round_number, group_size=3)
