"""The test-only fault seam: off unless its variables are set, read once, exact when on."""

from __future__ import annotations

import pytest
import torch

from coldfusion_p2p.swarm.faults import (
    CRASH_IN_ALLREDUCE_ENV,
    LOSE_ATTEMPT_ENV,
    MISS_GROUP_ENV,
    SCALE_UPDATE_ENV,
    Faults,
)


def test_no_variables_means_no_faults():
    faults = Faults.from_environment({})
    assert faults == Faults() and not faults.crashes_in(1, None) and faults.scale_update is None
    assert faults.group_bits("0001", 1) == "0001"
    body, start = [torch.ones(3)], [torch.zeros(3)]
    faults.poison_update(body, start)
    assert torch.equal(body[0], torch.ones(3))


def test_the_variables_turn_the_faults_on():
    faults = Faults.from_environment({CRASH_IN_ALLREDUCE_ENV: "1", SCALE_UPDATE_ENV: "100"})
    assert faults.crashes_in(1, None) and faults.crashes_in(1, 1) and not faults.crashes_in(2, None)
    stage_two = Faults.from_environment({CRASH_IN_ALLREDUCE_ENV: "1:2"})
    assert stage_two.crashes_in(1, 1) and not stage_two.crashes_in(1, 0), "round 1, stage 2 (0-based 1 in the info)"
    body, start = [torch.full((3,), 1.5)], [torch.ones(3)]
    faults.poison_update(body, start)
    assert torch.allclose(body[0], torch.full((3,), 51.0))  # start + 100 x the update of 0.5
    nan = [torch.ones(2)]
    Faults.from_environment({SCALE_UPDATE_ENV: "nan"}).poison_update(nan, [torch.zeros(2)])
    assert torch.isnan(nan[0]).all()
    assert not any(Faults.from_environment({CRASH_IN_ALLREDUCE_ENV: "0"}).crashes_in(n, None) for n in (0, 1, 2))


def test_an_attempt_is_lost_once_in_its_round_and_at_its_point_only():
    faults = Faults.from_environment({LOSE_ATTEMPT_ENV: "2:start"})
    assert not faults.loses_attempt(1, "start") and not faults.loses_attempt(2, "end")
    assert faults.loses_attempt(2, "start"), "round 2's first all-reduce is lost as its group forms"
    assert not faults.loses_attempt(2, "start"), "... and its next one goes through"
    assert Faults.from_environment({LOSE_ATTEMPT_ENV: "3"}).loses_attempt(3, "end"), "at the end by default"
    assert not Faults.from_environment({}).loses_attempt(2, "end")
    with pytest.raises(ValueError, match="R:start or R:end"):
        Faults.from_environment({LOSE_ATTEMPT_ENV: "2:middle"})


def test_a_missed_group_is_missed_once_in_its_round_only():
    faults = Faults.from_environment({MISS_GROUP_ENV: "2"})
    assert faults.group_bits("0001", 1) == "0001"
    assert faults.group_bits("0010", 2) != "0010", "round 2's first matchmaking goes where nobody is"
    assert faults.group_bits("0010", 2) == "0010", "... and its next one where the others are"
