"""How a reducer combines the group's contributions to its slice of the body: mean or clipped mean.

In hivemind's butterfly all-reduce every peer *reduces* one slice of the body: all members send it
their values of that slice and it returns the average. The plain mean lets one member move the
result as far as it likes (send 100 times your update and the base moves 100/N times as far).
Clipping on the sender's side would be up to the attacker, so the robust rule runs here, in the
reducer, on what it actually received:

* each contribution is turned into an *update* against the reference, the last fused base that
  every honest member started its round from;
* updates whose norm exceeds ``clip_ratio`` times the median update norm are scaled down to it,
  and claimed weights (example counts are as forgeable as updates) are capped at the median
  weight, so no single member counts for more than a typical one;
* the result is the reference plus the weighted mean of the clipped updates.

With a majority of honest members the median is an honest norm, so one attacker moves the slice
by at most ``clip_ratio`` honest updates divided by the group size, whatever it sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

Aggregation = Literal["mean", "clipped_mean"]


def clipped_mean(updates: Sequence[torch.Tensor], weights: Sequence[float], clip_ratio: float) -> torch.Tensor:
    """Weighted mean of ``updates`` after capping each norm at ``clip_ratio`` x the median norm.

    Weights are capped at the median weight for the same reason. Pure: tests call it directly.
    """
    if not updates:
        raise ValueError("no contributions to aggregate")
    norms = torch.stack([update.float().norm() for update in updates])
    bound = clip_ratio * float(norms.median())  # torch's median of an even count is the lower middle
    weight_cap = float(torch.tensor([float(weight) for weight in weights]).median())
    total = torch.zeros_like(updates[0], dtype=torch.float32)
    denominator = 0.0
    for update, norm, weight in zip(updates, norms.tolist(), weights, strict=True):
        scale = 1.0 if norm <= bound or norm == 0.0 else bound / norm
        capped = min(float(weight), weight_cap)
        total.add_(update.float(), alpha=scale * capped)
        denominator += capped
    return total / max(denominator, 1e-12)


class ClippedContributions:
    """Stands in for hivemind's running sum of one part: it keeps every sender's contribution and
    reduces them with :func:`clipped_mean` when hivemind divides by the total weight.

    hivemind 1.1's ``TensorPartReducer`` only calls ``accumulator.add_(part, alpha=weight)`` per
    sender and ``accumulator.div_(denominator)`` once all have sent; this object implements exactly
    that protocol (pinned in pyproject.toml, checked by tests/test_aggregation.py).
    """

    def __init__(self, reference: torch.Tensor, clip_ratio: float):
        self.reference, self.clip_ratio = reference, clip_ratio
        self.updates: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, tensor_part: torch.Tensor, alpha: float = 1.0) -> ClippedContributions:
        self.updates.append(tensor_part.float() - self.reference.float())
        self.weights.append(float(alpha))
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        del denominator  # the clipped mean normalises by its own (capped) weights
        result = self.reference.float() + clipped_mean(self.updates, self.weights, self.clip_ratio)
        return result.to(self.reference.dtype)


class ClippedMeanReducer(TensorPartReducer):
    """A ``TensorPartReducer`` whose per-part sum is a :class:`ClippedContributions`."""

    def __init__(self, part_shapes, num_senders: int, reference_parts: Sequence[torch.Tensor], clip_ratio: float):
        self.reference_parts, self.clip_ratio = list(reference_parts), clip_ratio
        super().__init__(part_shapes, num_senders)
        if [tuple(part.shape) for part in self.reference_parts] != [tuple(shape) for shape in part_shapes]:
            self.finalize()
            raise ValueError("the reference parts do not match the parts this peer reduces")

    def reset_accumulators(self):
        super().reset_accumulators()
        if not self.finished.is_set() and self.current_part_index < len(self.reference_parts):
            reference = self.reference_parts[self.current_part_index]
            self.accumulator = ClippedContributions(reference, self.clip_ratio)


def reference_parts(
    reference: Sequence[torch.Tensor], container: TensorPartContainer, peer_index: int
) -> tuple[torch.Tensor, ...]:
    """The slices of ``reference`` that peer ``peer_index`` reduces, split exactly like ``container``."""
    twin = TensorPartContainer(
        list(reference),
        container.peer_fractions,
        compression=container.compression,
        part_size_bytes=container.part_size_bytes,
        tensor_infos=container.tensor_infos,
    )
    return twin.get_raw_input_parts(peer_index)
