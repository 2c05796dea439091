"""The fusion rule on known tensors: the plain mean, the outer optimizer and the anchor."""

from __future__ import annotations

import pytest
import torch

from coldfusion_p2p.merge.rules import FusionRule, apply_in_place
from coldfusion_p2p.swarm.policy import PLAIN_MEAN_RULE


def tensors(*values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(value, dtype=torch.float32) for value in values]


LAST = tensors([1.0, 2.0], [[4.0]])
AVERAGE = tensors([0.0, 1.0], [[2.0]])  # pseudo-gradient last - average: [1, 1], [[2]]
ORIGINAL = tensors([10.0, 10.0], [[10.0]])


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6), (got, want)


def test_the_plain_mean_returns_the_average_and_keeps_no_state():
    rule = FusionRule()
    assert rule.is_plain_mean and not rule.has_state and rule.signature() == PLAIN_MEAN_RULE
    step = rule.apply(LAST, AVERAGE, None, rule.initial_state(LAST))
    assert_close(step.base, AVERAGE)
    assert step.state == []


def test_an_outer_lr_without_momentum_moves_that_fraction_of_the_way_to_the_average():
    step = FusionRule(outer_lr=0.5).apply(LAST, AVERAGE, None, [])
    assert_close(step.base, tensors([0.5, 1.5], [[3.0]]))  # last - 0.5 * (last - average)
    assert step.state == []


def test_nesterov_momentum_carries_the_direction_from_one_round_to_the_next():
    rule = FusionRule(outer_lr=0.5, outer_momentum=0.9)
    state = rule.initial_state(LAST)
    assert_close(state, tensors([0.0, 0.0], [[0.0]]))
    # round 1: g1 = [1, 1], [[2]]; m1 = g1; update1 = g1 + 0.9 * m1 = 1.9 * g1; base1 = last - 0.5 * update1
    first = rule.apply(LAST, AVERAGE, None, state)
    assert_close(first.state, tensors([1.0, 1.0], [[2.0]]))
    assert_close(first.base, tensors([1 - 0.95, 2 - 0.95], [[4 - 1.9]]))
    # round 2 from base1, the group's average 0.1 below it: g2 = [0.1, 0.1], [[0.1]]
    average2 = [tensor - 0.1 for tensor in first.base]
    second = rule.apply(first.base, average2, None, first.state)
    m2 = tensors([0.9 * 1 + 0.1, 0.9 * 1 + 0.1], [[0.9 * 2 + 0.1]])  # mu * m1 + g2
    assert_close(second.state, m2)
    update2 = [0.1 + 0.9 * momentum for momentum in m2]  # g2 + mu * m2
    assert_close(second.base, [base - 0.5 * update for base, update in zip(first.base, update2, strict=True)])


def test_the_anchor_interpolates_the_new_base_toward_the_original():
    step = FusionRule(anchor=0.25).apply(LAST, AVERAGE, ORIGINAL, [])
    assert_close(step.base, [0.75 * mean + 0.25 * origin for mean, origin in zip(AVERAGE, ORIGINAL, strict=True)])
    with pytest.raises(ValueError, match="original"):
        FusionRule(anchor=0.25).apply(LAST, AVERAGE, None, [])


def test_the_rule_never_modifies_its_inputs():
    rule = FusionRule(outer_lr=0.7, outer_momentum=0.9, anchor=0.1)
    inputs = [LAST, AVERAGE, ORIGINAL, tensors([0.5, -0.5], [[1.0]])]
    copies = [[tensor.clone() for tensor in group] for group in inputs]
    step = rule.apply(*inputs)
    for group, copy in zip(inputs, copies, strict=True):
        assert all(torch.equal(tensor, saved) for tensor, saved in zip(group, copy, strict=True))
    assert all(result is not given for result, given in zip(step.base, LAST, strict=True))
    body, state = [tensor.clone() for tensor in LAST], [tensor.clone() for tensor in inputs[3]]
    apply_in_place(rule, body, LAST, AVERAGE, ORIGINAL, state)
    assert_close(body, step.base)
    assert_close(state, step.state)


def test_a_state_of_the_wrong_length_raises():
    rule = FusionRule(outer_momentum=0.9)
    with pytest.raises(ValueError, match="state"):
        rule.apply(LAST, AVERAGE, None, [])
    with pytest.raises(ValueError, match="state"):
        rule.apply(LAST, AVERAGE, None, tensors([0.0, 0.0]))


def test_rules_that_differ_have_different_signatures():
    rules = [FusionRule(), FusionRule(outer_lr=0.7), FusionRule(outer_momentum=0.9), FusionRule(anchor=0.1)]
    assert len({rule.signature() for rule in rules}) == len(rules)
