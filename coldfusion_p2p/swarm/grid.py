"""Bounded groups (Moshpit averaging): where each peer sits on a virtual grid, and whom it averages with.

One all-reduce group for the whole swarm fails as soon as one of its N members fails, so a round
fuses with probability (1 - p)^N. Moshpit averaging (Ryabinin et al., 2021, and hivemind's group
keys) bounds groups instead: the peers of a round sit on a grid of ``group_size ** stages`` cells,
and in stage ``s`` every peer averages with the peers that share all its coordinates but the
``s``-th. With a full grid every peer ends the round holding the global mean; a failed group
costs only its own members that stage.

Everything here is a pure function of the peers' ids and the round, so that every peer forms the
same groups from the same view of the swarm: the peers (:mod:`coldfusion_p2p.swarm.stages`, with
``--target-group-size``) and the large-swarm simulator (:mod:`coldfusion_p2p.apps.large_swarm`).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence


def stages_needed(peers: int, group_size: int) -> int:
    """The fewest stages whose full grid holds ``peers`` in groups of at most ``group_size``."""
    if group_size < 2:
        raise ValueError("groups need at least 2 peers")
    return max(1, math.ceil(math.log(max(peers, 1)) / math.log(group_size) - 1e-9))


def grid_positions(peer_ids: Iterable[str], round_number: int) -> dict[str, int]:
    """Each peer's cell index this round: its rank in a hash order that changes every round.

    Reshuffling each round mixes different peers each time, and spreads the gaps of a grid that is
    not full over everyone instead of always the same peers.
    """

    def order(peer_id: str) -> str:
        return hashlib.sha256(f"{round_number}:{peer_id}".encode()).hexdigest()

    return {peer_id: rank for rank, peer_id in enumerate(sorted(set(peer_ids), key=order))}


def coordinates(position: int, group_size: int, stages: int) -> tuple[int, ...]:
    """The cell's coordinates, base ``group_size`` digits; the last one is unbounded, so that more
    peers than cells still each get a cell (the last stage's groups then grow past ``group_size``)."""
    digits = []
    for _ in range(stages - 1):
        position, digit = divmod(position, group_size)
        digits.append(digit)
    return (*digits, position)


def stage_key(cell: Sequence[int], stage: int) -> tuple[int, ...]:
    """What the members of one stage's group share: every coordinate but the stage's own."""
    return tuple(value for axis, value in enumerate(cell) if axis != stage)


def stage_groups(positions: dict[str, int], group_size: int, stages: int, stage: int) -> list[list[str]]:
    """The groups of ``stage``: peers with the same :func:`stage_key`, each sorted by position."""
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for peer_id, position in sorted(positions.items(), key=lambda item: item[1]):
        groups[stage_key(coordinates(position, group_size, stages), stage)].append(peer_id)
    return list(groups.values())


STAGE_BITS = 24  # group-key bits of one stage's group: distinct groups collide with odds ~groups / 2**24


def stage_group_bits(round_number: int, stage: int, key: Sequence[int]) -> str:
    """hivemind group-key bits shared by exactly one stage group of one round: its members meet under
    them, and no other group does (two groups that collided would fail their member check)."""
    digest = hashlib.sha256(f"{round_number}:{stage}:{tuple(key)}".encode()).digest()
    return format(int.from_bytes(digest[:4], "big") % (1 << STAGE_BITS), f"0{STAGE_BITS}b")


def own_stage_group(positions: dict[str, int], peer_id: str, group_size: int, stages: int, stage: int) -> list[str]:
    """The members of ``peer_id``'s group in ``stage`` (itself included), sorted by position."""
    return next(group for group in stage_groups(positions, group_size, stages, stage) if peer_id in group)
