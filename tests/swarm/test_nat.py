"""Volunteers behind home NAT, on the network lab (tests/netlab.py): real peer processes in network
namespaces, a bootstrap and a public peer on the "internet" bridge, homes behind masquerading
routers that drop every new inbound connection.

Without client mode this topology never fused in a group of 3: each home peer's dial to the
other's private address timed out, so either one was left out or the group lost a reducer.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
import torch
from netlab import NetLab, lab_unavailable_reason

from coldfusion_p2p.contributor.checkpoints import load_body_state
from coldfusion_p2p.swarm.faults import STALL_IN_ALLREDUCE_ENV

from conftest import (
    LabSwarm,
    cli_output,
    peer_command,
    peer_environment,
    pre_fusion,
    round_dir,
    swarm_diagnosis,
    wait_until,
)

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
        except BaseException:
            print(swarm_diagnosis(swarm.peers))  # shown with the failure: the peers' rounds and log tails
            raise
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
        peers = swarm.start_peers(
            hosts,
            tiny_datasets,
            tiny_model_dir,
            rounds=2,
            min_group_size=3,
            local_steps=800,  # round 2 trains long enough for the monitor to look
            **NAT_SETTINGS,
        )
        joined = lambda: all("reachability: " in peer.log() for peer in peers)  # noqa: E731
        wait_until(joined, timeout=150, message="all three to join")
        snapshot = {"peers": []}
        for _ in range(6):  # while they train (bounded): until the monitor has seen all three records
            snapshot = monitor_snapshot(swarm)
            if len(snapshot["peers"]) == 3 or any(peer.process.poll() is not None for peer in peers):
                break
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


def test_a_late_joiner_behind_an_outbound_only_firewall_downloads_the_fused_base_then_fuses(
    tmp_path, tiny_model_dir, tiny_datasets
):
    """The late joiner's router masquerades and lets only outbound TCP out (no UDP, no ICMP)."""
    with lab_swarm(tmp_path, "late", homes=("home1",), strict_homes=("strict",)) as swarm:
        swarm.start_bootstrap()
        # min_group_size 3: until the late joiner is there, each window stays open (25 s), so the early
        # two cannot finish every round before it has started (4 x 25 s to do so), however slow the machine
        settings = dict(rounds=5, min_group_size=3, local_steps=20, **{**NAT_SETTINGS, "fusion_window": 25.0})
        early = swarm.start_peers(("public", "home1"), tiny_datasets, tiny_model_dir, **settings)
        wait_until(lambda: all(1 in peer.rounds_written() for peer in early), timeout=150, message="round 1")
        late = swarm.start_peer("strict", "strict", tiny_datasets[2], tiny_model_dir, seed=2, **settings)
        for peer in (*early, late):
            assert peer.wait() == 0, peer.log()

        assert mode_line(late).startswith("reachability: client (")
        rounds = late.rounds_written()
        first = late.round_info(rounds[0])["report"]
        assert first["outcome"] == "synced", first  # downloaded from the public peer: nobody else serves
        assert first["peer_ids"] == sorted(early_id(peer, rounds[0]) for peer in early), first
        swarm_body = load_body_state(round_dir(early[0], rounds[0]))
        downloaded = load_body_state(round_dir(late, rounds[0]))
        assert all(torch.allclose(downloaded[name], swarm_body[name], atol=1e-6) for name in swarm_body)
        fused = [r for r in rounds[1:] if late.round_info(r)["report"]["outcome"] == "fused"]
        assert fused, [(r, late.round_info(r)["report"]["outcome"]) for r in rounds]
        assert_fused_exact_mean([*early, late], fused[0], group_size=3)


def early_id(peer, round_number: int) -> str:
    return peer.round_info(round_number)["peer_id"]


def router_bytes(swarm: LabSwarm, home: str) -> int:
    """Bytes the home's router has forwarded so far (both ways): its interfaces' rx counters."""
    namespace = swarm.lab.routers[home].namespace
    script = "import glob; print(sum(int(open(p).read()) for p in glob.glob('/sys/class/net/*/statistics/rx_bytes')))"
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "python3", "-c", script],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return int(done.stdout)


def test_a_link_cut_mid_all_reduce_leaves_no_partial_average_and_the_peer_rejoins(
    tmp_path, tiny_model_dir, tiny_datasets
):
    with lab_swarm(tmp_path, "cut") as swarm:
        swarm.start_bootstrap()
        # enough rounds and steps that the others are still at work when the link is back
        settings = dict(rounds=8, min_group_size=2, local_steps=300, allreduce_timeout=15.0, **NAT_SETTINGS)
        hosts = ("public", "home1", "home2")
        marker = tmp_path / "home1-in-allreduce"
        peers = []
        for i, host in enumerate(hosts):
            # home1's first all-reduce pauses (test-only fault) once under way
            stall = {STALL_IN_ALLREDUCE_ENV: str(marker)} if host == "home1" else None
            peers.append(swarm.start_peer(host, host, tiny_datasets[i], tiny_model_dir, stall, seed=i, **settings))
        public, cut_peer = peers[0], peers[1]
        wait_until(marker.exists, timeout=200, message="home1's first all-reduce")
        cut_round = max(cut_peer.rounds_written(), default=0) + 1
        swarm.lab.cut("home1")  # while home1 holds part of the average and has confirmed nothing
        time.sleep(25.0)  # past the all-reduce timeout (15 s): the others finish without home1 or roll back
        swarm.lab.repair("home1")
        for peer in peers:
            assert peer.wait(timeout=300) == 0, peer.log()

        reports = {peer.name: peer.round_info(cut_round)["report"] for peer in peers}
        outcomes = {name: report["outcome"] for name, report in reports.items()}
        assert outcomes["home1"] != "fused", outcomes  # it never heard the others confirm
        trained = {peer.name: pre_fusion(peer, cut_round, "body") for peer in peers}
        for peer in peers:  # each holds a whole average of a real group, or exactly its own body
            body = load_body_state(round_dir(peer, cut_round))
            report = reports[peer.name]
            if report["outcome"] == "fused":
                members = [p.name for p in peers if early_id(p, cut_round) in report["peer_ids"]]
                expected = {n: torch.stack([trained[m][n] for m in members]).mean(0) for n in body}
            elif report["outcome"] == "synced":
                expected = load_body_state(round_dir(public, cut_round))
            else:
                expected = trained[peer.name]
            assert all(torch.allclose(body[n], expected[n], atol=1e-6) for n in body), (peer.name, report)
        assert outcomes["public"] == outcomes["home2"] or "fused" not in outcomes.values(), outcomes

        # after the repair it is back: a later round fused in a group of all three
        later = [r for r in cut_peer.rounds_written() if r > cut_round]
        rejoined = [r for r in later if cut_peer.round_info(r)["report"]["outcome"] == "fused"]
        assert rejoined, [(r, cut_peer.round_info(r)["report"]["outcome"]) for r in later]
        assert cut_peer.round_info(rejoined[0])["report"]["group_size"] == 3


def test_a_swarm_with_no_public_peer_gets_a_one_line_error_naming_the_fix(tmp_path, tiny_model_dir, tiny_datasets):
    with lab_swarm(tmp_path, "nopublic") as swarm:
        swarm.start_bootstrap()
        peers = swarm.start_peers(
            ("home1", "home2"), tiny_datasets, tiny_model_dir, rounds=2, **{**NAT_SETTINGS, "fusion_window": 12.0}
        )  # the error comes when the first window closes with no public peer seen: 12 s, not 30, of a slow suite
        for peer in peers:
            assert peer.wait() == 2, peer.log()
            last = peer.log().strip().splitlines()[-1]
            assert last.startswith("error: no peer of this swarm accepts inbound connections"), last
            assert "run at least one peer on a public address" in last and "Traceback" not in peer.log()
            assert not peer.rounds_written()  # nothing half-done was checkpointed


def test_a_peer_behind_nat_asks_a_relay_bootstrap_for_a_slot_and_fuses_as_a_client_meanwhile(
    tmp_path, tiny_model_dir, tiny_datasets
):
    """``--relay`` on the bootstrap and ``--use-relay auto`` on the peer: the probe reports the relay,
    the peer asks it for a slot, and does not wait for one to start: libp2p's autorelay reserves it
    only minutes later (the extended test below sees it). Meanwhile it fuses as a client and says so."""
    with lab_swarm(tmp_path, "relay", homes=("home1",)) as swarm:
        bootstrap = swarm.start_bootstrap(relay=True)
        settings = dict(rounds=2, min_group_size=2, **NAT_SETTINGS)
        peers = swarm.start_peers(("public", "home1"), tiny_datasets, tiny_model_dir, **settings)
        for peer in peers:
            assert peer.wait() == 0, peer.log()
        assert "serving libp2p circuit relays" in bootstrap.log()
        line = mode_line(peers[1])
        assert line.startswith("reachability: client (") and "through the bootstrap's relay" in line, line
        assert "asked for a relay slot, which libp2p reserves after about 3 minutes" in line, line
        for round_number in (1, 2):
            assert_fused_exact_mean(peers, round_number, group_size=2)


@pytest.mark.extended
def test_a_relay_reserves_a_nated_peer_a_slot_and_its_record_turns_relayed_while_it_fuses(
    tmp_path, tiny_model_dir, tiny_datasets
):
    """The whole relay path, 4-5 min: a slot comes after libp2p autorelay's boot delay (181 s after
    joining, measured on the lab). The peer then says ``reachability: relayed`` with its
    ``/p2p-circuit`` address through a public node (autorelay picks the bootstrap or the public peer:
    both serve relays), the monitor's mode column shows it, and it goes on fusing."""
    with lab_swarm(tmp_path, "relayed", homes=("home1",)) as swarm:
        swarm.start_bootstrap(relay=True)
        settings = dict(rounds=1000, min_group_size=2, **NAT_SETTINGS)
        peers = swarm.start_peers(("public", "home1"), tiny_datasets, tiny_model_dir, **settings)
        relayed = lambda: "reachability: relayed (" in peers[1].log()  # noqa: E731
        wait_until(relayed, timeout=330, interval=1.0, message="a relay slot for the NATed peer")
        line = next(line for line in peers[1].log().splitlines() if line.startswith("reachability: relayed ("))
        bootstrap_id = swarm.initial_peers[0].rsplit("/p2p/", 1)[1]
        public_id = peers[0].round_info(max(peers[0].rounds_written()))["peer_id"]  # the newest: never pruned
        nated_id = peers[1].round_info(max(peers[1].rounds_written()))["peer_id"]
        relay = re.search(r"/p2p/(\w+)/p2p-circuit/p2p/(\w+)", line)
        assert relay is not None and relay.group(2) == nated_id, line
        assert relay.group(1) in {bootstrap_id, public_id}, (line, bootstrap_id, public_id)
        for _ in range(6):  # bounded: until the monitor has seen both records since the change
            modes = {row["dataset_name"]: row["reachability"] for row in monitor_snapshot(swarm)["peers"]}
            if sorted(modes.values()) == ["public", "relayed"]:
                break
        assert sorted(modes.values()) == ["public", "relayed"], modes
        since = max(peers[1].rounds_written())
        after = lambda: all(since + 1 in peer.rounds_written() for peer in peers)  # noqa: E731
        wait_until(after, timeout=120, message="a round after the change")
        assert_fused_exact_mean(peers, since + 1, group_size=2)


def test_invited_peers_behind_nat_fuse_in_a_moderated_run(tmp_path, tiny_model_dir, tiny_datasets):
    """Invites are checked on the averager's RPCs, which client peers call and never serve, and on
    the DHT, which they only ask: a moderated run must still take their bodies."""

    with lab_swarm(tmp_path, "moderated", homes=("home1",)) as swarm:
        owner_key = str(tmp_path / "owner.key")
        owner_public = cli_output("identity", "--identity", owner_key).splitlines()[1].split(":", 1)[1].strip()
        moderated = {}
        for name in ("bootstrap", "public", "home1"):
            key, token = str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.invite")
            cli_output("identity", "--identity", key)
            invite = ("--owner-key", owner_key, "--public-key", key, "--run-id", swarm.run_id, "--output", token)
            cli_output("invite", *invite)
            moderated[name] = dict(identity=key, invite=token, require_invite=True, owner_public_key=owner_public)
        swarm.start_bootstrap(**moderated["bootstrap"])
        peers = [
            swarm.start_peer(
                host,
                host,
                tiny_datasets[i],
                tiny_model_dir,
                seed=i,
                rounds=2,
                min_group_size=2,
                **NAT_SETTINGS,
                **moderated[host],
            )
            for i, host in enumerate(("public", "home1"))
        ]
        for peer in peers:
            assert peer.wait() == 0, peer.log()
        assert mode_line(peers[1]).startswith("reachability: client (")
        for round_number in (1, 2):
            assert_fused_exact_mean(peers, round_number, group_size=2)
