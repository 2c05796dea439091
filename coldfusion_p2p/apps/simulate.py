"""``coldfusion-peer simulate``: ColD Fusion in one process, no network, contributors stepped in turn.

For fast sweeps, and for users who want to try a setting before running a swarm (as Flower's
simulation mode). Each contributor is built from its peer config by the same
:func:`~coldfusion_p2p.contributor.learner.build_learner` a real peer uses, trains with the same
:class:`~coldfusion_p2p.contributor.trainer.LocalTrainer` on the same seeded batches, and the group's body is
fused by the same :class:`~coldfusion_p2p.merge.rules.FusionRule` after the same weighted mean the
all-reduce computes, followed by the same head re-fit. So, for the same seeds and settings, the
simulator's fused body equals the swarm's (``tests/apps/test_simulate.py`` checks it against real
peer processes): a result from the simulator is a result about the swarm in which every
contributor joins every round.

Writes ``output_dir/round_NNNNN/`` (the fused base as a Hugging Face folder, like the archive),
``latest``, ``rounds.csv``/``rounds.png`` and ``simulation.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from coldfusion_p2p.apps.bundled import resolve_contributors
from coldfusion_p2p.apps.demo_report import write_rounds
from coldfusion_p2p.config import PeerConfig, SimulateConfig, build_config, read_config_file
from coldfusion_p2p.contributor.checkpoints import (
    atomic_folder,
    ensure_writable_dir,
    point_latest,
    round_dir_name,
    save_body_folder,
)
from coldfusion_p2p.contributor.learner import LocalLearner, build_learner
from coldfusion_p2p.contributor.model import copy_into, model_fingerprint
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.merge.aggregation import contribution, ties_merge, update_against
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm.policy import fusion_weight

STATE_FILE = "fusion_state.safetensors"
METADATA_FILE = "metadata.json"


def parse_peer_settings(items: list[str]) -> dict[str, str]:
    """``["lr=2e-4", "local_steps=40"]`` -> ``{"lr": "2e-4", "local_steps": "40"}`` (validated later)."""
    return dict(item.split("=", 1) for item in items)


def contributor_configs(names: list[str], peer_settings: dict[str, Any]) -> list[tuple[str, PeerConfig]]:
    """Each contributor's peer config: its file, then ``peer_settings`` on top (as flags override a file)."""
    return [
        (contributor.name, build_config(read_config_file(contributor.config_path), peer_settings))
        for contributor in resolve_contributors(names)
    ]


@dataclass
class RoundRow:
    """One contributor's numbers in one round (the demo's rounds.csv has the same columns)."""

    peer: str
    round: int
    outcome: str
    group_size: int
    accuracy_before: float
    accuracy_after_old_head: float
    accuracy_after: float
    majority_rate: float
    train_loss: float
    train_seconds: float
    samples_per_second: float


class Simulation:
    """``run()`` = for each round: every contributor trains, the bodies are fused, every head re-fits.

    >>> simulation = Simulation.from_names(["trec_question_type", "sms_spam"], {"lr": 2e-4}, "out")
    >>> rows = simulation.run(rounds=3)
    >>> simulation.base          # the last fused body
    """

    def __init__(self, named_configs: list[tuple[str, PeerConfig]], output_dir: str | Path, save_every: int = 0):
        self.output_dir = Path(output_dir)
        self.save_every = save_every
        self.names = [name for name, _ in named_configs]
        self.learners: list[LocalLearner] = [build_learner(config) for _, config in named_configs]
        self.rule = self._common_rule()
        self._check_same_model()
        self.original = [tensor.detach().clone() for tensor in self.learners[0].body]
        self.base = [tensor.detach().clone() for tensor in self.original]  # the last fused body
        self.state = self.rule.initial_state(self.base)
        self.rows: list[RoundRow] = []

    @classmethod
    def from_names(cls, names: list[str], peer_settings: dict[str, Any], output_dir: str | Path, save_every: int = 0):
        return cls(contributor_configs(names, peer_settings), output_dir, save_every)

    def _common_rule(self) -> FusionRule:
        rules = {FusionRule.from_config(learner.config.fusion) for learner in self.learners}
        weightings = {
            (learner.config.fusion.weighting, learner.config.fusion.aggregation, learner.config.fusion.ties_density)
            for learner in self.learners
        }
        if "clipped_mean" in {learner.config.fusion.aggregation for learner in self.learners}:
            raise UserError(
                "the simulator does not run clipped_mean (its clipping depends on how a swarm slices the body)",
                "simulate with aggregation mean or ties",
            )
        if len(rules) > 1 or len(weightings) > 1:
            raise UserError(
                "the contributors' configs use different fusion rules or weightings (a swarm would not fuse them)",
                "give every contributor the same outer_lr, outer_momentum, anchor, weighting and aggregation",
            )
        return rules.pop()

    def _check_same_model(self) -> None:
        fingerprints = {model_fingerprint(learner.model) for learner in self.learners}
        if len(fingerprints) > 1:
            raise UserError("the contributors start from different models", "give every contributor the same model")

    # ------------------------------------------------------------------ the method
    def run_round(self, round_number: int, progress=None) -> list[RoundRow]:
        """Train every contributor from the base, fuse their bodies, re-fit every head; one row each."""
        trained = []
        for name, learner in zip(self.names, self.learners, strict=True):
            if progress is not None:
                progress(f"round {round_number}: training {name}")
            stats = learner.trainer.train_round(round_number)
            trained.append((stats, learner.trainer.evaluate().accuracy))
        self.fuse([learner.body for learner in self.learners], self._weights())
        rows = []
        for name, learner, (stats, before) in zip(self.names, self.learners, trained, strict=True):
            copy_into(learner.body, self.base)
            after_old_head = learner.trainer.evaluate().accuracy
            learner.trainer.refit_head(round_number)
            rows.append(
                RoundRow(
                    peer=name,
                    round=round_number,
                    outcome="fused",
                    group_size=len(self.learners),
                    accuracy_before=before,
                    accuracy_after_old_head=after_old_head,
                    accuracy_after=learner.trainer.evaluate().accuracy,
                    majority_rate=learner.trainer.majority_rate(),
                    train_loss=stats.loss,
                    train_seconds=stats.seconds,
                    samples_per_second=stats.samples_per_second,
                )
            )
        self.rows += rows
        return rows

    def _weights(self) -> list[float]:
        weighting = self.learners[0].config.fusion.weighting
        return [fusion_weight(weighting, len(learner.data.train)) for learner in self.learners]

    def fuse(self, bodies: list[list[torch.Tensor]], weights: list[float]) -> None:
        """What the all-reduce computes from ``bodies`` (weighted mean, or TIES), then the fusion rule."""
        fusion = self.learners[0].config.fusion
        with torch.no_grad():
            sent = [contribution(body, self.base, fusion.aggregation, fusion.ties_density) for body in bodies]
            if fusion.aggregation == "ties":
                average = [
                    start.float() + ties_merge([update_against(body[index], start) for body in sent], weights)
                    for index, start in enumerate(self.base)
                ]
            else:
                total = float(sum(weights))
                average = [
                    sum(weight * body[index].float() for weight, body in zip(weights, sent, strict=True)) / total
                    for index in range(len(self.base))
                ]
        step = self.rule.apply(self.base, average, self.original, self.state)
        self.base = [tensor.to(original.dtype) for tensor, original in zip(step.base, self.original, strict=True)]
        if self.rule.has_state:
            self.state = step.state

    def run(self, rounds: int, console: Console | None = None) -> list[RoundRow]:
        console = console or Console()
        ensure_writable_dir(self.output_dir, "--output-dir")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
            bar = progress.add_task("simulating", total=rounds * len(self.learners))

            def describe(text: str) -> None:
                progress.update(bar, description=text)
                progress.advance(bar, 0.5)

            for round_number in range(1, rounds + 1):
                rows = self.run_round(round_number, progress=describe)
                progress.update(bar, completed=round_number * len(self.learners))
                if round_number == rounds or (self.save_every and round_number % self.save_every == 0):
                    self.save_base(round_number, rows)
                console.print(round_line(rows))
        return self.rows

    # ------------------------------------------------------------------ outputs
    def save_base(self, round_number: int, rows: list[RoundRow]) -> Path:
        """The fused base of ``round_number`` as a Hugging Face folder (with the rule's state), atomically."""
        learner = self.learners[0]
        copy_into(learner.body, self.base)
        final = self.output_dir / round_dir_name(round_number)
        with atomic_folder(final) as folder:
            save_body_folder(learner.model, learner.tokenizer, folder)
            if self.state:
                state = {f"state.{index}": tensor.contiguous() for index, tensor in enumerate(self.state)}
                save_file(state, folder / STATE_FILE)
            metadata = {
                "round": round_number,
                "contributors": self.names,
                "rule": self.rule.signature(),
                "rows": [row.__dict__ for row in rows],
                "time": time.time(),
            }
            (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        point_latest(self.output_dir, final)
        return final

    def write_report(self, settings: dict[str, Any]) -> Path:
        rows = [row.__dict__ for row in self.rows]
        write_rounds(rows, self.output_dir)
        path = self.output_dir / "simulation.json"
        path.write_text(json.dumps({"settings": settings, "rule": self.rule.signature(), "rounds": rows}, indent=2))
        return path


def round_line(rows: list[RoundRow]) -> str:
    """One console line per round: each contributor's accuracy before -> after fusion (re-fit) vs majority."""
    parts = [
        f"{row.peer} {100 * row.accuracy_before:.0f}->{100 * row.accuracy_after_old_head:.0f}/"
        f"{100 * row.accuracy_after:.0f}% (maj {100 * row.majority_rate:.0f})"
        for row in rows
    ]
    return f"round {rows[0].round}: " + ", ".join(parts)


def run_simulation(config: SimulateConfig, console: Console | None = None) -> Path:
    settings = config.simulate
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    console = console or Console(highlight=False)
    simulation = Simulation.from_names(
        settings.contributors, parse_peer_settings(settings.peer_settings), settings.output_dir, settings.save_every
    )
    started = time.perf_counter()
    simulation.run(settings.rounds, console)
    path = simulation.write_report({**settings.__dict__, "seconds": time.perf_counter() - started})
    console.print(f"fused base: {settings.output_dir}/latest; report: {path} (rounds.csv, rounds.png beside it)")
    return path
