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

**TIES** (``ties``, arXiv 2306.01708) merges the members' updates instead of averaging them, to
limit interference between tasks: each member *trims* its own update to the ``ties_density``
fraction of its largest-magnitude entries per tensor before sending (:func:`trim_update`; it only
concerns that member's own values), and the reducer *elects* a sign per coordinate (that of the
weighted sum of the trimmed updates) and takes the *disjoint mean*: the weighted mean of only the
updates that agree with the elected sign (:func:`ties_merge`). Sign election and disjoint mean
are per coordinate, so they give the same result however hivemind cuts the body into slices:
the simulator computes them on whole tensors and gets the swarm's base.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

Aggregation = Literal["mean", "clipped_mean", "ties"]
Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]  # (updates, weights) -> merged update


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


ROUNDING_FLOOR = 1e-6  # relative to the weight: differences this small are float32 rounding, not updates


def update_against(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor - reference``, with differences at float32 rounding level set to exactly zero.

    Members' copies of the last fused base agree only up to rounding (the all-reduce applies
    ``local + (average - local)``), so an entry a member left untouched still differs from the
    reducer's reference by ~1e-7 of the weight. TIES must not count such noise as a vote.
    """
    update = tensor.float() - reference.float()
    return torch.where(update.abs() <= ROUNDING_FLOOR * reference.float().abs(), torch.zeros_like(update), update)


def trim_update(update: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``density`` fraction of largest-magnitude entries of ``update``, zero the rest.

    Entries equal to the threshold are all kept, so the result depends on the values only.
    """
    flat = update.detach().reshape(-1).float()
    keep = max(1, math.ceil(round(density * flat.numel(), 6)))  # round: 0.3 * 10 is 3.0000000000000004
    if keep >= flat.numel():
        return update.clone()
    threshold = torch.kthvalue(flat.abs(), flat.numel() - keep + 1).values
    return torch.where(update.abs() >= threshold.to(update.dtype), update, torch.zeros_like(update))


def contribution(
    body: Sequence[torch.Tensor], start: Sequence[torch.Tensor], aggregation: str, ties_density: float
) -> list[torch.Tensor]:
    """What a member sends: its body, or with ``ties`` the start plus its trimmed update (TIES' trim
    is each member's own business: it only concerns its own values)."""
    if aggregation != "ties":
        return list(body)
    with torch.no_grad():
        return [
            origin + trim_update(tensor.detach() - origin, ties_density)
            for tensor, origin in zip(body, start, strict=True)
        ]


def ties_merge(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect and disjoint mean of (trimmed) updates, per coordinate.

    The elected sign is that of the weighted sum; the result is the weighted mean of the updates
    whose entry is non-zero with that sign, and zero where none is. Pure: tests call it directly.
    """
    if not updates:
        raise ValueError("no contributions to aggregate")
    stacked = torch.stack([update.float() for update in updates])
    weight = torch.tensor([float(value) for value in weights], dtype=torch.float32).reshape(-1, *[1] * updates[0].dim())
    elected = torch.sign((weight * stacked).sum(0))
    agrees = (torch.sign(stacked) == elected) & (stacked != 0)
    numerator = (weight * stacked * agrees).sum(0)
    denominator = (weight * agrees).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), torch.zeros_like(numerator))


def combiner(aggregation: str, clip_ratio: float) -> Combine | None:
    """How a reducer merges the updates of its slice; None for the plain mean (hivemind's own sum)."""
    if aggregation == "clipped_mean":
        return functools.partial(clipped_mean, clip_ratio=clip_ratio)
    if aggregation == "ties":
        return ties_merge
    return None


class UpdateContributions:
    """Stands in for hivemind's running sum of one part: it keeps every sender's contribution as an
    update against the reference and merges them with ``combine`` when hivemind divides by the
    total weight.

    hivemind 1.1's ``TensorPartReducer`` only calls ``accumulator.add_(part, alpha=weight)`` per
    sender and ``accumulator.div_(denominator)`` once all have sent; this object implements exactly
    that protocol (pinned in pyproject.toml, checked by tests/merge/test_aggregation.py).
    """

    def __init__(self, reference: torch.Tensor, combine: Combine):
        self.reference, self.combine = reference, combine
        self.updates: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, tensor_part: torch.Tensor, alpha: float = 1.0) -> UpdateContributions:
        self.updates.append(update_against(tensor_part, self.reference))
        self.weights.append(float(alpha))
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        del denominator  # the merge normalises by its own weights
        result = self.reference.float() + self.combine(self.updates, self.weights)
        return result.to(self.reference.dtype)


class ReferenceReducer(TensorPartReducer):
    """A ``TensorPartReducer`` whose per-part sum is an :class:`UpdateContributions` with ``combine``."""

    def __init__(self, part_shapes, num_senders: int, reference_parts: Sequence[torch.Tensor], combine: Combine):
        self.reference_parts, self.combine = list(reference_parts), combine
        super().__init__(part_shapes, num_senders)
        if [tuple(part.shape) for part in self.reference_parts] != [tuple(shape) for shape in part_shapes]:
            self.finalize()
            raise ValueError("the reference parts do not match the parts this peer reduces")

    def reset_accumulators(self):
        super().reset_accumulators()
        if not self.finished.is_set() and self.current_part_index < len(self.reference_parts):
            reference = self.reference_parts[self.current_part_index]
            self.accumulator = UpdateContributions(reference, self.combine)


class ClippedMeanReducer(ReferenceReducer):
    """The reducer of ``clipped_mean``."""

    def __init__(self, part_shapes, num_senders: int, reference_parts: Sequence[torch.Tensor], clip_ratio: float):
        super().__init__(part_shapes, num_senders, reference_parts, combiner("clipped_mean", clip_ratio))


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
