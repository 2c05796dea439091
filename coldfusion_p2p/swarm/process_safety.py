"""Forked children take SIGTERM and die with their parent, even when the parent is SIGKILLed.

One job, done with ``os.register_at_fork`` hooks (nothing of hivemind is overridden). hivemind runs
its DHT and each averager in a multiprocessing *fork* child of the node's main process, and the DHT
child starts the p2pd daemon through uvloop, whose spawn also runs these hooks between its fork and
the exec. Without them, a peer killed by the OOM killer left all of them serving in the swarm for
good (issue 13), for two reasons:

* the children inherited SIGINT and SIGTERM *blocked*: :func:`coldfusion_p2p.swarm.peer.signals_deferred`
  holds them back in the main process while hivemind starts (a signal that interrupts torch's
  shared-memory calls there hung the peer), and fork copies the signal mask. The deferral stays as
  it is in the parent; the child unblocks both right after the fork.
* nothing tells a child that its parent is gone. Here each child asks the kernel for a SIGTERM when
  the thread that forked it exits (Linux ``PR_SET_PDEATHSIG``; it survives the exec, so p2pd gets it
  too), then checks that this parent is still alive: it may have died before the request.

A forked Python child also gets its own SIGTERM handler: while the parent lives it ignores SIGTERM
(a systemd stop signals the whole group; the parent then finishes its step and shuts its hivemind
children down through their pipes, so they must not vanish under it, as the CLI's stop handler
already meant for them), and once the parent is gone it dies of it.

``PR_SET_PDEATHSIG`` fires when the forking *thread* exits, not its process, so it is only asked for
children forked from a main thread (which lives as long as its process): a child forked by another
thread, which may end long before the process, would be killed early.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CHILD_SIGNALS = {signal.SIGINT, signal.SIGTERM}

_installed = False
_forking: tuple[int, bool] = (0, False)  # (pid, from its main thread?) of the process about to fork
_parent = 0  # in a child forked with these hooks: the pid of the process that forked it
_prctl = None


def install() -> None:
    """Register the fork hooks in this process (idempotent); call it before hivemind forks."""
    global _installed, _prctl
    if _installed:
        return
    _installed = True
    if sys.platform.startswith("linux"):
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc, already loaded: no find_library subprocess
        except (OSError, AttributeError):
            _prctl = None
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    global _forking
    _forking = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    global _parent
    parent, from_main_thread = _forking
    _parent = parent
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if _prctl is not None and from_main_thread:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above: nobody would send it
        _die()


def _on_sigterm(signum, frame) -> None:
    if os.getppid() == _parent:
        return  # the parent lives: it shuts this child down itself
    _die()


def _die() -> None:
    """Die of SIGTERM (default action) without running any of the parent's inherited clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)  # not reached: SIGTERM is unblocked
