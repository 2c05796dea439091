"""The peer's decisions, as pure functions of what it knows: testable without a network.

The round protocol they implement:

1. A peer that finished its local steps for round ``r`` proposes a fusion time
   ``now + fusion_window`` in its record (status ``ready``).
2. Every peer ready for ``r`` fuses at the *earliest* proposal for ``r`` — the first finisher opens
   the window, and all who finish inside it join the same all-reduce (one group: all use the
   same scheduled time and the same group key).
3. The window closes early once every live peer working on ``r`` is ready and they are at least
   ``min_group_size``: nobody waits for a deadline when the whole swarm is there. Then the peers
   also know the group's size, and its all-reduce starts as soon as that many have joined
   instead of at the scheduled time (:func:`complete_group_size`).
4. A peer still alone when the window closes (at once, with ``min_group_size`` 1) keeps its own
   body and goes on.
5. A peer that finds the swarm's fused round already at or past ``r`` missed the window: it
   downloads the fused base instead of contributing a stale body.
"""

from __future__ import annotations

from collections.abc import Iterable

from coldfusion_p2p.swarm.records import ARCHIVER, PeerRecord, Verdict

GROUP_BITS = 16  # rounds are told apart in the group key modulo 2**16
READY_STATUSES = ("ready", "fusing")


def group_bits(round_number: int) -> str:
    """Group-key bits of a round: peers of different rounds can never land in one group."""
    return format(round_number % (1 << GROUP_BITS), f"0{GROUP_BITS}b")


def swarm_fused_round(records: Iterable[PeerRecord]) -> int:
    """The newest fused base any live peer holds (0: nothing fused yet)."""
    return max((record.fused_round for record in records), default=0)


def others(
    records: dict[bytes, PeerRecord], own_subkey: bytes, model_fingerprint: str | None = None
) -> list[PeerRecord]:
    """The other contributors' records: not archivers (they never fuse), and, given our model's
    fingerprint, not peers of another model (they can never be in our group)."""
    return [
        record
        for subkey, record in records.items()
        if subkey != own_subkey
        and record.status != ARCHIVER
        and (model_fingerprint is None or record.model_fingerprint in ("", model_fingerprint))
    ]


def archivers_behind(records: Iterable[PeerRecord], fused_round: int) -> bool:
    """Whether an archiver in the swarm has not yet stored ``fused_round`` (a leaving peer may wait for it)."""
    return any(record.status == ARCHIVER and record.fused_round < fused_round for record in records)


def fusion_time(records: Iterable[PeerRecord], round_number: int) -> float | None:
    """The earliest fusion time proposed for ``round_number`` by a ready peer, if any."""
    proposals = [
        record.fuse_at
        for record in records
        if record.round == round_number and record.status in READY_STATUSES and record.fuse_at is not None
    ]
    return min(proposals, default=None)


def everyone_ready(records: Iterable[PeerRecord], round_number: int, min_group_size: int = 1) -> bool:
    """True when every live peer working on ``round_number`` is ready to fuse it, and they are at
    least ``min_group_size`` (peers still starting up are not visible yet: this waits for them).

    A peer downloading a fused base from an earlier round is about to work on this one: waiting for
    it (bounded by the fusion window) lets a peer that fell behind rejoin, instead of chasing a
    swarm that closes every window just before it arrives.
    """
    working = [
        record
        for record in records
        if record.round == round_number or (record.status == "downloading" and record.round < round_number)
    ]
    ready = [record for record in working if record.status in READY_STATUSES]
    return len(ready) == len(working) and len(ready) >= min_group_size


def complete_group_size(records: Iterable[PeerRecord], round_number: int, min_group_size: int = 1) -> int | None:
    """How many peers fuse ``round_number`` when the whole swarm is ready for it (see
    :func:`everyone_ready`), else None. With it, the group's leader starts the all-reduce once that
    many joined (hivemind's ``target_group_size``) instead of waiting out the matchmaking time: on
    the network lab that wait was 5 s of every round. A peer that turns ready later than the count
    was taken may then miss the round; it downloads the fused base, as any late peer does."""
    records = list(records)
    if not everyone_ready(records, round_number, min_group_size):
        return None
    return sum(1 for record in records if record.round == round_number and record.status in READY_STATUSES)


def ready_peer_ids(records: Iterable[PeerRecord], round_number: int) -> list[str]:
    """The peer ids ready to fuse ``round_number``, sorted: a round's members as one peer sees them."""
    ready = {record.peer_id for record in records if record.round == round_number and record.status in READY_STATUSES}
    return sorted(ready)


def newest_for_round(known: PeerRecord | None, fresh: PeerRecord, round_number: int) -> PeerRecord:
    """Of two records of one peer, the one that tells about ``round_number``: the fresh one, unless it
    has already moved past the round (the member lists are about who was ready for it)."""
    if known is not None and known.round == round_number and fresh.round != round_number:
        return known
    return fresh


def round_members(records: Iterable[PeerRecord], round_number: int) -> list[str]:
    """The members of ``round_number`` for bounded groups: the list published with the earliest
    proposal (by the peer that closed the window; ties go to the smaller peer id), so that every
    peer that sees that record agrees; without one, this peer's own view (:func:`ready_peer_ids`)."""
    records = list(records)
    listed = [
        record
        for record in records
        if record.round == round_number and record.fuse_at is not None and record.fuse_members
    ]
    if listed:
        return list(min(listed, key=lambda record: (record.fuse_at, record.peer_id)).fuse_members)
    return ready_peer_ids(records, round_number)


def has_partners(other_records: Iterable[PeerRecord], round_number: int) -> bool:
    """Whether any other live peer could still fuse ``round_number`` (working on it, or joining)."""
    return any(record.round == round_number and record.status != "stopped" for record in other_records)


def still_fusing(other_records: Iterable[PeerRecord], round_number: int) -> bool:
    """Whether another peer is still waiting for or running the all-reduce of ``round_number``."""
    return any(record.round == round_number and record.status in READY_STATUSES for record in other_records)


def partners_gone(unseen: float, record_ttl: float, min_group_size: int, now: float, scheduled: float) -> bool:
    """Whether a peer that reads no partner for its round fuses alone now: none was read for twice
    as long as a record lives (``unseen`` seconds: a shorter gap is a failed DHT read, or a refresh
    that came late on a loaded DHT), and either it needs no partner or its window's time has come.
    On the network lab one empty read at the window's time sent a home peer alone while its partner
    matchmade: the round was lost for both."""
    return not maybe_a_failed_read(unseen, record_ttl) and (min_group_size <= 1 or now >= scheduled)


def maybe_a_failed_read(unseen: float, record_ttl: float) -> bool:
    """Whether reading no partner, ``unseen`` seconds after one was last read, may be a failed DHT
    read (or a refresh late on a loaded DHT) rather than a partner gone: up to twice a record's life."""
    return unseen <= 2 * record_ttl


def second_look(other_records: Iterable[PeerRecord], round_number: int, waited_out: bool) -> tuple[str, int]:
    """How a second look at ``round_number`` stands, after an attempt lost to transport: ``("alone", 1)``
    when nobody else looks again; ``("wait", 0)`` while another peer's first all-reduce of the round
    runs (its peer may look again once it learns of the loss), unless ``waited_out``; else
    ``("fuse", n)`` with every peer looking again (n counts us): they are all the lost attempt's
    members that will, so the window closes at once."""
    records = list(other_records)
    if not still_fusing(records, round_number):
        return "alone", 1
    if first_attempts_running(records, round_number) and not waited_out:
        return "wait", 0
    partners = looking_again(records, round_number)
    return ("fuse", len(partners) + 1) if partners else ("alone", 1)


def first_attempts_running(other_records: Iterable[PeerRecord], round_number: int) -> bool:
    """Whether another peer may still be in its first all-reduce of ``round_number``: one that may yet
    look again, if its attempt ends lost (a client learns that only when the reducers give up).
    "ready" counts too: a record is refreshed every ``record_period``, so one read mid all-reduce
    may still say "ready"."""
    return any(
        record.round == round_number and record.status in READY_STATUSES and record.attempt == 0
        for record in other_records
    )


def looking_again(other_records: Iterable[PeerRecord], round_number: int) -> list[PeerRecord]:
    """The peers on their second look for a group of ``round_number``: a retry's only partners."""
    return [
        record
        for record in other_records
        if record.round == round_number and record.attempt == 1 and record.status in READY_STATUSES
    ]


def fused_without_us(other_records: Iterable[PeerRecord], round_number: int) -> int | None:
    """The newest round at least ``round_number`` that others fused *in a group* (not alone), if any.

    After our own fusion failed, only a base the others really averaged is worth downloading; a
    peer that kept its own body is no better than ours.
    """
    rounds = [
        record.fused_round
        for record in other_records
        if record.fused_round >= round_number and record.last_group_size >= 2
    ]
    return max(rounds, default=None)


def no_reducer(records: Iterable[PeerRecord]) -> bool:
    """True when none of these peers can reduce (all in client mode): hivemind needs one that can.

    Records of older versions carry no mode ("") and count as public, as they ran then."""
    return all(record.reachability in ("client", "relayed") for record in records)


def missed_round(local_round: int, other_records: Iterable[PeerRecord]) -> bool:
    """A peer working on ``local_round`` is behind when others fused that round in a group, or moved
    past it.

    A peer whose own fusion of the round failed (or that fused alone) also moves its ``fused_round``
    on, but nobody fused the round: counting it made the peers still training or waiting for that
    round give it up ("missed") when they could still fuse it together (seen: one of two peers failed
    to find its partner, and the partner then skipped the round instead of fusing it alone).
    """
    return any(
        record.fused_round > local_round or (record.fused_round == local_round and record.last_group_size >= 2)
        for record in other_records
    )


def fusion_weight(weighting: str, num_examples: int) -> float:
    """A peer's weight in the average: 1 (plain mean, as in the paper) or its training-set size."""
    if weighting == "uniform":
        return 1.0
    if weighting == "examples":
        return float(max(num_examples, 1))
    raise ValueError(f"unknown weighting {weighting!r}")


def rounds_done(fused_round: int, target_rounds: int | None) -> bool:
    """``--rounds N`` stops a peer once it holds the swarm's fused round N."""
    return target_rounds is not None and fused_round >= target_rounds


def group_decision(own_peer_id: str, members: dict[str, dict], verdicts: Iterable[Verdict]) -> str | None:
    """Apply an all-reduce only when every other member confirmed a complete one (two-phase commit).

    Returns ``"apply"``, ``None`` (keep waiting) or the reason to roll back. Only verdicts carrying
    the nonce a member sent to this group count, so a verdict on another attempt (an earlier round,
    or another stage of this one) is ignored.
    """
    current = _verdicts_on_this_attempt(own_peer_id, members, verdicts)
    refused = [peer for peer, verdict in current.items() if not verdict.ok]
    if refused:
        return f"rolled back: the all-reduce was incomplete for {len(refused)} group member(s)"
    return "apply" if set(members) - {own_peer_id} <= set(current) else None


def refusers_look_again(own_peer_id: str, members: dict[str, dict], verdicts: Iterable[Verdict]) -> bool:
    """Whether every member that refused this attempt lost it to its own transport and looks again.

    Then the whole group rolled back (nobody applies a refused attempt) and every member may look
    again too: in CI a home peer's matchmaking gave up on a leader that still counted it, the two
    that saw it missing retried, and the third, refused, did not, so no group of three formed.
    """
    refusals = [
        verdict for verdict in _verdicts_on_this_attempt(own_peer_id, members, verdicts).values() if not verdict.ok
    ]
    return bool(refusals) and all(verdict.retry for verdict in refusals)


def _verdicts_on_this_attempt(
    own_peer_id: str, members: dict[str, dict], verdicts: Iterable[Verdict]
) -> dict[str, Verdict]:
    """The other members' verdicts that carry the nonce each sent to this group, by peer id."""
    others = set(members) - {own_peer_id}
    return {
        verdict.peer_id: verdict
        for verdict in verdicts
        if verdict.peer_id in others and verdict.nonce == members[verdict.peer_id].get("nonce")
    }


PLAIN_MEAN_RULE = "outer_lr=1,momentum=0,anchor=0"  # FusionRule().signature(): what a peer sending none uses


def contribution_kind(compression: str) -> str:
    """What a member's all-reduce carries: its ``body``, or with a lossy codec its ``drift`` from the original.

    A lossy codec's error scales with the range of what it encodes. Pretrained bodies hold outlier
    weights (in MiniLM a 7.9 among values of std 0.045) that hivemind's 6-sigma-wide 8-bit codebook
    clips: averaging the weights through int8 moved such a weight by 6.87 and left the members on
    bases up to 6.96 apart (docs/measurements/compression). The drift from the original (--model's
    body, the same on every member: the averager's prefix holds its fingerprint) is small and even,
    so the same codec loses little of it, and the mean is the same: mean(b_i - o) + o = mean(b_i).
    """
    return "body" if compression == "none" else "drift"


def group_mismatch(
    members: dict[str, dict],
    round_number: int,
    aggregation: str,
    fusion_rule: str = PLAIN_MEAN_RULE,
    contribution: str = "body",
) -> str | None:
    """Why a formed group must not fuse (members of other rounds, mixed aggregation or fusion rules,
    bodies mixed with drifts; with bounded groups, mixed stages or member lists), or None.

    Each reducer applies its own peer's rule to its slice, so a group mixing ``mean`` and
    ``clipped_mean`` would be robust on some slices only. Each member turns the average into the
    next base with its own fusion rule (outer optimizer, anchor), so a group mixing fusion rules
    would end with different bases. A reducer averaging one member's body with another's drift
    (:func:`contribution_kind`) would produce neither.
    """
    rounds = {member.get("round") for member in members.values()}
    if rounds != {round_number}:
        return f"group disagreed on the round ({', '.join(sorted(map(str, rounds)))})"
    rules = {member.get("aggregation", "mean") for member in members.values()}
    if rules != {aggregation}:
        return f"group mixed aggregation rules ({', '.join(sorted(map(str, rules)))}): use one --aggregation per run"
    fusion_rules = {member.get("fusion_rule", PLAIN_MEAN_RULE) for member in members.values()}
    if fusion_rules != {fusion_rule}:
        return (
            f"group mixed fusion rules ({'; '.join(sorted(map(str, fusion_rules)))}): "
            "use the same --outer-lr, --outer-momentum and --anchor on every peer of a run"
        )
    stages = {member.get("stage") for member in members.values()}
    if len(stages) > 1:
        return f"group mixed fusion stages ({', '.join(sorted(map(str, stages)))})"
    grids = {member.get("members_digest") for member in members.values()}
    if len(grids) > 1:
        return "group's members saw different member lists for the round: they placed the peers on different grids"
    kinds = {member.get("contribution", "body") for member in members.values()}
    if kinds != {contribution}:
        return (
            "group mixed --compression none with a lossy one (fp16, int8), which send drifts, not bodies: "
            "use none on every peer of a run or a lossy one on every peer"
        )
    return None


def same_start(sketches: Iterable, update_norms: Iterable[float], tolerance: float = 0.1) -> bool:
    """Whether every member of a group started the round from the same fused base (up to rounding).

    A fusion rule other than the plain mean steps from the round's start, so members with different
    starts (after a round each fused alone) would compute different bases. Decided from the members'
    gathered start sketches only, the same on every member: starts farther apart than ``tolerance``
    times the median update (sketch error ~9%, rounding and fp16 far below) are different.
    """
    try:
        vectors = [[float(value) for value in sketch] for sketch in sketches]
    except (TypeError, ValueError):
        return False
    if not vectors or len({len(vector) for vector in vectors}) != 1:
        return False
    norms = sorted(norm for norm in update_norms if norm == norm and norm >= 0)
    scale = max((sum(value * value for value in vector) ** 0.5 for vector in vectors), default=0.0)
    limit = tolerance * (norms[len(norms) // 2] if norms else 0.0) + 1e-6 * scale
    first = vectors[0]
    return all(sum((a - b) ** 2 for a, b in zip(first, other, strict=True)) ** 0.5 <= limit for other in vectors[1:])


def incompatible_swarm(other_records: Iterable[PeerRecord], model_fingerprint: str) -> str | None:
    """The swarm's model fingerprint when every live contributor runs another model than ours, else None."""
    fingerprints = {record.model_fingerprint for record in other_records if record.model_fingerprint}
    if fingerprints and model_fingerprint not in fingerprints:
        return sorted(fingerprints)[0]
    return None


def poisoned_update(
    fused_norm: float,
    own_norm: float,
    member_norms: Iterable[float],
    max_ratio: float,
    start_gaps: Iterable[float] = (),
    honest_bounds: Iterable[float] = (),
) -> bool:
    """Whether the fused update is implausibly large: more than ``max_ratio`` times the typical update.

    The mean of honest updates is never longer than the longest of them; one peer sending a 100x
    update makes the average about 100/N times the typical one. "Typical" is the larger of our own
    update and the median the members reported (a liar can only make the check stricter for itself).

    Members may have started the round from different bodies (after a round that failed, each kept
    its own): the average then also moves by the gap between the starts, which the guard must not
    take for poison or fusion would never resume. ``start_gaps`` are the estimated distances from
    our start to each member's; their median (robust to one liar in groups of three or more)
    widens "typical".

    A group whose members have converged makes tiny updates (their losses, hence gradients, are
    near zero), and a newcomer's honest first update is then a hundred times theirs. So an update
    is never called poisoned while the fused update is no longer than one honest round could make:
    ``honest_bounds`` are the members' ``adam_update_bound`` (their median, robust to one liar).

    The norms' and bounds' medians are the lower ones: in a pair (stage groups of 2) the upper median
    is the other member's own claim, so a liar declaring its 100x update would vouch for itself.
    """
    median = lower_median(member_norms)
    gaps = sorted(gap for gap in start_gaps if gap == gap and gap >= 0)
    start_gap = gaps[len(gaps) // 2] if gaps else 0.0  # the upper one: a pair's gaps are (0, the real gap)
    reference = max(own_norm, median, 1e-12) + start_gap
    honest_limit = lower_median(honest_bounds)
    return not fused_norm <= max(max_ratio * reference, honest_limit)  # NaN counts as poisoned


def lower_median(values: Iterable[float]) -> float:
    """The lower median of the finite, non-negative values (0 for none): one high claim never raises it."""
    kept = sorted(value for value in values if value == value and 0 <= value < float("inf"))
    return kept[(len(kept) - 1) // 2] if kept else 0.0


def adam_update_bound(lr: float, steps: int, num_values: int) -> float:
    """How far ``steps`` AdamW steps at peak rate ``lr`` can honestly move ``num_values`` weights.

    Adam's step per weight is ``lr * m / sqrt(v)``, about ``lr`` at most once its moments settle:
    ``lr * steps * sqrt(num_values)`` bounds a round's update norm whatever the gradients' scale.
    """
    return lr * steps * num_values**0.5
