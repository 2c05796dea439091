"""Body/head split derived from the model, for every architecture family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from coldfusion_p2p.contributor.model import (
    body_parameters,
    body_state_names,
    head_state,
    load_classifier,
    load_head_state,
    resolve_model_name,
    split_body_head,
)
from coldfusion_p2p.errors import UserError

from tiny_models import ARCHITECTURES, build_tiny_model


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def classifier(request, tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return load_classifier(str(folder), ["a", "b", "c"], seed=0)


def test_body_is_exactly_the_base_model(classifier):
    split = split_body_head(classifier)
    base_ids = {id(parameter) for parameter in classifier.base_model.parameters()}
    assert {id(parameter) for parameter in body_parameters(classifier)} == base_ids
    assert split.head and not set(split.head) & set(split.body)
    assert len(split.body) + len(split.head) == len(list(classifier.parameters()))
    assert set(body_state_names(classifier)) <= set(classifier.base_model.state_dict())


def test_head_has_one_output_per_label_and_round_trips(classifier):
    head = head_state(classifier)
    assert any(tensor.shape[0] == 3 for tensor in head.values())
    changed = {name: torch.randn_like(tensor) for name, tensor in head.items()}
    load_head_state(classifier, changed)
    assert all(torch.equal(head_state(classifier)[name], changed[name]) for name in changed)


def test_a_head_of_another_label_set_is_refused(classifier):
    wrong = {name: torch.zeros(5, *tensor.shape[1:]) for name, tensor in head_state(classifier).items()}
    with pytest.raises(UserError, match=r"label set changed|shape"):
        load_head_state(classifier, wrong)


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_name(str(tmp_path / "nope"))
    assert resolve_model_name("org/name") == "org/name"


def test_a_module_kept_local_joins_the_head_and_is_saved_with_its_pretrained_values(tmp_path):
    from coldfusion_p2p.contributor.checkpoints import save_body_folder
    from coldfusion_p2p.contributor.model import keep_local, model_fingerprint

    folder = build_tiny_model(tmp_path / "model", "bert")
    classifier = load_classifier(str(folder), ["a", "b"], seed=0)
    fused_fingerprint = model_fingerprint(classifier)
    keep_local(classifier, ["pooler"])
    pooler = {id(parameter) for parameter in classifier.base_model.pooler.parameters()}
    assert not pooler & {id(parameter) for parameter in body_parameters(classifier)}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(head_state(classifier))
    assert model_fingerprint(classifier) != fused_fingerprint, "peers that fuse the pooler must not group with us"

    pretrained = classifier.base_model.pooler.dense.weight.detach().clone()
    with torch.no_grad():
        classifier.base_model.pooler.dense.weight.add_(1.0)  # as local training would
    save_body_folder(classifier, None, tmp_path / "base")
    saved = AutoModel.from_pretrained(tmp_path / "base")
    assert torch.equal(saved.pooler.dense.weight, pretrained)
    assert torch.equal(classifier.base_model.pooler.dense.weight, pretrained + 1.0), "the peer's own pooler is kept"

    with pytest.raises(UserError, match=r"no submodule 'poolr'.*--local-modules"):
        keep_local(classifier, ["poolr"])
