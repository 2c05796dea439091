"""A round's fusion windows: when its all-reduce starts, and with whom, read from the swarm's records.

Every peer decides alone, from the same records (the decisions are :mod:`policy`'s), so that the
peers of a round meet at one time: the first window, open until the swarm is ready or its time has
come, and after an attempt our transport lost, a second look with the members that lost it too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

from hivemind.utils import get_dht_time

from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.presence import Presence, record_ttl
from coldfusion_p2p.swarm.records import PeerRecord

MEMBER_READS = 4  # bounded groups: reads of the round's member list, until two in a row agree


class FusionWindow(NamedTuple):
    """How a round's fusion window ended for this peer (see :func:`wait_for_fusion_window`).

    ``decision``: ``fuse``, ``alone``, ``missed`` or ``stop``. To fuse: ``time`` (the scheduled
    all-reduce); ``group_size`` when the whole swarm is ready (the all-reduce may then start as soon
    as that many joined: :func:`policy.complete_group_size`); ``members`` with bounded groups.
    """

    decision: str
    time: float = 0.0
    group_size: int | None = None
    members: list[str] | None = None


def wait_for_fusion_window(presence: Presence, round_number: int, fusion_config: FusionConfig) -> FusionWindow:
    """Publish readiness, then wait for the round's fusion time (the decisions are :mod:`policy`'s).

    Bounded: the earliest proposal is at most ``fusion_window`` away. With bounded groups the
    peer that closes the window early also lists the round's members in its record, and every
    peer takes the list of the earliest proposal (:func:`policy.round_members`), so that all
    place the same peers on the same grid.
    """
    proposal = get_dht_time() + fusion_config.fusion_window
    presence.announce(status="ready", fuse_at=proposal)
    bounded = fusion_config.target_group_size is not None
    partner_seen_at = -math.inf  # when a partner's record was last read: a failed read returns none
    while not presence.stop_event.is_set():
        others = presence.read_others()
        if policy.has_partners(others, round_number):
            partner_seen_at = time.monotonic()
        if policy.missed_round(round_number, others):
            return FusionWindow("missed")
        everyone = [*others, presence.record()]
        presence.reducer_seen = presence.reducer_seen or not policy.no_reducer(everyone)
        scheduled = policy.fusion_time(everyone, round_number)
        now = get_dht_time()
        window: FusionWindow | None = None
        size = policy.complete_group_size(everyone, round_number, fusion_config.min_group_size)
        if not policy.has_partners(others, round_number):
            unseen = time.monotonic() - partner_seen_at
            if policy.partners_gone(
                unseen, record_ttl(presence.record_period), fusion_config.min_group_size, now, scheduled
            ):
                window = FusionWindow("alone")
        elif now >= scheduled - fusion_config.matchmaking_time:
            members = _agreed_members(presence, round_number, scheduled, everyone) if bounded else None
            window = FusionWindow("fuse", scheduled, size, members)
        elif size is not None:  # the whole swarm is here: close the window
            proposal = now + fusion_config.matchmaking_time
            members = policy.ready_peer_ids(everyone, round_number) if bounded else None
            presence.announce(fuse_at=proposal, fuse_members=members)
            if bounded:
                members = _agreed_members(
                    presence, round_number, min(scheduled, proposal), [*everyone, presence.record()]
                )
            window = FusionWindow("fuse", min(scheduled, proposal), size, members)
        if window is not None:
            if not presence.reducer_seen:  # clients only, ever: no group can form, alone or not
                raise UserError(
                    f"no peer of this swarm accepts inbound connections ({len(everyone)} seen, all in client "
                    "mode behind NAT or a firewall), so no group can form",
                    "run at least one peer on a public address (or with a forwarded port and --announce-maddrs)",
                )
            return window
        presence.stop_event.wait(presence.poll_seconds)
    return FusionWindow("stop")


def wait_for_second_look(presence: Presence, round_number: int, fusion_config: FusionConfig) -> FusionWindow:
    """A second window for ``round_number``, after an attempt our transport lost (peer.fuse_round).

    Only the lost attempt's members look again, so the swarm's first window does not apply: the
    others' proposals are past, and waiting for ``min_group_size`` would wait for peers that
    never come. The members learn of the loss at different times (one that left as the group
    formed at once, the others when they drop it as a silent sender), so this waits while
    another peer's first all-reduce of the round runs (bounded by ``fusion_window``), then fuses
    at once with every peer looking again (:func:`policy.second_look`), or ends alone.
    """
    waited_until = get_dht_time() + fusion_config.fusion_window
    presence.announce(status="ready", fuse_at=waited_until, attempt=1)
    seen_at = time.monotonic()  # we just had a group: reading nobody soon after is a failed read
    while not presence.stop_event.is_set():
        others = presence.read_others()
        if others:
            seen_at = time.monotonic()
        elif policy.maybe_a_failed_read(time.monotonic() - seen_at, record_ttl(presence.record_period)):
            presence.stop_event.wait(presence.poll_seconds)
            continue
        if policy.missed_round(round_number, others):
            return FusionWindow("missed")
        look, size = policy.second_look(others, round_number, waited_out=get_dht_time() >= waited_until)
        if look == "alone":
            return FusionWindow("alone")
        if look == "fuse":
            proposal = get_dht_time() + fusion_config.matchmaking_time
            presence.announce(fuse_at=proposal)
            partners = policy.looking_again(others, round_number)
            return FusionWindow(
                "fuse", min(policy.fusion_time([*partners, presence.record()], round_number), proposal), size
            )
        presence.stop_event.wait(presence.poll_seconds)
    return FusionWindow("stop")


def _agreed_members(presence: Presence, round_number: int, scheduled: float, seen: Sequence[PeerRecord]) -> list[str]:
    """The round's member list for bounded groups, read once every proposal had time to spread.

    Read right when a peer decides, the lists disagreed on 16 loaded peers: a closer's record not
    yet seen, or a DHT read that timed out and returned no records at all, so that peers placed
    the others on different grids and found no partner. So wait for the scheduled time (a few
    seconds), then read until the list stops changing (bounded), over the union of every record
    seen since the decision: a failed or partial read can add nothing, but never shrinks it."""
    presence.stop_event.wait(max(0.0, scheduled - get_dht_time()))
    known = {record.peer_id: record for record in seen}
    members = policy.round_members(known.values(), round_number)
    for _ in range(MEMBER_READS):
        for record in presence.read_others():
            if record.peer_id not in known or record.time >= known[record.peer_id].time:
                known[record.peer_id] = policy.newest_for_round(known.get(record.peer_id), record, round_number)
        latest = policy.round_members(known.values(), round_number)
        if latest == members:
            break
        members = latest
    return members
