"""Soak: three peers run 20 rounds while a seeded schedule stops and kills them at random moments."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import time

import psutil
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from coldfusion_p2p.contributor.checkpoints import latest_checkpoint, load_body_state, read_history

from conftest import PROCESS_TIMEOUT, LocalSwarm, PeerProcess

pytestmark = pytest.mark.swarm

ROUNDS = 20
RESTARTS = 4
SOAK_BUDGET = 200.0  # seconds for the whole swarm; the test fails rather than hangs beyond it
MIN_FUSED_ROUNDS = 6  # per peer, of ROUNDS (13-18 seen): restarts cost each peer a few rounds, never most


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_tree(peer: PeerProcess) -> list[psutil.Process]:
    try:
        root = psutil.Process(peer.process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def still_running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def log_events(peer: PeerProcess) -> list[dict]:
    """The JSON events of the peer's log (``--log-format json``); other lines (warnings) are skipped."""
    events = []
    for line in peer.log().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


def started_up(peer: PeerProcess, resumed_round: int | None) -> bool:
    """True once the peer logged that it resumed from round ``resumed_round`` (or joined, without one)."""
    events = log_events(peer)
    resumed = [e["message"] for e in events if e["event"] == "info" and e["message"].startswith("resumed from")]
    if resumed_round is None:
        assert not resumed, (peer.name, resumed)
        return any(event["event"] == "joined" for event in events)
    if resumed:
        assert resumed[0].endswith(f"(round {resumed_round})"), (peer.name, resumed, resumed_round)
    return bool(resumed)


def assert_checkpoints_complete(peers: list[PeerProcess]) -> None:
    """Every peer reached the last round, and every round it kept loads, finite, with no temporary left."""
    for peer in peers:
        checkpoint = latest_checkpoint(peer.output_dir)
        assert checkpoint is not None and checkpoint.round == ROUNDS, (peer.name, checkpoint)
        for round_number in peer.rounds_written():
            folder = peer.output_dir / "rounds" / f"round_{round_number:05d}"
            body = load_body_state(folder)
            assert all(torch.isfinite(tensor).all() for tensor in body.values()), (peer.name, round_number)
            AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        assert not list((peer.output_dir / "rounds").glob(".tmp-*")), "a temporary checkpoint folder was left"


def assert_rounds_fused(peers: list[PeerProcess]) -> dict[str, list[int]]:
    """The rounds really fused, in groups: a swarm whose peers all stayed alone must not pass."""
    fused_rounds = {}
    for peer in peers:
        history = read_history(peer.output_dir)
        fused = sorted({entry["round"] for entry in history if entry["outcome"] == "fused"})
        fused_rounds[peer.name] = fused
        assert len(fused) >= MIN_FUSED_ROUNDS, (peer.name, [(e["round"], e["outcome"]) for e in history])
        assert all(
            entry["group_size"] >= 2 and len(entry["peer_ids"]) == entry["group_size"]
            for entry in history
            if entry["outcome"] == "fused"
        ), peer.name
    return fused_rounds


@pytest.mark.extended  # 60-80 s on 2 cores: the suite's 25 minutes no longer had room for it
def test_twenty_rounds_with_random_restarts(local_swarm: LocalSwarm, tiny_model_dir, tiny_datasets):
    rng = random.Random(20261126)
    ports = [free_port() for _ in tiny_datasets]
    settings = dict(rounds=ROUNDS, min_group_size=2, fusion_window=8.0, keep_checkpoints=3, record_period=0.5)
    settings.update(quiet=False, log_format="json")  # a log to read if a peer ever hangs

    incarnations = [0] * len(tiny_datasets)

    def start(index: int, resume: bool) -> PeerProcess:
        incarnations[index] += 1  # its own log file; the same output folder
        return local_swarm.start_peer(
            f"peer{index}" if incarnations[index] == 1 else f"peer{index}.{incarnations[index]}",
            tiny_datasets[index],
            tiny_model_dir,
            seed=index,
            host_maddrs=[f"/ip4/127.0.0.1/tcp/{ports[index]}"],
            output_dir=str(local_swarm.workdir / f"peer{index}"),
            resume=resume,
            **settings,
        )

    started = time.monotonic()
    current = [start(index, resume=False) for index in range(len(tiny_datasets))]
    seen: list[psutil.Process] = []  # every process of every peer incarnation, checked at the end
    restarts: list[str] = []
    resuming: dict[str, int | None] = {}  # restarted incarnation -> the round it must resume from
    confirmed: set[str] = set()  # ... once its log shows it did

    def may_be_stopped(peer: PeerProcess) -> bool:
        """Running, and (a restarted one) past resuming: each restart is checked before the next stop."""
        if peer.process.poll() is not None:
            return False
        if peer.name in resuming and peer.name not in confirmed and started_up(peer, resuming[peer.name]):
            confirmed.add(peer.name)
        if peer.name not in resuming:
            return True
        # a restarted one must also have fused again: stopped twice in a row, one peer missed 13 of 20 rounds
        return peer.name in confirmed and '"outcome": "fused"' in peer.log()

    while len(restarts) < RESTARTS and time.monotonic() - started < SOAK_BUDGET / 2:
        time.sleep(rng.uniform(2.0, 8.0))  # a random moment: training, waiting, all-reducing or saving
        candidates = [index for index, peer in enumerate(current) if may_be_stopped(peer)]
        if not candidates:
            continue
        fewest = min(incarnations[index] for index in candidates)  # spread the restarts over the peers
        index = rng.choice([index for index in candidates if incarnations[index] == fewest])
        victim = current[index]
        seen += process_tree(victim)
        signum = (signal.SIGKILL, signal.SIGTERM)[len(restarts) % 2]  # both kinds, at random moments
        if signum == signal.SIGTERM:
            victim.send_signal(signal.SIGTERM)
            assert victim.wait(timeout=60) == 0, victim.log()
        else:  # the machine dies: the peer and its children (averager, DHT, p2pd) at once
            os.killpg(victim.process.pid, signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        checkpoint = latest_checkpoint(victim.output_dir)  # what the restarted peer must resume from
        resumed_round = None if checkpoint is None else checkpoint.round
        restarts.append(f"{victim.name}:{signal.Signals(signum).name}@{time.monotonic() - started:.0f}s")
        current[index] = start(index, resume=True)
        resuming[current[index].name] = resumed_round
    assert len(restarts) == RESTARTS, f"only {restarts} of {RESTARTS} restarts happened (peers finished first?)"

    deadline = started + SOAK_BUDGET
    for peer in current:
        seen += process_tree(peer)
        code = peer.wait(timeout=max(1.0, min(PROCESS_TIMEOUT, deadline - time.monotonic())))
        assert code == 0, f"{peer.name} exited with {code}:\n{peer.log()}"
    elapsed = time.monotonic() - started
    # every restart really happened: the new process resumed from the checkpoint its predecessor left
    for peer in current:
        if peer.name in resuming and peer.name not in confirmed:
            assert started_up(peer, resuming[peer.name]), f"{peer.name} did not resume:\n{peer.log()}"
            confirmed.add(peer.name)
    assert confirmed == set(resuming), (confirmed, resuming)

    assert_checkpoints_complete(current)
    fused_rounds = assert_rounds_fused(current)

    psutil.wait_procs(seen, timeout=15)  # helpers (p2pd, torch_shm_manager) may take a moment to go
    leaked = still_running(seen)
    assert not leaked, f"processes outlived their peer: {leaked}"
    assert all(port_is_free(port) for port in ports), "a listening port outlived its peer"
    print(f"soak: {ROUNDS} rounds, restarts {restarts}, {elapsed:.0f}s, resumed from {resuming}")
    print(f"soak: fused rounds {fused_rounds}")
