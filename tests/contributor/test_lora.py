"""LoRA contributors: adapters train, then merge into the body's own weights before fusion."""

from __future__ import annotations

import pytest
import torch

from coldfusion_p2p.contributor.lora import check_targets, default_targets
from coldfusion_p2p.contributor.model import body_parameters, body_state_names, load_classifier
from coldfusion_p2p.errors import UserError

from tiny_models import build_tiny_model


def test_a_lora_round_moves_only_the_targeted_weights_by_a_low_rank_update(make_trainer):
    trainer = make_trainer(lora_rank=2, local_steps=10)
    model = trainer.model
    body, names = body_parameters(model), body_state_names(model)
    before = [tensor.detach().clone() for tensor in body]
    head_before = model.classifier.weight.detach().clone()
    stats = trainer.train_round(1)
    assert stats.steps == 10
    assert [id(tensor) for tensor in body_parameters(model)] == [id(tensor) for tensor in body]  # the same tensors
    assert not any("lora_" in name for name, _ in model.named_parameters()), "adapters were left in the model"
    assert all(parameter.requires_grad for parameter in model.parameters())
    moved = {name for name, old, new in zip(names, before, body, strict=True) if not torch.equal(old, new)}
    assert moved and all(name.endswith(("query.weight", "value.weight")) for name in moved), moved
    for name, old, new in zip(names, before, body, strict=True):
        if name in moved:
            assert torch.linalg.matrix_rank((new - old).detach(), atol=1e-6) <= 2, name
    assert not torch.equal(model.classifier.weight, head_before), "the head did not train"


def test_a_stopped_lora_round_still_merges_and_removes_its_adapters(make_trainer):
    trainer = make_trainer(lora_rank=4, local_steps=20)
    steps = []
    trainer.train_round(1, on_step=lambda step, loss: steps.append(step), should_stop=lambda: len(steps) >= 2)
    assert steps == [1, 2] and not any("lora_" in name for name, _ in trainer.model.named_parameters())


def test_targets_default_per_architecture_and_bad_ones_fail_at_start(tmp_path):
    bert = load_classifier(str(build_tiny_model(tmp_path / "bert")), ["a", "b"], seed=0)
    distilbert = load_classifier(str(build_tiny_model(tmp_path / "distil", "distilbert")), ["a", "b"], seed=0)
    assert default_targets(bert) == ["query", "value"]
    assert default_targets(distilbert) == ["q_lin", "v_lin"]  # not in peft's table: found by name
    assert check_targets(bert, ["key"]) == ["key"]
    with pytest.raises(UserError, match="no such linear layer in the bert body"):
        check_targets(bert, ["attention"])
