"""Training curves for the tools people already use: ``--report-to tensorboard``.

A peer writes its per-step training loss and its per-round numbers (accuracy before and after
fusion, loss, group size, fusion seconds, bytes sent) with TensorBoard's own ``SummaryWriter``
(through ``torch.utils.tensorboard``), never a hand-made format, so ``tensorboard --logdir`` and
every tool that reads event files show them. Off by default: nothing is imported or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coldfusion_p2p.errors import UserError

ROUND_SCALARS = (  # round report field -> the scalar's tag
    ("accuracy_before", "round/accuracy_before_fusion"),
    ("accuracy_after", "round/accuracy_after_fusion"),
    ("accuracy_after_old_head", "round/accuracy_after_fusion_old_head"),
    ("validation_loss_after", "round/validation_loss_after_fusion"),
    ("train_loss", "round/train_loss"),
    ("group_size", "round/group_size"),
    ("fusion_seconds", "round/fusion_seconds"),
    ("train_seconds", "round/train_seconds"),
    ("bytes_sent", "round/bytes_sent"),
    ("samples_per_second", "round/samples_per_second"),
)


class ScalarLog:
    """Per-step and per-round scalars of one peer; every method is a no-op when reporting is off."""

    def __init__(self, report_to: str, log_dir: str | Path, steps_per_round: int):
        self.steps_per_round = steps_per_round
        self.writer = None
        if report_to == "none":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--report-to tensorboard needs the tensorboard package", "run `pip install tensorboard`"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def step(self, round_number: int, step: int, loss: float) -> None:
        """The training loss of ``step`` (1-based) of ``round_number``, on a global step axis."""
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, (round_number - 1) * self.steps_per_round + step)

    def round(self, report: Any) -> None:
        """A round report's numbers at x = its round (fields that are None are left out)."""
        if self.writer is None:
            return
        for field, tag in ROUND_SCALARS:
            value = getattr(report, field, None)
            if isinstance(value, int | float) and value == value:
                self.writer.add_scalar(tag, value, report.round)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
