"""The per-test reaper in conftest.py finds what a test leaked, re-parented or not, and only that."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import TEST_SESSION, TEST_SESSION_ENV, peer_environment, session_processes, wait_until


def test_the_reaper_finds_a_re_parented_grandchild_by_the_session_marker():
    began = time.time()
    # the shell starts a sleeper in the background and exits at once: the sleeper is re-parented
    # (to init or a subreaper), as a p2pd whose peer was SIGKILLed alone would be
    shell = subprocess.run(
        ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
        env=peer_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    orphan = int(shell.stdout.strip())
    try:
        assert peer_environment()[TEST_SESSION_ENV] == TEST_SESSION
        assert _parent(orphan) != os.getpid(), "the sleeper was not re-parented"
        found = session_processes(began)
        assert orphan in found and "sleep 300" in found[orphan], found
        assert not session_processes(time.time() + 5.0), "only processes started since the given time count"
    finally:
        os.kill(orphan, signal.SIGKILL)
    wait_until(lambda: orphan not in session_processes(began), timeout=10, message="the killed sleeper to go")


def test_the_reaper_ignores_processes_without_this_sessions_marker():
    began = time.time()
    environment = {**peer_environment(), TEST_SESSION_ENV: "another-pytest-run"}
    shell = subprocess.run(
        ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    stranger = int(shell.stdout.strip())
    try:
        assert stranger not in session_processes(began), "another run's process must never be reaped"
    finally:
        os.kill(stranger, signal.SIGKILL)


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
