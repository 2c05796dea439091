"""Soak: three peers run 20 rounds while a seeded schedule stops and kills them at random moments."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import psutil
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from coldfusion_p2p.checkpoints import latest_checkpoint, load_body_state

from conftest import PROCESS_TIMEOUT, LocalSwarm, PeerProcess

pytestmark = pytest.mark.swarm

ROUNDS = 20
RESTARTS = 4
SOAK_BUDGET = 200.0  # seconds for the whole swarm; the test fails rather than hangs beyond it


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


def test_twenty_rounds_with_random_restarts(local_swarm: LocalSwarm, tiny_model_dir, tiny_datasets):
    rng = random.Random(20261126)
    ports = [free_port() for _ in tiny_datasets]
    settings = dict(rounds=ROUNDS, min_group_size=2, fusion_window=8.0, keep_checkpoints=3, record_period=0.5)
    settings.update(quiet=False, log_format="json")  # a log to read if a peer ever hangs

    def start(index: int, resume: bool) -> PeerProcess:
        return local_swarm.start_peer(
            f"peer{index}",
            tiny_datasets[index],
            tiny_model_dir,
            seed=index,
            host_maddrs=[f"/ip4/127.0.0.1/tcp/{ports[index]}"],
            resume=resume,
            **settings,
        )

    started = time.monotonic()
    current = [start(index, resume=False) for index in range(len(tiny_datasets))]
    seen: list[psutil.Process] = []  # every process of every peer incarnation, checked at the end
    restarts: list[str] = []
    while len(restarts) < RESTARTS and time.monotonic() - started < SOAK_BUDGET / 2:
        time.sleep(rng.uniform(2.0, 8.0))  # a random moment: training, waiting, all-reducing or saving
        index = rng.randrange(len(current))
        victim = current[index]
        if victim.process.poll() is not None:
            continue
        seen += process_tree(victim)
        signum = (signal.SIGKILL, signal.SIGTERM)[len(restarts) % 2]  # both kinds, at random moments
        if signum == signal.SIGTERM:
            victim.send_signal(signal.SIGTERM)
            assert victim.wait(timeout=60) == 0, victim.log()
        else:  # the machine dies: the peer and its children (averager, DHT, p2pd) at once
            os.killpg(victim.process.pid, signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        restarts.append(f"{victim.name}:{signal.Signals(signum).name}@{time.monotonic() - started:.0f}s")
        current[index] = start(index, resume=True)

    deadline = started + SOAK_BUDGET
    for peer in current:
        seen += process_tree(peer)
        code = peer.wait(timeout=max(1.0, min(PROCESS_TIMEOUT, deadline - time.monotonic())))
        assert code == 0, f"{peer.name} exited with {code}:\n{peer.log()}"
    elapsed = time.monotonic() - started

    for peer in current:
        checkpoint = latest_checkpoint(peer.output_dir)
        assert checkpoint is not None and checkpoint.round == ROUNDS, (peer.name, checkpoint)
        for round_number in peer.rounds_written():
            folder = peer.output_dir / "rounds" / f"round_{round_number:05d}"
            body = load_body_state(folder)
            assert all(torch.isfinite(tensor).all() for tensor in body.values()), (peer.name, round_number)
            AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        assert not list((peer.output_dir / "rounds").glob(".tmp-*")), "a temporary checkpoint folder was left"

    psutil.wait_procs(seen, timeout=15)  # helpers (p2pd, torch_shm_manager) may take a moment to go
    leaked = still_running(seen)
    assert not leaked, f"processes outlived their peer: {leaked}"
    assert all(port_is_free(port) for port in ports), "a listening port outlived its peer"
    print(f"soak: {ROUNDS} rounds, restarts {restarts}, {elapsed:.0f}s")
