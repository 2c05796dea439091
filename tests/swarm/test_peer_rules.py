"""The fusion rule inside the swarm: real peer processes apply the outer optimizer and the anchor
to the group's average, and the rule's state (momentum) travels with the fused base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coldfusion_p2p.contributor.checkpoints import FUSION_STATE_FILE, load_body_state
from coldfusion_p2p.contributor.model import body_parameters, body_state_names, load_classifier
from coldfusion_p2p.merge.rules import FusionRule

from conftest import assert_outcomes, pre_fusion, round_dir

pytestmark = pytest.mark.swarm

RULE = FusionRule(outer_lr=0.7, outer_momentum=0.9, anchor=0.1)
RULE_SETTINGS = dict(outer_lr=RULE.outer_lr, outer_momentum=RULE.outer_momentum, anchor=RULE.anchor)
SETTINGS = dict(save_local_body=True, keep_checkpoints=5, min_group_size=2, refit_steps=0, **RULE_SETTINGS)


def original_body(model_dir) -> dict[str, torch.Tensor]:
    model = load_classifier(str(model_dir), ["0", "1"], seed=0)
    return by_name(body_state_names(model), [tensor.detach().clone() for tensor in body_parameters(model)])


def by_name(names: list[str], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(names, tensors, strict=True))


def rule_by_hand(last_base, peers, round_number, original, state):
    """The rule applied in the test to the mean of the members' pre-fusion bodies: (base, state)."""
    names = sorted(original)
    bodies = [pre_fusion(peer, round_number, "body") for peer in peers]
    average = [torch.stack([body[name] for body in bodies]).mean(0) for name in names]
    step = RULE.apply(
        [last_base[name] for name in names],
        average,
        [original[name] for name in names],
        [state[name] for name in names] if state is not None else RULE.initial_state(average),
    )
    moved = max((new - mean).abs().max().item() for new, mean in zip(step.base, average, strict=True))
    assert moved > 1e-4, "the rule must differ from the plain mean for this test to mean anything"
    return by_name(names, step.base), by_name(names, step.state)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where) -> None:
    assert set(actual) == set(expected), where
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=1e-5), (where, name, (actual[name] - tensor).abs().max())


def fused_state(peer, round_number: int) -> dict[str, torch.Tensor]:
    return load_file(round_dir(peer, round_number) / FUSION_STATE_FILE)


def test_peers_apply_the_outer_optimizer_and_anchor_with_momentum_carried_across_rounds(
    local_swarm, tiny_model_dir, tiny_datasets
):
    peers = [
        local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, rounds=2, **SETTINGS)
        for i in (0, 1)
    ]
    local_swarm.wait_all()
    original = original_body(tiny_model_dir)
    base, state = original, None
    for round_number in (1, 2):
        assert_outcomes(peers, round_number, "fused")
        base, state = rule_by_hand(base, peers, round_number, original, state)
        for peer in peers:
            assert_close(load_body_state(round_dir(peer, round_number)), base, (peer.name, round_number))
            assert_close(fused_state(peer, round_number), state, (peer.name, round_number, "momentum"))


def test_a_resumed_peer_and_a_late_joiner_continue_with_the_swarm_momentum(local_swarm, tiny_model_dir, tiny_datasets):
    first = [
        local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, rounds=1, **SETTINGS)
        for i in (0, 1)
    ]
    local_swarm.wait_all()
    original = original_body(tiny_model_dir)
    base1, momentum1 = load_body_state(round_dir(first[0], 1)), fused_state(first[0], 1)
    assert any(tensor.abs().max() > 0 for tensor in momentum1.values())

    resumed = local_swarm.start_peer(
        "peer0", tiny_datasets[0], tiny_model_dir, seed=0, rounds=2, resume=True, **SETTINGS
    )
    late = local_swarm.start_peer("late", tiny_datasets[2], tiny_model_dir, seed=2, rounds=2, **SETTINGS)
    for peer in (resumed, late):
        assert peer.wait() == 0, peer.log()

    assert late.round_info(1)["report"]["outcome"] == "synced", late.round_info(1)["report"]
    assert_close(fused_state(late, 1), momentum1, "the late joiner's downloaded momentum")
    assert_close(load_body_state(round_dir(late, 1)), base1, "the late joiner's downloaded base")
    group = (resumed, late)
    assert_outcomes(group, 2, "fused")
    base2, momentum2 = rule_by_hand(base1, group, 2, original, momentum1)
    for peer in group:
        assert_close(load_body_state(round_dir(peer, 2)), base2, (peer.name, 2))
        assert_close(fused_state(peer, 2), momentum2, (peer.name, 2, "momentum"))


def test_a_pooler_kept_local_is_trained_by_each_peer_and_never_fused(local_swarm, tiny_model_dir, tiny_datasets):
    """``--local-modules pooler``: the pooler moves to the head; saved bases carry the pretrained one."""
    settings = dict(save_local_body=True, keep_checkpoints=5, min_group_size=2, refit_steps=0, rounds=1)
    settings["local_modules"] = ["pooler"]
    peers = [local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)]
    local_swarm.wait_all()
    pretrained = load_classifier(str(tiny_model_dir), ["0", "1"], seed=0).base_model.state_dict()
    pooler = sorted(name for name in pretrained if name.startswith("pooler."))
    assert pooler, "the tiny model must have a pooler for this test to mean anything"

    bodies = [pre_fusion(peer, 1, "body") for peer in peers]
    assert not any(name.startswith("pooler.") for name in bodies[0]), "a local pooler was sent to the swarm"
    mean = {name: torch.stack([body[name] for body in bodies]).mean(0) for name in bodies[0]}
    heads = [load_file(round_dir(peer, 1) / "head.safetensors") for peer in peers]
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 2, report
        fused = load_body_state(round_dir(peer, 1))
        assert_close({name: fused[name] for name in mean}, mean, peer.name)
        for name in pooler:  # the saved base's pooler is the pretrained one, not this peer's
            assert torch.equal(fused[name], pretrained[name]), (peer.name, name)
    own = [[head[name] for name in head if ".pooler." in name] for head in heads]
    assert len(own[0]) == len(pooler), sorted(heads[0])
    assert not all(torch.equal(a, b) for a, b in zip(*own, strict=True)), "the peers' poolers were fused"
    assert not all(torch.equal(a, pretrained[name]) for a, name in zip(own[0], pooler, strict=True)), "not trained"
