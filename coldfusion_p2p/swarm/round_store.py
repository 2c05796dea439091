"""A peer's own record of its rounds on disk: the round report, the checkpoint, the history, resuming.

Each completed round (fused, alone, failed or synced) becomes an atomic checkpoint of the fused
base with this peer's head, the fusion rule's state and the report (``round.json``), plus one line
of ``history.jsonl``; ``--resume`` restarts from the newest. With ``--save-local-body`` the body
and head before fusion are saved beside it, so audits (and the tests) can check what fusion did.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from coldfusion_p2p import __version__
from coldfusion_p2p.config import PeerConfig, RunConfig
from coldfusion_p2p.contributor.checkpoints import (
    append_history,
    apply_body_state,
    latest_checkpoint,
    load_body_state,
    load_fusion_state,
    load_head,
    save_checkpoint,
)
from coldfusion_p2p.contributor.data import TaskData
from coldfusion_p2p.contributor.model import body_state_names, head_state, load_head_state
from coldfusion_p2p.contributor.model_card import BaseFacts, Contributor
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm.fusion import finite_or_nan
from coldfusion_p2p.swarm.records import Outcome

PRE_FUSION_FILE = "pre_fusion.safetensors"  # written with --save-local-body


@dataclass
class RoundReport:
    """What one round did; saved in the checkpoint's round.json and shown on the console."""

    round: int
    outcome: Outcome
    group_size: int
    peer_ids: list[str]
    train_loss: float | None
    accuracy_before: float | None
    accuracy_after: float | None  # after fusion and the head re-fit (the head this peer goes on with)
    train_seconds: float
    wait_seconds: float
    fusion_seconds: float
    samples_per_second: float
    reason: str = ""
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_sent: int = 0  # serialized bytes this peer sent in the all-reduce
    peak_rss_mb: float = 0.0  # peak resident memory of this peer's main process so far
    accuracy_after_old_head: float | None = None  # after fusion, before the head re-fit
    majority_rate: float | None = None  # validation accuracy of always answering the most common label
    validation_loss_after: float | None = None  # validation loss of the model accuracy_after describes
    device_copy_seconds: float = 0.0  # of fusion_seconds: the body's copies GPU -> CPU -> GPU (0 on a CPU)
    stages: list[dict[str, Any]] = field(default_factory=list)  # bounded groups: each stage's group and outcome


OUTCOME_REASONS = {"alone": "no other peer in the swarm", "missed": "the swarm fused this round without us"}


def round_report(
    round_number: int,
    outcome: Outcome,
    *,
    own_peer_id: str,
    training: Any = None,
    accuracy: dict[str, float | None] | None = None,
    result: Any = None,
    wait_seconds: float = 0.0,
    source: dict[str, Any] | None = None,
    reason: str = "",
) -> RoundReport:
    """The one place a RoundReport is built.

    ``training`` is the round's training stats (None for a downloaded base), ``accuracy`` holds
    ``before``, ``after``, ``after_old_head``, ``majority`` and ``loss_after``, ``result`` the fusion's result if an
    all-reduce ran, ``source`` the metadata of a downloaded base (its group).
    """
    accuracy = accuracy or {}
    fused = result is not None and result.fused
    if fused:
        group_size, peer_ids = result.group_size, list(result.peer_ids)
    elif source is not None:
        group_size, peer_ids = int(source.get("group_size", 0)), list(source.get("peer_ids", []))
    else:
        group_size, peer_ids = 1, [own_peer_id]
    return RoundReport(
        round=round_number,
        outcome=outcome,
        group_size=group_size,
        peer_ids=peer_ids,
        train_loss=None if training is None else finite_or_nan(training.loss),
        accuracy_before=accuracy.get("before"),
        accuracy_after=accuracy.get("after"),
        accuracy_after_old_head=accuracy.get("after_old_head"),
        majority_rate=accuracy.get("majority"),
        validation_loss_after=accuracy.get("loss_after"),
        train_seconds=0.0 if training is None else training.seconds,
        wait_seconds=wait_seconds,
        fusion_seconds=0.0 if result is None else result.seconds,
        samples_per_second=0.0 if training is None else training.samples_per_second,
        reason=reason or (result.reason if result is not None else OUTCOME_REASONS.get(outcome, "")),
        members=result.gathered if fused else {},
        bytes_sent=0 if result is None else result.bytes_sent,
        peak_rss_mb=0.0 if training is None else peak_rss_mb(),
        device_copy_seconds=0.0 if result is None else result.copy_seconds,
        stages=[] if result is None else [dataclasses.asdict(stage) for stage in result.stages],
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class RoundOwner:
    """The peer whose round is saved: who it is, its data and the model that holds its body and head."""

    peer_id: str
    data: TaskData
    model_name: str
    model: PreTrainedModel
    tokenizer: Any
    body: list[torch.Tensor]


@dataclass(frozen=True)
class Resumed:
    path: Path
    round: int
    group_size: int
    fusion_state: list[torch.Tensor] | None


def resume_checkpoint(
    run: RunConfig, label_names: list[str], model: PreTrainedModel, body: list[torch.Tensor], has_state: bool
) -> Resumed | None:
    """Load our newest checkpoint into ``model`` with ``--resume``; None if there is none.

    Without ``--resume`` an existing checkpoint is an error (never overwritten silently). Every
    check runs before the model is touched, so a refused resume leaves it as it was.
    """
    checkpoint = latest_checkpoint(run.output_dir)
    if checkpoint is None:
        return None
    if not run.resume:
        raise UserError(
            f"{run.output_dir} already holds a checkpoint (round {checkpoint.round})",
            "pass --resume to continue from it, or choose another --output-dir",
        )
    head, saved_labels = load_head(checkpoint.path)
    if saved_labels != label_names:
        raise UserError(
            f"the dataset's labels {label_names} differ from the checkpoint's {saved_labels}",
            "use the dataset the checkpoint was trained on, or a fresh --output-dir",
        )
    state = None
    if has_state:
        shapes = [tensor.shape for tensor in body]
        state = load_fusion_state(checkpoint.path, body_state_names(model), shapes)
    apply_body_state(model, load_body_state(checkpoint.path))
    load_head_state(model, head)
    group_size = int((checkpoint.metadata.get("report") or {}).get("group_size", 0))
    return Resumed(checkpoint.path, checkpoint.round, group_size, state)


def pre_fusion_audit(model: PreTrainedModel, body: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """This round's body and head before fusion, saved with ``--save-local-body`` for audits."""
    names = body_state_names(model)
    named_body = {f"body.{name}": tensor.detach().cpu().clone() for name, tensor in zip(names, body, strict=True)}
    head = {f"head.{name}": tensor.detach().cpu() for name, tensor in head_state(model).items()}
    return {**named_body, **head}


def card_facts(config: PeerConfig, owner: RoundOwner, report: RoundReport) -> BaseFacts:
    """The model card's facts for the base this peer checkpoints as ``report.round``.

    A fused round lists every member from what the group gathered; a round this peer kept alone
    lists only itself; a downloaded (synced) base lists nobody, since this peer did not see its group.
    """
    own = {"dataset": owner.data.name, "examples": len(owner.data.train), "license": config.data.dataset_license}
    members = report.members or ({owner.peer_id: own} if report.outcome != "synced" else {})
    contributors = [
        Contributor(
            dataset=str(info.get("dataset") or "unnamed"),
            examples=info.get("examples"),
            license=info.get("license"),
            accuracy_before=report.accuracy_before if peer_id == owner.peer_id else None,
            accuracy_after=report.accuracy_after if peer_id == owner.peer_id else None,
        )
        for peer_id, info in members.items()
    ]
    fusion = {
        "rule": FusionRule.from_config(config.fusion).signature(),
        "aggregation": config.fusion.aggregation,
        "compression": config.fusion.compression,
    }
    return BaseFacts(report.round, owner.model_name, max(report.group_size, 1), contributors, fusion)


def save_round(
    config: PeerConfig,
    owner: RoundOwner,
    report: RoundReport,
    *,
    fusion_state: list[torch.Tensor],
    pre_fusion: dict[str, torch.Tensor] | None,
    fingerprint: str,
) -> None:
    """Checkpoint the body ``owner`` holds as the base of ``report.round`` and append the history line."""
    names = body_state_names(owner.model)
    save_checkpoint(
        config.run.output_dir,
        round_number=report.round,
        model=owner.model,
        tokenizer=owner.tokenizer,
        head=head_state(owner.model),
        label_names=owner.data.label_names,
        metadata={
            "peer_id": owner.peer_id,
            "dataset": owner.data.name,
            "examples": len(owner.data.train),
            "report": report.__dict__,
            "fingerprint": fingerprint,
            "model": owner.model_name,
            "config": config.to_dict(),
            "version": __version__,
            "time": time.time(),
        },
        keep=config.run.keep_checkpoints,
        extra_files=None if pre_fusion is None else {PRE_FUSION_FILE: pre_fusion},
        fusion_state=dict(zip(names, fusion_state, strict=True)) if fusion_state else None,
        card=card_facts(config, owner, report),
    )
    append_history(config.run.output_dir, {"peer_id": owner.peer_id, "dataset": owner.data.name, **report.__dict__})
