"""Atomic checkpoints of the fused base, with this peer's head beside it.

Layout of ``--output-dir``::

    rounds/round-00003/          one complete round: a Hugging Face model folder of the fused
        config.json              *body* (AutoModel and AutoModelForSequenceClassification load it)
        model.safetensors
        tokenizer files
        head.safetensors         this peer's private head (never shared with the swarm)
        head.json                its label names and tensor names
        round.json               round, group, peer ids, timings, metrics, the run config
    latest -> rounds/round-00003 a symlink, swapped atomically

A round folder is written under a temporary name and renamed into place, then ``latest`` is
replaced by ``os.replace`` of a fresh symlink: a crash at any moment leaves ``latest`` pointing at
a complete checkpoint, never at a half-written one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
LATEST_LINK = "latest"
ROUND_FILE = "round.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_FILE = "head.json"
BODY_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    round: int
    metadata: dict[str, Any]


def round_dir_name(round_number: int) -> str:
    return f"round-{round_number:05d}"


def save_checkpoint(
    output_dir: str | Path,
    *,
    round_number: int,
    model: PreTrainedModel,
    tokenizer,
    head: dict[str, torch.Tensor],
    label_names: list[str],
    metadata: dict[str, Any],
    keep: int = 2,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write round ``round_number`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``model``'s body is saved as the base; ``head`` (this peer's) is saved beside it.
    ``extra_files`` maps file names to tensor dicts saved in the same folder (e.g. audits).
    """
    output_dir = Path(output_dir)
    rounds_dir = output_dir / ROUNDS_DIR
    try:
        rounds_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create output directory {output_dir} ({error.strerror})", "pass a writable --output-dir"
        ) from None
    final = rounds_dir / round_dir_name(round_number)
    temporary = rounds_dir / f".tmp-{round_dir_name(round_number)}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        save_body_folder(model, tokenizer, temporary)
        save_file({name: tensor.contiguous() for name, tensor in head.items()}, temporary / HEAD_WEIGHTS)
        _write_json(temporary / HEAD_FILE, {"label_names": label_names, "tensors": sorted(head)})
        for file_name, tensors in (extra_files or {}).items():
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary / file_name)
        _write_json(temporary / ROUND_FILE, {"round": round_number, **metadata})
        _fsync_tree(temporary)
        if final.exists():  # the same round written again (e.g. re-synced): move the old one aside first
            stale = rounds_dir / f".stale-{round_dir_name(round_number)}-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(temporary, final)
        _point_latest(output_dir, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    prune_checkpoints(output_dir, keep)
    return final


def save_body_folder(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    """The body as a Hugging Face folder, without this peer's label names in its config."""
    body = model.base_model
    body.save_pretrained(folder)
    config = copy.deepcopy(model.config).to_dict()
    for private_key in ("id2label", "label2id", "problem_type", "finetuning_task"):
        config.pop(private_key, None)
    config["architectures"] = [type(body).__name__]
    _write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _point_latest(output_dir: Path, target: Path) -> None:
    link = output_dir / LATEST_LINK
    temporary_link = output_dir / f".{LATEST_LINK}-{os.getpid()}"
    if temporary_link.is_symlink() or temporary_link.exists():
        temporary_link.unlink()
    temporary_link.symlink_to(target.relative_to(output_dir))
    os.replace(temporary_link, link)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete rounds (never the one ``latest`` points to)."""
    latest = latest_checkpoint(output_dir)
    rounds = sorted((output_dir / ROUNDS_DIR).glob("round-*"))
    for folder in rounds[:-keep] if keep > 0 else []:
        if latest is None or folder.resolve() != latest.path.resolve():
            shutil.rmtree(folder, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The checkpoint ``latest`` points to, or None if there is none; UserError if it is unreadable."""
    link = Path(output_dir) / LATEST_LINK
    if not link.is_symlink() and not link.exists():
        return None
    path = link.resolve()
    try:
        metadata = json.loads((path / ROUND_FILE).read_text())
        round_number = int(metadata["round"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {error})",
            f"restore it from a backup or remove {link} to start fresh",
        ) from None
    return Checkpoint(path=path, round=round_number, metadata=metadata)


def load_body_state(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Body tensors keyed as in ``model.base_model.state_dict()``."""
    try:
        return load_file(Path(checkpoint_path) / BODY_WEIGHTS)
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise UserError(
            f"checkpoint body {Path(checkpoint_path) / BODY_WEIGHTS} is corrupt ({error})",
            "restore it from a backup or start a fresh --output-dir",
        ) from None


def load_head(checkpoint_path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """This peer's head tensors and label names from a checkpoint."""
    path = Path(checkpoint_path)
    try:
        head = load_file(path / HEAD_WEIGHTS)
        label_names = json.loads((path / HEAD_FILE).read_text())["label_names"]
    except Exception as error:
        raise UserError(
            f"checkpoint head in {path} is corrupt ({error})", "restore it from a backup or start a fresh --output-dir"
        ) from None
    return head, list(label_names)


def apply_body_state(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Load saved body tensors into ``model.base_model``; every body parameter must be present."""
    body = model.base_model
    expected = {name for name, _ in body.named_parameters()}
    missing = expected - set(state)
    if missing:
        raise UserError(
            f"checkpoint body lacks {len(missing)} tensors of this model (e.g. {sorted(missing)[0]})",
            "use the same --model the checkpoint was made with",
        )
    parameters = dict(body.named_parameters())
    with torch.no_grad():
        for name in expected:
            if parameters[name].shape != state[name].shape:
                raise UserError(
                    f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, model expects "
                    f"{tuple(parameters[name].shape)}",
                    "use the same --model the checkpoint was made with",
                )
            parameters[name].copy_(state[name])


def load_peer_classifier(checkpoint_path: str | Path) -> PreTrainedModel:
    """The full classifier of the peer that wrote a checkpoint: fused body plus its own head."""
    path = Path(checkpoint_path)
    head, label_names = load_head(path)
    config = AutoConfig.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in head.items():
            parameters[name].copy_(tensor)
    return model


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
