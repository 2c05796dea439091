"""Bytes on the wire: a network namespace of the benchmark's own, and its loopback counters.

The fusion benchmark runs its peers (their DHT, averager and p2pd processes, which inherit the
namespace) inside a fresh network namespace whose only interface is ``lo``. Every byte any of
them sends to another goes through that ``lo`` and nothing else does, so the difference of its
``tx_bytes`` counter around a round is exactly what the swarm put on the wire in that window:
TCP/IP headers, libp2p (noise, yamux) framing, protobuf, matchmaking, DHT stores and ACKs
included. The control channel between a peer and its own p2pd is a unix socket: not counted.

Needs root (``ip netns add``). Always used as a context manager, so the namespace and any
process still in it are removed also when a benchmark fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000


def _ip(*arguments: str, timeout: float = 10.0) -> str:
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


class NetNamespace:
    """``with NetNamespace("name") as ns:`` creates it with ``lo`` up; workers call :meth:`enter`."""

    def __init__(self, name: str):
        self.name = name
        self.path = Path("/run/netns") / name

    def __enter__(self) -> NetNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def enter(self) -> None:
        """Move the calling process (before it opens any socket or starts a child) into the namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns({self.path}): {os.strerror(error)}")
        finally:
            os.close(fd)

    def pids(self) -> list[int]:
        """Processes still inside the namespace (all of them this benchmark's)."""
        try:
            return [int(pid) for pid in _ip("netns", "pids", self.name).split()]
        except (subprocess.SubprocessError, OSError, ValueError):
            return []

    def close(self) -> list[int]:
        """Kill what is left inside (by pid: only the benchmark's own processes live there), then
        delete the namespace. Returns the pids that had to be killed."""
        leftovers = self.pids()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("netns", "del", self.name)
        return leftovers


def loopback_tx_bytes() -> int:
    """Bytes sent on ``lo`` of the caller's own network namespace (``/proc/self/net/dev``)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # receive: 8 fields, then transmit bytes
    raise RuntimeError("no lo in /proc/self/net/dev")
