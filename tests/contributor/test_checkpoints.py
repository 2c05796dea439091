"""Checkpoints: loadable by transformers, atomic, pruned, and loud when corrupt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from coldfusion_p2p.contributor import checkpoints
from coldfusion_p2p.contributor.checkpoints import (
    apply_body_state,
    latest_checkpoint,
    load_body_state,
    load_fusion_state,
    load_head,
    load_peer_classifier,
    remove_abandoned_folders,
    save_checkpoint,
)
from coldfusion_p2p.contributor.model import head_state, load_classifier, load_tokenizer
from coldfusion_p2p.errors import UserError


@pytest.fixture
def classifier(tiny_model_dir):
    return load_classifier(str(tiny_model_dir), ["neg", "pos"], seed=0)


def save(output_dir, model, tokenizer, round_number, keep=2):
    return save_checkpoint(
        output_dir,
        round_number=round_number,
        model=model,
        tokenizer=tokenizer,
        head=head_state(model),
        label_names=["neg", "pos"],
        metadata={"group_size": 2},
        keep=keep,
    )


def test_checkpoint_loads_with_transformers_and_restores_body_and_head(tmp_path, classifier, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        classifier.base_model.embeddings.word_embeddings.weight.add_(1.0)
    path = save(tmp_path, classifier, tokenizer, 1)

    body = AutoModel.from_pretrained(tmp_path / "latest")
    assert torch.equal(body.embeddings.word_embeddings.weight, classifier.base_model.embeddings.word_embeddings.weight)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "latest", num_labels=4)
    config = json.loads((path / "config.json").read_text())
    assert "id2label" not in config, "the shared base must not carry a peer's private label names"

    peer_model = load_peer_classifier(path)
    assert peer_model.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(peer_model.classifier.weight, classifier.classifier.weight)
    head, labels = load_head(path)
    assert labels == ["neg", "pos"] and set(head) == {"classifier.weight", "classifier.bias"}

    fresh = load_classifier(str(tiny_model_dir), ["neg", "pos"], seed=1)
    apply_body_state(fresh, load_body_state(path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.base_model.parameters(), classifier.base_model.parameters(), strict=True)
    )


def test_latest_moves_forward_and_old_rounds_are_pruned(tmp_path, classifier):
    for round_number in (1, 2, 3):
        save(tmp_path, classifier, None, round_number, keep=2)
    assert latest_checkpoint(tmp_path).round == 3
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round_00002", "round_00003"]


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, classifier, monkeypatch):
    save(tmp_path, classifier, None, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(OSError):
        save(tmp_path, classifier, None, 2)
    assert latest_checkpoint(tmp_path).round == 1
    assert [p.name for p in (tmp_path / "rounds").iterdir()] == ["round_00001"], "no temporary folder left behind"
    AutoModel.from_pretrained(tmp_path / "latest")


def test_corrupt_checkpoints_are_clear_errors(tmp_path, classifier):
    path = save(tmp_path, classifier, None, 1)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_body_state(path)
    (path / "round.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "empty") is None


def test_the_fusion_state_is_saved_beside_the_base_and_loads_in_body_order(tmp_path, classifier):
    from coldfusion_p2p.contributor.model import body_parameters, body_state_names

    assert not (save(tmp_path / "plain", classifier, None, 1) / checkpoints.FUSION_STATE_FILE).exists()
    names, body = body_state_names(classifier), body_parameters(classifier)
    momentum = [torch.full_like(tensor, float(index)) for index, tensor in enumerate(body)]
    path = save_checkpoint(
        tmp_path,
        round_number=1,
        model=classifier,
        tokenizer=None,
        head=head_state(classifier),
        label_names=["neg", "pos"],
        metadata={},
        fusion_state=dict(zip(names, momentum, strict=True)),
    )
    loaded = load_fusion_state(path, names, [tensor.shape for tensor in body])
    assert all(torch.equal(got, want) for got, want in zip(loaded, momentum, strict=True))

    with pytest.raises(UserError, match="does not fit"):
        load_fusion_state(path, [*names[:-1], "missing.weight"], [tensor.shape for tensor in body])
    (path / checkpoints.FUSION_STATE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"fusion_state\.safetensors is corrupt.*--outer-momentum"):
        load_fusion_state(path, names, [tensor.shape for tensor in body])
    (path / checkpoints.FUSION_STATE_FILE).unlink()
    with pytest.raises(UserError, match=r"fusion_state\.safetensors is missing"):
        load_fusion_state(path, names, [tensor.shape for tensor in body])


def test_folders_abandoned_by_a_killed_writer_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = tmp_path / f".tmp-round_00007-{dead_pid}"
    stale = tmp_path / f".stale-round_00006-{dead_pid}"
    ours = tmp_path / f".tmp-round_00008-{os.getpid()}"
    for folder in (abandoned, stale, ours):
        (folder / "part").mkdir(parents=True)
    assert sorted(remove_abandoned_folders(tmp_path)) == sorted([abandoned, stale])
    assert ours.is_dir() and not abandoned.exists() and not stale.exists()
