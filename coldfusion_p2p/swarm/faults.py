"""Test-only fault injection: one seam, read once when the process starts.

The multi-process tests prove that the swarm survives a member SIGKILLed mid all-reduce and that
a poisoned contribution is rejected by everyone. They need a real peer process to misbehave on
purpose, and the only channel into a spawned ``coldfusion-peer`` process is its environment. So
the environment is read here, once, at import (before the averager's process forks, which
inherits the result), and the production code asks a frozen :class:`Faults` instead of reading
``os.environ`` on its hot path. With none of the variables set every fault is off.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

CRASH_IN_ALLREDUCE_ENV = "COLDFUSION_FAULT_CRASH_IN_ALLREDUCE"  # "n": SIGKILL our process group mid n-th all-reduce
SCALE_UPDATE_ENV = "COLDFUSION_FAULT_SCALE_UPDATE"  # k: send k times our update; "nan": send NaNs
STALL_IN_ALLREDUCE_ENV = "COLDFUSION_FAULT_STALL_IN_ALLREDUCE"  # a file: create it mid all-reduce, then stall
STALL_SECONDS = 10.0  # long enough for a test to cut our link while the all-reduce is under way


@dataclass(frozen=True)
class Faults:
    crash_in_allreduce: int = 0  # the all-reduce of this process to die in (1: the first); 0: never
    scale_update: str | None = None
    stall_marker: str | None = None  # the file a stalled all-reduce creates, so a test knows when to act

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> Faults:
        return cls(
            crash_in_allreduce=int(environment.get(CRASH_IN_ALLREDUCE_ENV) or 0),
            scale_update=environment.get(SCALE_UPDATE_ENV) or None,
            stall_marker=environment.get(STALL_IN_ALLREDUCE_ENV) or None,
        )

    def crashes_in(self, allreduce: int) -> bool:
        """Whether to die in this process's ``allreduce``-th all-reduce (counted from 1): with bounded
        groups, the second is the second stage of the first round."""
        return 0 < self.crash_in_allreduce == allreduce

    async def stall_in_allreduce(self) -> None:
        """With ``stall_marker`` set (once per process), create it and pause mid all-reduce."""
        if self.stall_marker is None or os.path.exists(self.stall_marker):
            return
        with open(self.stall_marker, "w") as marker:
            marker.write(str(os.getpid()))
        await asyncio.sleep(STALL_SECONDS)

    def poison_update(self, body: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> None:
        """With ``scale_update`` set, turn ``body`` into ``start`` plus k times its update (or NaNs), in place."""
        if self.scale_update is None:
            return
        with torch.no_grad():
            for tensor, origin in zip(body, start, strict=True):
                if self.scale_update == "nan":
                    tensor.fill_(float("nan"))
                else:
                    tensor.copy_(origin + float(self.scale_update) * (tensor - origin))


FAULTS = Faults.from_environment()
