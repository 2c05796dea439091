"""Fusion in bounded groups over stages (``--target-group-size``): Moshpit averaging on a grid.

One group of everyone rolls a round back when any one of its N members fails. With bounded
groups the round's members (agreed through the records: :func:`policy.round_members`) sit on
the grid of :mod:`~coldfusion_p2p.swarm.grid`, and in each stage a peer all-reduces, all or
nothing, with the peers that share every coordinate but the stage's. The value a peer carries
into the next stage is its group's weighted mean, and its weight the group's total, so on a full
grid every peer ends the round holding exactly the weighted mean of all members' bodies.

A failed group keeps its stage input and the round goes on: its members end the round with the
contributions they did reach. Each stage's group and outcome go into the round's report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from hivemind.utils import get_dht_time

from coldfusion_p2p.contributor.model import copy_into
from coldfusion_p2p.swarm.grid import (
    coordinates,
    grid_positions,
    own_stage_group,
    stage_group_bits,
    stage_key,
    stages_needed,
)

if TYPE_CHECKING:
    from coldfusion_p2p.swarm.fusion import BodyFusion


@dataclass(frozen=True)
class GroupOutcome:
    """How one all-reduce group ended for this peer: its members on success, else why not."""

    fused: bool
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason: str = ""
    rejected: bool = False  # the all-reduce worked but its result failed validation (e.g. poisoning)
    # ended by our own transport (no group found, or an exception mid all-reduce), or refused only by
    # members whose transport lost it. Refused, every member rolls back (two-phase commit): nobody
    # applied the attempt, and looking again is safe
    retryable: bool = False


@dataclass(frozen=True)
class StageReport:
    """One stage of a round in bounded groups: its group and how it ended (in the round's report)."""

    stage: int
    outcome: str  # fused, failed, rejected, or alone (a group of one: nothing to average this stage)
    group_size: int
    reason: str = ""
    attempts: int = 1  # 2: the first was lost to transport and the group looked once more


STAGE_MARKS = {"fused": "✓", "failed": "✗", "rejected": "✗", "alone": "·"}


def stage_summary(stages: Sequence[dict[str, Any]]) -> str:
    """A round's stages for the record and the monitor: each stage's group size and how it ended,
    e.g. ``4✓ 3✗`` (fused in a group of 4, then a group of 3 failed); "" with one group."""
    marks = [f"{stage['group_size']}{STAGE_MARKS.get(stage['outcome'], '?')}" for stage in stages]
    return " ".join(marks)[:80]


def members_digest(members: Sequence[str]) -> str:
    """A short fingerprint of a round's member list: a stage group whose members hold different
    lists placed the peers on different grids, and must not fuse (:func:`policy.group_mismatch`)."""
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()[:16]


def stage_wait(matchmaking_time: float, next_chunk_timeout: float) -> float:
    """How long a stage group waits for its last member before giving up on it. A complete group
    starts at once; a member still finishing a slow previous stage (a dropped sender takes up to
    ``next_chunk_timeout`` to notice) may arrive this much later and still take part."""
    return matchmaking_time + 2 * next_chunk_timeout


def fuse_in_stages(
    fusion: BodyFusion,
    body: Sequence[torch.Tensor],
    start: list[torch.Tensor],
    round_number: int,
    members: Sequence[str],
    weight: float,
    info: dict[str, Any],
) -> tuple[GroupOutcome, tuple[StageReport, ...]]:
    """All the stages of one round for this peer. On success (at least one stage fused) the averager's
    buffers hold the value it ends with, and the outcome's members are every peer whose contribution
    that value holds (with what they told their groups).

    A stage group lost to transport (:attr:`GroupOutcome.retryable`: nobody applied it) is looked for
    once more under the same key: its members learn of the loss within ``next_chunk_timeout`` of
    each other, and a stage waits twice that for its last member (:func:`stage_wait`)."""
    config, peer_id = fusion.config, fusion.peer_id
    if peer_id not in members:
        return GroupOutcome(False, reason="not among the round's members (ready after its window closed)"), ()
    positions = grid_positions(members, round_number)
    group_size = config.target_group_size
    stages = config.fusion_stages or stages_needed(len(positions), group_size)
    cell = coordinates(positions[peer_id], group_size, stages)
    digest = members_digest(members)
    current = [tensor.detach().clone() for tensor in body]
    reached: dict[str, dict[str, Any]] = {}  # peers whose contributions `current` holds -> their info
    reports: list[StageReport] = []
    for stage in range(stages):
        group = own_stage_group(positions, peer_id, group_size, stages, stage)
        if len(group) == 1:
            reports.append(StageReport(stage, "alone", 1, "a group of one on this grid"))
            continue
        stage_info = {
            **info,
            "stage": stage,
            "members_digest": digest,
            "stage_weight": weight,
            "reached": sorted(reached) or [peer_id],
        }
        bits = stage_group_bits(round_number, stage, stage_key(cell, stage))
        outcome, attempts = all_reduce_stage(fusion, current, start, round_number, bits, group, weight, stage_info)
        if not outcome.fused:
            outcome_name = "rejected" if outcome.rejected else "failed"
            reports.append(StageReport(stage, outcome_name, len(group), outcome.reason, attempts))
            continue
        with fusion.averager.get_tensors() as buffers:
            current = [buffer.detach().clone() for buffer in buffers]
        weight = sum(float(member.get("stage_weight", 0.0)) for member in outcome.members.values())
        for member_id, member in outcome.members.items():
            for contributor in member.get("reached") or [member_id]:
                reached.setdefault(contributor, member)
        reports.append(StageReport(stage, "fused", len(group), attempts=attempts))
    if not reached:
        reasons = "; ".join(f"stage {report.stage + 1}: {report.reason}" for report in reports)
        return GroupOutcome(False, reason=reasons or "no stage"), tuple(reports)
    with fusion.averager.get_tensors() as buffers:
        copy_into(list(buffers), current)
    return GroupOutcome(True, reached), tuple(reports)


def all_reduce_stage(
    fusion: BodyFusion,
    current: list[torch.Tensor],
    start: list[torch.Tensor],
    round_number: int,
    bits: str,
    group: Sequence[str],
    weight: float,
    stage_info: dict[str, Any],
) -> tuple[GroupOutcome, int]:
    """One stage group's all-reduce and how many attempts it took: one more when the first was lost to
    transport, as a round's single group gets (peer.fuse_round), under the same key and members."""
    config = fusion.config
    for attempt in (1, 2):
        scheduled = get_dht_time() + stage_wait(config.matchmaking_time, config.next_chunk_timeout)
        outcome = fusion.all_reduce_group(
            current, start, round_number, bits, scheduled, len(group), weight, stage_info, expected=group
        )
        if outcome.fused or not outcome.retryable or fusion.should_stop():
            return outcome, attempt
    return outcome, 2
