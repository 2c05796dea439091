"""What a group does with its averaged body: the fusion rule, applied identically on every member.

The all-reduce (hivemind's, or the reducer-side rules of :mod:`coldfusion_p2p.merge.aggregation`) gives
every member the same average of the bodies, up to float32 rounding. A *fusion rule* turns that
average into the next fused base. It is a pure function of values every member of the group holds
equally: the average, the last fused base the round started from, the original pretrained body
and the rule's own state, which travels with the fused base (checkpoints, state downloads, the
archive). So every member computes the same next base, and a peer that joins later continues
with exactly the state the group had.

* **plain mean** (the paper): the next base is the average (``outer_lr`` 1, no momentum, no anchor);
* **outer optimizer** (DiLoCo, arXiv 2311.08105): the group's *pseudo-gradient* is
  ``last base - average``; SGD with Nesterov momentum on it moves the base ``outer_lr`` times
  further along the averaged update, and momentum carries direction across rounds;
* **anchor** (WiSE-FT, arXiv 2109.01903): interpolate the new base a fraction ``anchor`` back
  toward the original pretrained weights, which limits specialisation to the contributors' tasks.

>>> rule = FusionRule(outer_lr=0.7, outer_momentum=0.9)
>>> step = rule.apply(last_base, average, original, rule.initial_state(last_base))
>>> next_base, state = step.base, step.state
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class RuleStep:
    base: list[torch.Tensor]  # the next fused base
    state: list[torch.Tensor]  # the rule's state after this round (momentum buffers; empty without momentum)


@dataclass(frozen=True)
class FusionRule:
    """The fusion rule of a run; every member of a group must use the same one (see :meth:`signature`)."""

    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    anchor: float = 0.0

    @classmethod
    def from_config(cls, config) -> FusionRule:
        return cls(outer_lr=config.outer_lr, outer_momentum=config.outer_momentum, anchor=config.anchor)

    @property
    def is_plain_mean(self) -> bool:
        return self.outer_lr == 1.0 and self.outer_momentum == 0.0 and self.anchor == 0.0

    @property
    def has_state(self) -> bool:
        return self.outer_momentum > 0.0

    @property
    def needs_original(self) -> bool:
        return self.anchor > 0.0

    def signature(self) -> str:
        """A short text that differs between rules: gathered from every member and compared."""
        return f"outer_lr={self.outer_lr:g},momentum={self.outer_momentum:g},anchor={self.anchor:g}"

    def initial_state(self, body: Tensors) -> list[torch.Tensor]:
        """The state before any fusion: zero momentum (nothing without momentum)."""
        return [torch.zeros_like(tensor, dtype=torch.float32) for tensor in body] if self.has_state else []

    def apply(self, last_base: Tensors, average: Tensors, original: Tensors | None, state: Tensors) -> RuleStep:
        """The next fused base and state from the group's average; pure (inputs are not modified)."""
        if self.needs_original and original is None:
            raise ValueError("the anchor rule needs the original body")
        if self.has_state and len(state) != len(average):
            raise ValueError(f"the rule's state has {len(state)} tensors, the body {len(average)}")
        bases, states = [], []
        with torch.no_grad():
            for index, (start, mean) in enumerate(zip(last_base, average, strict=True)):
                start32, mean32 = start.float(), mean.float()
                if self.is_plain_mean:
                    bases.append(mean.clone())
                    continue
                pseudo_gradient = start32 - mean32
                if self.has_state:
                    momentum = self.outer_momentum * state[index].float() + pseudo_gradient
                    direction = pseudo_gradient + self.outer_momentum * momentum  # Nesterov
                    states.append(momentum)
                else:
                    direction = pseudo_gradient
                new = start32 - self.outer_lr * direction
                if self.anchor > 0.0:
                    new = torch.lerp(new, original[index].float(), self.anchor)
                bases.append(new.to(mean.dtype))
        return RuleStep(base=bases, state=states)


def apply_in_place(
    rule: FusionRule,
    body: list[torch.Tensor],
    last_base: Tensors,
    average: Tensors,
    original: Tensors | None,
    state: list[torch.Tensor],
) -> None:
    """Write the rule's next base into ``body`` and its next state into ``state`` (same order)."""
    step = rule.apply(last_base, average, original, state)
    with torch.no_grad():
        for target, value in zip(body, step.base, strict=True):
            target.copy_(value)
        for target, value in zip(state, step.state, strict=True):
            target.copy_(value)
