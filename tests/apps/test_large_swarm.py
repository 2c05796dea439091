"""The large-swarm simulator: one group against bounded groups, all or nothing per group."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coldfusion_p2p.apps.large_swarm import Scenario, butterfly_seconds, simulate_round, summarize


def test_without_failures_both_one_group_and_a_full_grid_reach_the_exact_mean():
    for group_size in (None, 4):
        stages = simulate_round(
            Scenario(peers=16, group_size=group_size, failure_probability=0.0), np.random.default_rng(0)
        )
        assert stages[-1].exact == 1.0 and stages[-1].reached == 1.0 and stages[-1].distance < 1e-9
    bounded = simulate_round(Scenario(peers=16, group_size=4, failure_probability=0.0), np.random.default_rng(0))
    assert len(bounded) == 2 and 0.2 < bounded[0].distance < 1.0  # after stage 1 only the row means
    assert [stage.groups for stage in bounded] == [4, 4]


def test_one_failure_rolls_back_one_group_for_all_and_only_its_group_when_bounded():
    one = simulate_round(Scenario(peers=16, group_size=None, failure_probability=1 / 16), np.random.default_rng(3))
    failed = one[0].failed_groups
    assert failed in (0, 1)
    if failed:  # all or nothing: nobody holds anything but its own body
        assert one[0].fused == 0.0 and one[0].distance > 0.9
    summary = summarize(Scenario(peers=64, group_size=None, failure_probability=0.02), trials=400, seed=1)
    expected = (1 - 0.02) ** 64
    margin = 4 * math.sqrt(expected * (1 - expected) / 400)
    assert abs(summary.fused - expected) < margin, (summary.fused, expected)
    bounded = summarize(Scenario(peers=64, group_size=8, failure_probability=0.02), trials=100, seed=1)
    assert bounded.fused > 0.95 and bounded.distance < 0.1 and summary.distance > 0.5


def test_bytes_and_time_follow_the_butterfly_all_reduce():
    scenario = Scenario(peers=16, group_size=4, failure_probability=0.0, payload_mb=100.0)
    stages = simulate_round(scenario, np.random.default_rng(0))
    assert [stage.megabytes_per_peer for stage in stages] == pytest.approx([150.0, 150.0])  # 2 (4-1)/4 x 100
    assert stages[0].seconds == pytest.approx(butterfly_seconds(4, scenario))
    link = scenario.link
    assert butterfly_seconds(4, scenario) == pytest.approx(
        1.5 * 100 * 8 / link.bandwidth_mbit + 4 * link.latency_ms / 1000 + link.matchmaking_seconds
    )
