"""Atomic checkpoints of the fused base, with this peer's head beside it.

Layout of ``--output-dir``::

    rounds/round_00003/          one complete round: a Hugging Face model folder of the fused
        config.json              *body* (AutoModel and AutoModelForSequenceClassification load it)
        model.safetensors
        tokenizer files
        head.safetensors         this peer's private head (never shared with the swarm)
        head.json                its label names and tensor names
        fusion_state.safetensors the fusion rule's state that goes with the base (outer momentum;
                                 only with --outer-momentum)
        round.json               round, group, peer ids, timings, metrics, the run config
    latest -> rounds/round_00003 a symlink, swapped atomically

A round folder is written under a temporary name and renamed into place (:func:`atomic_folder`),
then ``latest`` is replaced by ``os.replace`` of a fresh symlink (:func:`point_latest`): a crash at
any moment leaves ``latest`` pointing at a complete checkpoint, never at a half-written one. The
bootstrap node's archive is built from the same pieces.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from coldfusion_p2p.contributor.model import copy_into, local_originals
from coldfusion_p2p.contributor.model_card import BaseFacts, write_model_card
from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
LATEST_LINK = "latest"
ROUND_FILE = "round.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_FILE = "head.json"
BODY_WEIGHTS = "model.safetensors"
FUSION_STATE_FILE = "fusion_state.safetensors"  # the fusion rule's state, keyed by body tensor names


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    round: int
    metadata: dict[str, Any]


def round_dir_name(round_number: int) -> str:
    return f"round_{round_number:05d}"


ROUND_GLOB = "round_[0-9]*"


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success, fsync it and rename it to ``final``.

    On any error the temporary folder is removed and ``final`` (if it existed) is untouched.
    """
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        _fsync_tree(temporary)
        if final.exists():  # the same round written again: move the old copy aside, then drop it
            stale = final.parent / f".stale-{final.name}-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def remove_abandoned_folders(folder: Path) -> list[Path]:
    """Delete the ``.tmp-*``/``.stale-*`` folders that a process killed mid-write left in ``folder``.

    Their names end in the writer's pid; folders of a live process (us included) are kept.
    """
    removed = []
    for path in [*folder.glob(".tmp-*"), *folder.glob(".stale-*")]:
        pid_text = path.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    fusion_state: dict[str, torch.Tensor] | None = None,
    card: BaseFacts | None = None,
) -> Path:
    """Write round ``round_number`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``model``'s body is saved as the base; ``head`` (this peer's) is saved beside it, and so is the
    fusion rule's state that goes with the base, when there is one (``fusion_state``).
    ``extra_files`` maps file names to tensor dicts saved in the same folder (e.g. audits).
    ``card``: the facts of the base's model card (``README.md``, written inside the atomic folder).
    """
    output_dir = Path(output_dir)
    rounds_dir = output_dir / ROUNDS_DIR
    ensure_writable_dir(rounds_dir, "--output-dir")
    remove_abandoned_folders(rounds_dir)  # a crash mid-write left the previous incarnation's
    final = rounds_dir / round_dir_name(round_number)
    with atomic_folder(final) as folder:
        save_body_folder(model, tokenizer, folder)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in head.items()}, folder / HEAD_WEIGHTS)
        _write_json(folder / HEAD_FILE, {"label_names": label_names, "tensors": sorted(head)})
        if fusion_state:
            save_file({name: tensor.contiguous() for name, tensor in fusion_state.items()}, folder / FUSION_STATE_FILE)
        for file_name, tensors in (extra_files or {}).items():
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, folder / file_name)
        _write_json(folder / ROUND_FILE, {"round": round_number, **metadata})
        if card is not None:
            write_model_card(folder, card)
    point_latest(output_dir, final)
    prune_rounds(rounds_dir, keep, protect=final)
    return final


HISTORY_FILE = "history.jsonl"


def append_history(output_dir: str | Path, entry: dict[str, Any]) -> None:
    """One JSON line per completed round: every round's metrics survive checkpoint pruning."""
    with open(Path(output_dir) / HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def read_history(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensure_writable_dir(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and prove it is writable now, not after a round of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"{folder} is not a writable directory ({error.strerror or error})", f"pass a writable {flag}"
        ) from None


def save_body_folder(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    """The body as a Hugging Face folder, without this peer's label names in its config.

    Submodules kept local (:func:`~coldfusion_p2p.contributor.model.keep_local`) are saved with their
    pretrained values: they are this peer's, like its head, and not part of the fused base.
    """
    body = model.base_model
    originals = local_originals(model)
    if originals:
        parameters = dict(body.named_parameters())
        own = {name: parameters[name].detach().clone() for name in originals}
        copy_into([parameters[name] for name in originals], list(originals.values()))
        try:
            body.save_pretrained(folder)
        finally:
            copy_into([parameters[name] for name in own], list(own.values()))
    else:
        body.save_pretrained(folder)
    config = copy.deepcopy(model.config).to_dict()
    for private_key in ("id2label", "label2id", "problem_type", "finetuning_task"):
        config.pop(private_key, None)
    config["architectures"] = [type(body).__name__]
    _write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def point_latest(root: Path, target: Path) -> None:
    """Atomically make ``root/latest`` a relative symlink to ``target``."""
    link = root / LATEST_LINK
    temporary_link = root / f".{LATEST_LINK}-{os.getpid()}"
    if temporary_link.is_symlink() or temporary_link.exists():
        temporary_link.unlink()
    temporary_link.symlink_to(target.relative_to(root))
    os.replace(temporary_link, link)


def prune_rounds(parent: Path, keep: int | None, protect: Path) -> None:
    """Delete all but the newest ``keep`` round folders in ``parent`` (never ``protect``)."""
    if keep is None:
        return
    rounds = sorted(parent.glob(ROUND_GLOB))
    for folder in rounds[:-keep] if keep > 0 else rounds:
        if folder.resolve() != protect.resolve():
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


def load_fusion_state(checkpoint_path: str | Path, names: list[str], shapes: list[torch.Size]) -> list[torch.Tensor]:
    """The fusion rule's state saved with a checkpoint, in the order of ``names`` (body tensor names)."""
    path = Path(checkpoint_path) / FUSION_STATE_FILE
    fix = "restore it from a backup, or resume with the run's --outer-momentum, or start a fresh --output-dir"
    try:
        saved = load_file(path)
    except Exception as error:  # missing, truncated: safetensors raises its own error types
        reason = "missing" if not path.exists() else f"corrupt ({error})"
        raise UserError(f"checkpoint fusion state {path} is {reason}", fix) from None
    state = [saved.get(name) for name in names]
    for name, tensor, shape in zip(names, state, shapes, strict=True):
        if tensor is None or tensor.shape != shape or not torch.isfinite(tensor).all():
            raise UserError(f"checkpoint fusion state {path} does not fit this model's body ({name})", fix)
    return state


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
