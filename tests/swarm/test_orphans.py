"""A node's forked children (hivemind's DHT and averager processes, p2pd) die with it, even SIGKILLed.

Issue 13: an OOM-killed peer left its DHT and averager children serving in the swarm, with SIGINT
and SIGTERM blocked (inherited from the start-up signal deferral). See coldfusion_p2p/swarm/process_safety.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import wait_until

DEATH_TIMEOUT = 20.0  # seconds every descendant gets to go once the main process is SIGKILLed
TERM_BIT = 1 << (signal.SIGTERM - 1)
INT_BIT = 1 << (signal.SIGINT - 1)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in ticks) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``, from the ppid links in /proc."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                children.setdefault(stat[1], []).append(int(entry.name))
                started[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = started[pid]
            todo.extend(children.get(pid, []))
    return found


def alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == started  # not a reused pid


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for {pid}")


def assert_all_die(tree: dict[int, int], timeout: float = DEATH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(pid, started) for pid, started in tree.items()):
            return
        time.sleep(0.2)
    survivors = {pid: command_line(pid)[:120] for pid, started in tree.items() if alive(pid, started)}
    for pid in survivors:  # the reaper would fail the test too; do not leave them serving meanwhile
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"{len(survivors)} descendant(s) outlived the SIGKILLed parent by {timeout}s: {survivors}")


FORKING_PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, sys, time
    from coldfusion_p2p.swarm.process_safety import install
    install()
    signal.signal(signal.SIGTERM, lambda *_: None)  # like the CLI's stop handler, inherited by the child
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # as signals_deferred does
    def serve():
        print(os.getpid(), flush=True)  # after the fork hooks ran
        time.sleep(600)
    child = mp.get_context("fork").Process(target=serve, daemon=True)
    child.start()
    time.sleep(600)
    """
)


def test_a_forked_child_unblocks_sigterm_ignores_it_while_the_parent_lives_and_dies_with_it():
    parent = subprocess.Popen([sys.executable, "-c", FORKING_PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        started = _stat(child)[2]
        assert not blocked_signals(child) & (TERM_BIT | INT_BIT), "the child inherited blocked SIGTERM/SIGINT"
        os.kill(child, signal.SIGTERM)  # its parent lives: the parent shuts it down, not a stray SIGTERM
        time.sleep(1.0)
        assert alive(child, started)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert_all_die({child: started}, timeout=10.0)
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if child and alive(child, started):
            os.kill(child, signal.SIGKILL)


@pytest.mark.swarm
def test_sigkilled_peer_leaves_no_orphans(local_swarm, tiny_model_dir, tiny_dataset):
    peer = local_swarm.start_peer("doomed", tiny_dataset, tiny_model_dir, rounds=50, local_steps=200)
    main = peer.process.pid
    seen: dict[int, str] = {}

    def hivemind_processes() -> list[int]:
        """The DHT and averager processes (forks: the peer's own command line) and p2pd."""
        peer_command = command_line(main)  # read each time: right after Popen, the child has not exec'd yet
        return [pid for pid in seen if seen[pid] == peer_command or "p2pd" in seen[pid]]

    def children_running() -> bool:
        if peer.process.poll() is not None:
            raise AssertionError(f"the peer exited with {peer.process.returncode}:\n{peer.log()}")
        seen.clear()
        seen.update({pid: command_line(pid) for pid in descendants(main)})
        found = hivemind_processes()
        return len(found) >= 3 and any("p2pd" in seen[pid] for pid in found)

    try:
        wait_until(children_running, timeout=120, message="the peer's DHT and averager processes and p2pd")
    except AssertionError as error:
        raise AssertionError(f"{error}; descendants: {seen}\n{peer.log()[-3000:]}") from None
    time.sleep(1.0)  # let the averager finish starting
    children_running()
    tree = descendants(main)
    for pid in hivemind_processes():
        assert not blocked_signals(pid) & (TERM_BIT | INT_BIT), f"{pid} ({seen[pid][:100]}) has SIGTERM/SIGINT blocked"

    os.kill(main, signal.SIGKILL)  # as the OOM killer does: only the main process, no clean-up at all
    assert peer.process.wait(timeout=10) == -signal.SIGKILL
    assert_all_die(tree)
