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
from dataclasses import dataclass, field

import torch

# "R" or "R:S": SIGKILL our process group mid all-reduce of round R (with bounded groups: of its stage S, from 1)
CRASH_IN_ALLREDUCE_ENV = "COLDFUSION_FAULT_CRASH_IN_ALLREDUCE"
SCALE_UPDATE_ENV = "COLDFUSION_FAULT_SCALE_UPDATE"  # k: send k times our update; "nan": send NaNs
STALL_IN_ALLREDUCE_ENV = "COLDFUSION_FAULT_STALL_IN_ALLREDUCE"  # a file: create it mid all-reduce, then stall
STALL_SECONDS = 10.0  # long enough for a test to cut our link while the all-reduce is under way
MISS_GROUP_ENV = "COLDFUSION_FAULT_MISS_GROUP"  # R: round R's first matchmaking looks where nobody is
# "R:start" or "R:end": round R's first all-reduce is lost for us alone, as its group forms or at its end
LOSE_ATTEMPT_ENV = "COLDFUSION_FAULT_LOSE_ATTEMPT"


def crash_point(value: str) -> dict[str, int | None]:
    """``"R"`` or ``"R:S"`` as :class:`Faults`' crash fields ("" or "0": never)."""
    round_text, _, stage_text = value.partition(":")
    return {"crash_round": int(round_text or 0), "crash_stage": int(stage_text) if stage_text else None}


def lost_attempt(value: str) -> dict[str, int | str]:
    """``"R:start"`` or ``"R:end"`` as :class:`Faults`' lost-attempt fields ("": never)."""
    round_text, _, point = value.partition(":")
    if point not in ("", "start", "end"):
        raise ValueError(f"{LOSE_ATTEMPT_ENV}={value!r}: expected R:start or R:end")
    return {"lose_attempt_round": int(round_text or 0), "lose_attempt_at": point or "end"}


@dataclass(frozen=True)
class Faults:
    crash_round: int = 0  # the round whose all-reduce this process dies in; 0: never
    crash_stage: int | None = None  # ... and with bounded groups the stage (from 1); None: its first all-reduce
    scale_update: str | None = None
    stall_marker: str | None = None  # the file a stalled all-reduce creates, so a test knows when to act
    miss_group_round: int = 0  # the round whose first matchmaking finds nobody; 0: never
    lose_attempt_round: int = 0  # the round whose first all-reduce is lost for us alone; 0: never
    lose_attempt_at: str = "end"  # ... when: "start" (its group formed) or "end" (the others' completed)
    _group_missed: set[int] = field(default_factory=set, compare=False, repr=False)
    _attempt_lost: set[int] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> Faults:
        return cls(
            **crash_point(environment.get(CRASH_IN_ALLREDUCE_ENV) or ""),
            scale_update=environment.get(SCALE_UPDATE_ENV) or None,
            stall_marker=environment.get(STALL_IN_ALLREDUCE_ENV) or None,
            miss_group_round=int(environment.get(MISS_GROUP_ENV) or 0),
            **lost_attempt(environment.get(LOSE_ATTEMPT_ENV) or ""),
        )

    def group_bits(self, bits: str, round_number: int) -> str:
        """``bits``, except in round ``miss_group_round`` the first time: a key of its own, so that
        matchmaking meets nobody (as when two peers miss each other's declarations on a stalled DHT)."""
        if round_number != self.miss_group_round or round_number in self._group_missed:
            return bits
        self._group_missed.add(round_number)
        return bits + "1"

    def loses_attempt(self, round_number: int, point: str) -> bool:
        """Whether to lose this all-reduce of ``round_number`` (its first only) at ``point``: at
        "start" as a follower whose matchmaking gave up on a leader that still counted it (the others
        wait for its parts until they drop it), at "end" as a member whose last part came too late
        while every other member got all of theirs."""
        if (round_number, point) != (
            self.lose_attempt_round,
            self.lose_attempt_at,
        ) or round_number in self._attempt_lost:
            return False
        self._attempt_lost.add(round_number)
        return True

    def crashes_in(self, round_number: int, stage: int | None) -> bool:
        """Whether to die in this all-reduce: of ``round_number``, and (bounded groups) its ``stage``
        (from 0, as in the gathered info). Named by round and stage, not by a count of all-reduces,
        since a stage that finds no group runs none and would shift a count."""
        if not 0 < self.crash_round == round_number:
            return False
        return self.crash_stage is None or stage == self.crash_stage - 1

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
