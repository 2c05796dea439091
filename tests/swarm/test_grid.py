"""The virtual grid of bounded groups: whom each peer averages with at each stage (pure functions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coldfusion_p2p.swarm.grid import (
    coordinates,
    grid_positions,
    stage_groups,
    stages_needed,
)

PEERS = [f"12D3KooW{index:04d}" for index in range(16)]


def average_through_stages(positions, group_size, stages, bodies, run_stages=None):
    """The first ``run_stages`` (all) stages: each group replaces its members' vectors with their
    weighted mean (weights: the contributions each holds)."""
    held = {peer: (bodies[peer].copy(), 1.0) for peer in positions}
    for stage in range(stages if run_stages is None else run_stages):
        for group in stage_groups(positions, group_size, stages, stage):
            total = sum(held[peer][1] for peer in group)
            mean = sum(held[peer][0] * held[peer][1] for peer in group) / total
            for peer in group:
                held[peer] = (mean, total)
    return {peer: vector for peer, (vector, _) in held.items()}


def test_stages_needed_is_the_smallest_full_grid():
    assert [stages_needed(n, 4) for n in (1, 4, 5, 16, 17, 64)] == [1, 1, 2, 2, 3, 3]
    assert [stages_needed(n, 8) for n in (16, 64, 65, 256, 1000)] == [2, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="at least 2"):
        stages_needed(10, 1)


def test_positions_are_a_permutation_that_every_peer_computes_alike_and_that_changes_each_round():
    first = grid_positions(PEERS, round_number=1)
    assert sorted(first.values()) == list(range(len(PEERS)))
    assert grid_positions(reversed(PEERS), round_number=1) == first  # the order of the view does not matter
    assert grid_positions(PEERS, round_number=2) != first


def test_a_full_grid_has_groups_of_exactly_k_and_every_pair_of_peers_meets_at_most_once():
    positions = grid_positions(PEERS, round_number=3)
    cells = {coordinates(position, 4, 2) for position in positions.values()}
    assert len(cells) == 16 and all(0 <= value < 4 for cell in cells for value in cell)
    met = set()
    for stage in range(2):
        groups = stage_groups(positions, 4, 2, stage)
        assert sorted(len(group) for group in groups) == [4] * 4
        assert sorted(itertools.chain(*groups)) == sorted(PEERS)  # a partition of the round's peers
        for group in groups:
            for pair in itertools.combinations(sorted(group), 2):
                assert pair not in met
                met.add(pair)


def test_after_the_last_stage_of_a_full_grid_every_peer_holds_the_global_mean():
    rng = np.random.default_rng(0)
    bodies = {peer: rng.standard_normal(8) for peer in PEERS}
    positions = grid_positions(PEERS, round_number=1)
    held = average_through_stages(positions, 4, 2, bodies)
    mean = np.mean(list(bodies.values()), axis=0)
    for vector in held.values():
        np.testing.assert_allclose(vector, mean, atol=1e-12)
    one_stage = average_through_stages(positions, 4, 2, bodies, run_stages=1)  # the first stage is not enough
    assert max(np.abs(vector - mean).max() for vector in one_stage.values()) > 0.1


def test_a_grid_that_is_not_full_comes_close_and_more_peers_than_cells_grow_the_last_stage():
    rng = np.random.default_rng(1)
    peers = PEERS[:13]
    bodies = {peer: rng.standard_normal(8) for peer in peers}
    held = average_through_stages(grid_positions(peers, 1), 4, 2, bodies)
    mean = np.mean(list(bodies.values()), axis=0)
    spread = np.sqrt(np.mean([((body - mean) ** 2).sum() for body in bodies.values()]))
    distances = [np.sqrt(((vector - mean) ** 2).sum()) / spread for vector in held.values()]
    assert max(distances) < 0.2 and min(distances) < 1e-9
    crowded = stage_groups(grid_positions(PEERS, 1), 2, 3, stage=2)  # 16 peers on 2 x 2 x (unbounded) cells
    assert sorted(len(group) for group in crowded) == [4] * 4
