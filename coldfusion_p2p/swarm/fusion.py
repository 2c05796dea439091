"""One fusion round: average the bodies of the peers ready in the same round, all-or-nothing.

hivemind's ``DecentralizedAverager`` does the group forming and the butterfly all-reduce. This
module wraps it for ColD Fusion:

* the averager works on its own buffers, not on the live model: the body is copied in right before
  the all-reduce and the average is copied back only after it succeeded and passed checks, so a
  failed round leaves the peer's body exactly as it was (all or nothing, locally);
* the state it shares with newcomers (``get_current_state``) is a snapshot of the *last fused*
  body and its round, never the half-trained tensors of a round in progress, together with the
  fusion rule's state (outer momentum) that belongs to that body;
* the all-reduce result (the group's average) is what the checks below validate; only once every
  member confirmed it does the run's :class:`~coldfusion_p2p.merge.rules.FusionRule` turn it into the next
  fused base (the plain mean: the average itself);
* every timeout hivemind leaves unset (all-reduce, sender, reducer, chunk) is set, and each wait
  is bounded, so one stalled peer can never hang a round;
* hivemind reports success even when a reducer failed (its slices fall back to each peer's own
  values) or a sender was banned (its slices are averaged without it): each member checks its own
  view of the all-reduce, publishes a signed verdict, and applies the average only if *every*
  member of the group reported a complete all-reduce. Otherwise all keep their own body.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT
from hivemind.utils import get_dht_time

from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.contributor.model import copy_into
from coldfusion_p2p.merge.aggregation import contribution
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm.auth import InviteGate
from coldfusion_p2p.swarm.faults import FAULTS
from coldfusion_p2p.swarm.hivemind_adapter import FusedBodyAverager
from coldfusion_p2p.swarm.policy import (
    contribution_kind,
    group_bits,
    group_decision,
    group_mismatch,
    poisoned_update,
    refusers_look_again,
    same_start,
)
from coldfusion_p2p.swarm.records import RecordBoard, Verdict
from coldfusion_p2p.swarm.stages import GroupOutcome, StageReport, fuse_in_stages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedState:
    """A fused base downloaded from the swarm."""

    round: int
    tensors: list[torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)
    state: list[torch.Tensor] = field(default_factory=list)  # the fusion rule's state that goes with it


@dataclass(frozen=True)
class FusionResult:
    fused: bool  # True: the body now holds the group's average
    group_size: int  # peers in the all-reduce (1 when nobody joined)
    peer_ids: tuple[str, ...]  # base58 ids of the group, this peer included
    seconds: float  # from entering matchmaking to the end of the all-reduce
    gathered: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each member told the group
    reason: str = ""  # why the round did not fuse
    rejected: bool = False  # the all-reduce worked but its result failed validation (e.g. poisoning)
    bytes_sent: int = 0  # serialized bytes this peer sent in the all-reduce
    state: list[torch.Tensor] = field(default_factory=list)  # the fusion rule's state after a fusion
    copy_seconds: float = 0.0  # the body's device->host copy before and host->device copy after (0 on a CPU)
    stages: tuple[StageReport, ...] = ()  # bounded groups: each stage's group and outcome
    retryable: bool = False  # one group (not stages) lost to our transport: safe to look again (GroupOutcome)


def on_host(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """``tensors`` on the CPU, where hivemind's averager works: themselves, or copies (then True)."""
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return list(tensors), False
    return [tensor.detach().to("cpu", copy=True) for tensor in tensors], True


class BodyFusion:
    """Fuses one peer's body with its group, round after round.

    >>> fusion = BodyFusion(dht, body, prefix=keys.averager_prefix(fingerprint), config=config.fusion, board=board)
    >>> result = fusion.fuse(body, round_number=1, scheduled_time=t, weight=1.0, info={"round": 1})
    >>> result.fused, result.group_size
    """

    def __init__(
        self,
        dht: DHT,
        body: Sequence[torch.Tensor],
        *,
        prefix: str,
        config: FusionConfig,
        board: RecordBoard,
        gate: InviteGate | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        rule: FusionRule | None = None,
        original: Sequence[torch.Tensor] | None = None,
        state: Sequence[torch.Tensor] | None = None,
        averager: FusedBodyAverager | None = None,
        client_mode: bool = False,
    ):
        """``averager`` is for unit tests of :meth:`fuse`'s decisions only (the default: a real one).
        ``client_mode``: a node others cannot connect to (see :mod:`~coldfusion_p2p.swarm.reachability`).
        ``original``: --model's own body, needed by the anchor rule and by lossy compression."""
        self.config, self.board, self.should_stop = config, board, should_stop
        self.rule = rule or FusionRule()
        self.contribution = contribution_kind(config.compression)
        if (self.rule.needs_original or self.contribution == "drift") and original is None:
            raise ValueError("the anchor rule and lossy compression need the original body")
        self._original = on_host(original)[0] if self.rule.needs_original else None  # the pretrained body (anchor)
        # with a lossy codec the all-reduce carries each body minus this (the same on every member)
        self._center = [tensor.detach().cpu().clone() for tensor in original] if self.contribution == "drift" else None
        # the rule's state that goes with the body this peer holds: published and checkpointed with it
        self.state: list[torch.Tensor] = list(state) if state else self.rule.initial_state(on_host(body)[0])
        self._sketch_cache: tuple[list[torch.Tensor], list[float]] | None = None  # (start, its sketch)
        self.averager = averager or FusedBodyAverager(
            body, dht, prefix=prefix, config=config, gate=gate, client_mode=client_mode, center=self._center
        )

    @property
    def peer_id(self) -> str:
        return self.averager.peer_id.to_base58()

    def _start_sketch(self, start: list[torch.Tensor]) -> list[float]:
        """The sketch of the body this round started from, computed once per fused base."""
        if self._sketch_cache is None or self._sketch_cache[0] is not start:
            self._sketch_cache = (start, count_sketch(start))
        return self._sketch_cache[1]

    def fuse(
        self,
        body: Sequence[torch.Tensor],
        *,
        round_number: int,
        scheduled_time: float,
        weight: float,
        info: dict[str, Any],
        group_size: int | None = None,
        members: Sequence[str] | None = None,
    ) -> FusionResult:
        """All-reduce ``body`` with the peers of ``round_number`` at ``scheduled_time``, or as soon as
        ``group_size`` peers joined (when known); update it in place only on success. ``info`` is
        gathered from every member (it must include ``round``). With ``--target-group-size`` and the
        round's ``members``, in bounded groups over stages instead (:mod:`~coldfusion_p2p.swarm.stages`).
        A body on a GPU is copied to the CPU for the all-reduce and the result copied back (timed)."""
        started = time.perf_counter()
        device_body, (body, on_device) = body, on_host(body)
        copy_seconds = time.perf_counter() - started if on_device else 0.0
        bytes_before = self.averager.bytes_sent.value
        start = self.averager.last_fused_body()
        stages: tuple[StageReport, ...] = ()
        if members is not None and self.config.target_group_size is not None:
            outcome, stages = fuse_in_stages(self, body, start, round_number, members, weight, info)
        else:
            bits = group_bits(round_number)
            outcome = self.all_reduce_group(body, start, round_number, bits, scheduled_time, group_size, weight, info)
        if not outcome.fused:
            seconds = time.perf_counter() - started
            return FusionResult(
                False,
                1,
                (self.peer_id,),
                seconds,
                reason=outcome.reason,
                rejected=outcome.rejected,
                stages=stages,
                retryable=outcome.retryable and not stages,
            )
        starts = [member.get("start_sketch") for member in outcome.members.values()]
        member_norms = [float(member.get("update_norm", float("nan"))) for member in outcome.members.values()]
        self._apply_rule(body, start, same_start(starts, member_norms))
        if on_device:  # the trainer's parameters on the GPU hold the new base from now on
            copied = time.perf_counter()
            copy_into(list(device_body), body)
            copy_seconds += time.perf_counter() - copied
        return FusionResult(
            fused=True,
            group_size=len(outcome.members),
            peer_ids=tuple(sorted(outcome.members)),
            seconds=time.perf_counter() - started,
            gathered=outcome.members,
            bytes_sent=self.averager.bytes_sent.value - bytes_before,
            state=self.state,
            copy_seconds=copy_seconds,
            stages=stages,
        )

    def all_reduce_group(
        self,
        body: Sequence[torch.Tensor],
        start: list[torch.Tensor],
        round_number: int,
        bits: str,
        scheduled_time: float,
        group_size: int | None,
        weight: float,
        info: dict[str, Any],
        expected: Sequence[str] | None = None,
    ) -> GroupOutcome:
        """One all-or-nothing all-reduce of ``body`` with the group met under ``bits``; on success the
        averager's buffers hold the group's mean body (not yet the next base: see :meth:`fuse`).
        ``expected``: the group's members, when known (bounded groups); another group is refused."""
        config = self.config
        nonce = secrets.token_hex(8)  # tells this attempt from any earlier one of the same round
        own_norm = update_norm(body, start)
        own_sketch = self._start_sketch(start)
        info = {
            **info,
            "nonce": nonce,
            "update_norm": own_norm,
            "aggregation": config.aggregation,
            "fusion_rule": self.rule.signature(),
            "contribution": self.contribution,
            "client_results": config.client_results,
            "start_sketch": own_sketch,
        }
        matchmaking_deadline = (
            max(scheduled_time, get_dht_time() + config.matchmaking_time) + 2 * config.request_timeout
        )
        self.averager.set_round_group(FAULTS.group_bits(bits, round_number), group_size)
        self._load_contribution(body, start)
        control = self.averager.step(
            gather=info,
            weight=weight,
            scheduled_time=scheduled_time,
            timeout=matchmaking_deadline - get_dht_time(),
            allow_retries=False,  # a retry could fuse a different subset than the peers that already applied
            wait=False,
        )
        wait_seconds = max(0.0, matchmaking_deadline - get_dht_time()) + config.allreduce_timeout + 5.0
        try:
            gathered = wait_in_slices(control, time.monotonic() + wait_seconds, self.should_stop)
        except Exception as error:  # hivemind raises several types; all mean "no fusion this round"
            control.cancel()
            return self._group_failed(round_number, nonce, _short_reason(error), retry=True)
        if not gathered:
            return self._group_failed(round_number, nonce, "no group formed", retry=True)
        members = {peer.to_base58(): data if isinstance(data, dict) else {} for peer, data in gathered.items()}
        mismatch = group_mismatch(members, round_number, config.aggregation, self.rule.signature(), self.contribution)
        if mismatch is None and expected is not None and set(members) != set(expected):
            missing = len(set(expected) - set(members))
            mismatch = f"a stage group of {len(members)} instead of its {len(expected)} ({missing} missing)"
        if mismatch is not None:
            return self._group_failed(round_number, nonce, mismatch)
        invalid = self._invalid_average(members, start, own_norm, own_sketch)
        if invalid is not None:  # the average is unusable: keep our body and make every member roll back too
            return dataclasses.replace(self._group_failed(round_number, nonce, f"rejected: {invalid}"), rejected=True)
        refusal = await_group_verdict(self, round_number, nonce, members)
        return GroupOutcome(True, members) if refusal is None else refusal

    def _load_contribution(self, body: Sequence[torch.Tensor], start: list[torch.Tensor]) -> None:
        """Put what this member sends into the averager's buffers: its body (or TIES' trimmed one),
        minus the center with a lossy codec (a drift, which it encodes well: policy.contribution_kind)."""
        config = self.config
        with self.averager.get_tensors() as buffers:
            copy_into(list(buffers), contribution(body, start, config.aggregation, config.ties_density))
            for buffer, center in zip(buffers, self._center or (), strict=False):
                buffer.sub_(center)

    def _invalid_average(
        self, members: dict[str, dict[str, Any]], start: list[torch.Tensor], own_norm: float, own_sketch: list[float]
    ) -> str | None:
        """Why the all-reduce's result must be rejected (non-finite, or poisoned), or None; the buffers
        hold the group's mean body afterwards (its mean drift plus the center with a lossy codec)."""
        with self.averager.get_tensors() as buffers:
            for buffer, center in zip(buffers, self._center or (), strict=False):
                buffer.add_(center)
            finite = all(torch.isfinite(tensor).all() for tensor in buffers)
            fused_norm = update_norm(buffers, start) if finite else float("nan")
        if not finite:
            return "the average has NaN or Inf values"
        return poisoning_suspicion(fused_norm, own_norm, own_sketch, members, self.config.max_update_ratio)

    def _apply_rule(self, body: Sequence[torch.Tensor], start: list[torch.Tensor], starts_agree: bool) -> None:
        """Write the next fused base into ``body``: the rule applied to the confirmed average.

        Members that started from different bases (see :func:`policy.same_start`, decided alike by
        all) take the plain mean and restart the rule's state, so they still end on one base.
        """
        with self.averager.get_tensors() as buffers:
            if self.rule.is_plain_mean or not starts_agree:
                copy_into(list(body), list(buffers))
                self.state = self.rule.initial_state(start) if self.state else []
                return
            state = self.averager.last_fused_state() or self.rule.initial_state(start)
            step = self.rule.apply(start, list(buffers), self._original, state)
        copy_into(list(body), step.base)
        self.state = step.state

    def publish_verdict(self, round_number: int, nonce: str, ok: bool, retry: bool = False) -> bool:
        """Whether the DHT took our verdict (if not, the others time out and roll back: safe)."""
        verdict = Verdict(
            peer_id=self.peer_id, round=round_number, nonce=nonce, ok=ok, time=get_dht_time(), retry=retry
        )
        try:
            return self.board.publish_verdict(verdict, ttl=max(60.0, 2 * self.config.allreduce_timeout))
        except Exception as error:
            logger.debug("publishing the verdict failed: %r", error)
            return False

    def _group_failed(self, round_number: int, nonce: str, reason: str, retry: bool = False) -> GroupOutcome:
        """Keep our own body; tell the group (if any formed) not to apply this attempt's average, and
        whether we look again (``retry``: our transport lost it, see :attr:`GroupOutcome.retryable`)."""
        self.publish_verdict(round_number, nonce, ok=False, retry=retry)
        return GroupOutcome(False, reason=reason, retryable=retry)

    def publish_fused(self, round_number: int, body: Sequence[torch.Tensor], metadata: dict[str, Any]) -> None:
        """Serve ``body`` as the fused base of ``round_number``, with the rule's current :attr:`state`."""
        if not self.rule.is_plain_mean:
            metadata = {**metadata, "fusion_rule": self.rule.signature()}
        self.averager.publish_fused(round_number, body, metadata, self.state)

    def download_fused(self, min_round: int, expected: Sequence[torch.Tensor], timeout: float) -> FusedState | None:
        """The swarm's fused base, with the rule state that goes with it (adopt both, see :attr:`state`)."""
        return download_fused(self.averager, min_round, expected, timeout, rule=self.rule)

    def shutdown(self) -> None:
        if self.averager.is_alive():
            self.averager.shutdown()


def await_group_verdict(
    fusion: BodyFusion, round_number: int, nonce: str, members: dict[str, dict[str, Any]]
) -> GroupOutcome | None:
    """Confirm our all-reduce, then wait (bounded) for every member's verdict; None if all report a
    complete one and ours is out, else the rollback (retryable when every refuser looks again:
    :func:`policy.refusers_look_again`). A store that failed (a loaded DHT) is tried again meanwhile,
    since without our verdict the others roll back; reads back off from 0.1 s to 1 s (big groups
    spare the DHT)."""
    deadline = time.monotonic() + fusion.config.allreduce_timeout
    published, pause = False, 0.1
    while True:
        published = published or fusion.publish_verdict(round_number, nonce, ok=True)
        verdicts = fusion.board.fetch_verdicts(round_number)
        decision = group_decision(fusion.peer_id, members, verdicts)
        if decision == "apply" and published:  # not before ours is out: the others would roll back
            return None
        if decision not in (None, "apply"):
            return GroupOutcome(
                False, reason=decision, retryable=refusers_look_again(fusion.peer_id, members, verdicts)
            )
        if fusion.should_stop():
            return GroupOutcome(False, reason="stopped by the user before every member confirmed")
        if time.monotonic() > deadline:
            missing = "a group member never confirmed" if published else "the DHT never took our verdict on"
            return GroupOutcome(False, reason=f"rolled back: {missing} the all-reduce")
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)


def wait_in_slices(control, deadline: float, should_stop: Callable[[], bool]):
    """The step's result, waited for in slices so that SIGTERM never waits for a whole all-reduce.

    Leaving mid all-reduce is safe for the others: they see an incomplete all-reduce (or our
    missing verdict) and all keep their own bodies.
    """
    while True:
        try:
            return control.result(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        except FutureTimeoutError:
            if should_stop():
                raise InterruptedError("stopped by the user") from None
            if time.monotonic() >= deadline:
                raise


def poisoning_suspicion(
    fused_norm: float, own_norm: float, own_sketch: list[float], members: dict[str, dict[str, Any]], ratio: float
) -> str | None:
    """Why a finite average looks poisoned (:func:`policy.poisoned_update` on what the members told), or None."""
    member_norms = [float(member.get("update_norm", float("nan"))) for member in members.values()]
    honest_bounds = [float(member.get("update_bound", float("nan"))) for member in members.values()]
    start_gaps = [sketch_distance(own_sketch, member.get("start_sketch")) for member in members.values()]
    if poisoned_update(fused_norm, own_norm, member_norms, ratio, start_gaps, honest_bounds):
        return f"the fused update is {fused_norm / max(own_norm, 1e-12):.0f}x ours: a poisoned contribution?"
    return None


def update_norm(body: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> float:
    """L2 norm of ``body - start`` over all tensors (how far a round moved the body)."""
    with torch.no_grad():
        squares = (
            float((tensor.float() - origin.float()).pow(2).sum()) for tensor, origin in zip(body, start, strict=True)
        )
        total = sum(squares)
    return total**0.5


SKETCH_SIZE = 256  # floats each member gathers about its start: ~9% error on distances between starts


def count_sketch(tensors: Sequence[torch.Tensor], size: int = SKETCH_SIZE) -> list[float]:
    """A CountSketch of the concatenated tensors: every value added, with a seeded random sign, to one
    of ``size`` seeded random buckets. The sketch is linear, so the distance between two sketches
    estimates the distance between two bodies (unbiased in its square) from ``size`` numbers each.
    """
    sketch = torch.zeros(size, dtype=torch.float32)
    with torch.no_grad():
        for index, tensor in enumerate(tensors):
            values = tensor.detach().reshape(-1).float()
            generator = torch.Generator().manual_seed(1_000_003 * (index + 1))
            buckets = torch.randint(0, size, (values.numel(),), generator=generator)
            signs = torch.randint(0, 2, (values.numel(),), generator=generator, dtype=torch.int8) * 2 - 1
            sketch.index_add_(0, buckets, values * signs)
    return sketch.tolist()


def sketch_distance(own: Sequence[float], other: Any) -> float:
    """Estimated distance between the bodies two sketches summarise (NaN for a missing or bad sketch)."""
    try:
        other_tensor = torch.tensor([float(value) for value in other], dtype=torch.float64)
    except (TypeError, ValueError):
        return float("nan")
    if other_tensor.shape != (len(own),):
        return float("nan")
    return float((torch.tensor(own, dtype=torch.float64) - other_tensor).norm())


def download_fused(
    averager: FusedBodyAverager,
    min_round: int,
    expected: Sequence[torch.Tensor],
    timeout: float,
    rule: FusionRule | None = None,
) -> FusedState | None:
    """The fused base the best-placed peer serves, if its round is at least ``min_round``, its shapes
    match ``expected`` and it is finite; None otherwise (callers retry, bounded).

    The rule state served with it (``metadata["state_tensors"]`` tensors after the body) must be
    shaped like the body and finite too. Given our ``rule``, a base fused with another rule (or
    lacking the state ours needs) is refused; without one (the archiver) any rule is accepted."""
    future = averager.load_state_from_peers(wait=False, timeout=timeout)
    try:
        loaded = future.result(timeout=timeout)
    except Exception as error:  # several hivemind error types: all mean "not this time"
        logger.info("state download failed: %s", _short_reason(error))
        return None
    if loaded is None:
        return None
    metadata, tensors = loaded
    if not isinstance(metadata, dict) or not isinstance(metadata.get("round"), int):
        return None
    state_count = metadata.get("state_tensors", 0)
    if not isinstance(state_count, int) or state_count not in (0, len(expected)):
        logger.warning("a peer served %r rule state tensors for a body of %d; ignored", state_count, len(expected))
        return None
    if metadata["round"] < min_round or len(tensors) != len(expected) + state_count:
        return None  # the peer asked had not finished that round yet
    body, state = list(tensors[: len(expected)]), list(tensors[len(expected) :])
    if rule is not None:
        served_rule = metadata.get("fusion_rule", FusionRule().signature())
        if served_rule != rule.signature() or (rule.has_state and not state):
            logger.warning(
                "a peer served a base fused with another rule (%s, ours %s); ignored", served_rule, rule.signature()
            )
            return None
    if not _shapes_match(body, expected) or (state and not _shapes_match(state, expected)):
        logger.warning("a peer served a body of other shapes (another model?); ignored")
        return None
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        logger.warning("a peer served a fused base with NaN or Inf values; ignored")
        return None
    return FusedState(round=metadata["round"], tensors=body, source=metadata, state=state)


def _shapes_match(tensors: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> bool:
    return all(tensor.shape == own.shape for tensor, own in zip(tensors, expected, strict=True))


def _short_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


def finite_or_nan(value: float) -> float | None:
    """JSON- and record-friendly metric: None instead of NaN/Inf."""
    return value if value is not None and math.isfinite(value) else None
