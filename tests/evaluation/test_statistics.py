"""Paired bootstrap deltas, verdicts and majority-class rates on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from coldfusion_p2p.evaluation.statistics import (
    aggregate_delta,
    at_majority,
    decode_correct,
    encode_correct,
    majority_rate,
    paired_delta,
    verdict,
)


def outcomes(correct: int, total: int, offset: int = 0) -> np.ndarray:
    """One seed's correctness: ``correct`` examples right, starting at ``offset``."""
    row = np.zeros(total, dtype=bool)
    row[offset : offset + correct] = True
    return row[None, :]


def test_identical_bases_have_delta_zero_and_a_zero_width_interval():
    rng = np.random.default_rng(3)
    reference = rng.random((3, 200)) < 0.6
    estimate = paired_delta(reference, reference.copy())
    assert (estimate.delta, estimate.low, estimate.high) == (0.0, 0.0, 0.0)
    assert estimate.verdict == "no detectable difference"


def test_thirty_more_right_of_a_hundred_is_plus_030_and_excludes_zero():
    reference = outcomes(50, 100)
    other = outcomes(80, 100)  # right on the same 50 and on 30 more
    estimate = paired_delta(reference, other)
    assert estimate.delta == pytest.approx(0.30)
    assert 0.15 < estimate.low < 0.30 < estimate.high < 0.45
    assert estimate.verdict == "better"
    worse = paired_delta(other, reference)
    assert worse.delta == pytest.approx(-0.30) and worse.verdict == "worse"
    assert worse.low == pytest.approx(-estimate.high) and worse.high == pytest.approx(-estimate.low)


def test_pairing_detects_a_small_consistent_gain_that_unpaired_resampling_would_not():
    # both right on the same 50 examples; the other base also on 5 more. Unpaired, the two
    # accuracies (0.50 and 0.55) each vary by about +-0.1 and the interval would include 0.
    estimate = paired_delta(outcomes(50, 100), outcomes(55, 100))
    assert estimate.delta == pytest.approx(0.05)
    assert estimate.low > 0 and estimate.high < 0.12
    # the same accuracies on disjoint examples: no pairing benefit, no detectable difference
    disjoint = paired_delta(outcomes(50, 100), outcomes(55, 100, offset=45))
    assert disjoint.delta == pytest.approx(0.05) and disjoint.low < 0 < disjoint.high


def test_seeds_are_resampled():
    # seed 0: +0.30, seed 1: -0.30. Pooling the examples of both seeds would give a tight
    # interval around 0; resampling seeds draws "seed 0 twice" a quarter of the time (+0.30).
    reference = np.vstack([outcomes(50, 100), outcomes(80, 100)])
    other = np.vstack([outcomes(80, 100), outcomes(50, 100)])
    estimate = paired_delta(reference, other)
    assert estimate.delta == pytest.approx(0.0)
    assert estimate.high > 0.2 and estimate.low < -0.2
    assert estimate.verdict == "no detectable difference"


def test_the_interval_shrinks_with_more_examples():
    widths = []
    for total in (100, 400, 1600):
        estimate = paired_delta(outcomes(total // 2, total), outcomes(total // 2 + total // 10, total))
        assert estimate.delta == pytest.approx(0.10)
        widths.append(estimate.high - estimate.low)
    assert widths[0] > 1.6 * widths[1] > 2.56 * widths[2]  # about 1/sqrt(n): halves per 4x examples


def test_the_interval_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    reference, other = rng.random((2, 300)) < 0.5, rng.random((2, 300)) < 0.6
    first = paired_delta(reference, other, seed=7)
    assert paired_delta(reference, other, seed=7) == first
    assert paired_delta(reference, other, seed=8) != first
    assert paired_delta(reference, other, seed=7, resamples=500) != first


def test_aggregate_is_the_mean_of_per_dataset_deltas_resampled_within_each():
    small = (outcomes(50, 100), outcomes(80, 100))  # +0.30
    large = (outcomes(500, 1000), outcomes(600, 1000))  # +0.10
    estimate = aggregate_delta([small, large])
    assert estimate.delta == pytest.approx(0.20)  # each dataset weighs the same, whatever its size
    assert estimate.low < 0.20 < estimate.high and estimate.verdict == "better"
    alone = paired_delta(*small)
    assert estimate.high - estimate.low < alone.high - alone.low  # averaging narrows
    same = outcomes(50, 100)
    assert aggregate_delta([(same, same), (same, same)]) == paired_delta(same, same)
    with pytest.raises(ValueError):
        aggregate_delta([])


def test_verdicts():
    assert verdict(0.01, 0.2) == "better"
    assert verdict(-0.2, -0.01) == "worse"
    assert verdict(-0.01, 0.2) == verdict(0.0, 0.0) == verdict(0.0, 0.1) == "no detectable difference"


def test_majority_rate_and_at_majority():
    assert majority_rate([0, 1, 1, 2, 1]) == pytest.approx(0.6)
    assert majority_rate([]) == 0.0
    assert at_majority(0.6, 0.6) and at_majority(3 / 5, 0.6) and at_majority(0.4, 0.6)
    assert not at_majority(0.61, 0.6)


def test_correctness_round_trips_as_a_bit_string():
    correct = np.array([True, False, False, True, True])
    assert encode_correct(correct) == "10011"
    assert decode_correct("10011").tolist() == correct.tolist()
    assert decode_correct("").shape == (0,)
