"""The evaluation's statistics: majority-class rates and paired bootstrap deltas with a CI.

Two bases are compared on the *same* test examples and seeds, so the comparison is paired: for
each seed and test example, the difference of the two bases' correctness (-1, 0 or +1). The
delta is the mean of those differences; its confidence interval comes from a two-way bootstrap
that resamples seeds and test examples (independently, with replacement) and keeps both bases'
outcomes of a drawn (seed, example) together. The pairing removes the variation that is a
property of the examples (easy ones are right for both bases); resampling the seeds keeps the
variation between training runs, which one seed cannot show at all.

Everything here is pure numpy and seeded: the same inputs and seed give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
RESAMPLES = 2000
CONFIDENCE = 0.95
TOLERANCE = 1e-9  # accuracies are ratios of counts: "at" the majority rate means equal up to rounding


@dataclass(frozen=True)
class DeltaEstimate:
    """A paired delta (other minus reference) and the bounds of its bootstrap confidence interval."""

    delta: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    """The verdict of an interval: better when it lies above 0, worse when below, else no detectable difference."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def majority_rate(labels: Sequence[int] | np.ndarray) -> float:
    """Accuracy of always predicting the most common label (0 for no labels)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return 0.0
    return float(np.bincount(labels).max()) / len(labels)


def at_majority(accuracy: float, rate: float) -> bool:
    """True when an accuracy is at or below the majority-class rate: the model learned nothing visible."""
    return accuracy <= rate + TOLERANCE


def encode_correct(correct: Sequence[bool] | np.ndarray) -> str:
    """Per-example correctness as a string of 0 and 1, one character per test example in order."""
    return "".join("1" if value else "0" for value in np.asarray(correct, dtype=bool))


def decode_correct(text: str) -> np.ndarray:
    """The inverse of :func:`encode_correct`: a bool array."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def bootstrap_deltas(reference: np.ndarray, other: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` bootstrap replicates of mean(other - reference), seeds and examples resampled.

    ``reference`` and ``other`` are (seeds, examples) arrays of 0/1 correctness, row ``s`` and
    column ``e`` of both being the same seed and the same test example. A replicate draws
    ``seeds`` seeds and ``examples`` examples with replacement and averages the paired
    differences over every drawn (seed, example); it is computed from the draw counts
    (multinomial), so no (resamples, seeds, examples) array is ever built.
    """
    difference = np.atleast_2d(np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    seeds, examples = difference.shape
    if seeds == 0 or examples == 0:
        raise ValueError("need at least one seed and one example")
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples)
    example_counts = rng.multinomial(examples, np.full(examples, 1.0 / examples), size=resamples)
    return ((seed_counts @ difference) * example_counts).sum(axis=1) / (seeds * examples)


def paired_delta(
    reference: np.ndarray,
    other: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> DeltaEstimate:
    """Delta of ``other`` over ``reference`` on one dataset, with its percentile bootstrap CI."""
    return aggregate_delta([(reference, other)], resamples=resamples, seed=seed, confidence=confidence)


def aggregate_delta(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> DeltaEstimate:
    """The mean over datasets of per-dataset paired deltas; each dataset resampled on its own.

    ``pairs`` holds one (reference, other) pair of (seeds, examples) arrays per dataset; datasets
    may differ in size and seeds. A replicate of the aggregate is the mean of one replicate per
    dataset, so every dataset weighs the same whatever its number of test examples.
    """
    if not pairs:
        raise ValueError("no dataset to compare on")
    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean(np.asarray(o, float) - np.asarray(r, float)) for r, o in pairs]))
    replicates = np.mean([bootstrap_deltas(r, o, resamples, rng) for r, o in pairs], axis=0)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return DeltaEstimate(point, float(low), float(high))
