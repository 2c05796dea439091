"""ColD Fusion's evaluation protocol: is a fused base a better starting point than the original?

The paper answers with two kinds of datasets and several ways of using a base:

- *seen* datasets are ones the swarm trained on, *unseen* ones it never saw; each is judged on a
  held-out test split that no run ever trains on (a folder's ``test`` file, or a seeded split
  carved from a single file with :func:`coldfusion_p2p.contributor.data.split_indices`).
- *finetune*: a fresh head on the base, every weight trained to convergence: epochs over the
  train split less a seeded validation split carved from it, early stopping on that split's
  accuracy, and the best validated weights tested (``finetune_epochs 0`` instead trains a fixed
  ``finetune_steps``, the older protocol, which on hard tasks leaves bases at the majority class);
  *finetune_few_shot*: the same from ``few_shot_examples`` examples per class for a fixed number
  of steps; *linear_probe*: the body frozen, only the model's own classification head trained.

Every base gets exactly the same datasets, subsamples, validation splits, few-shot examples,
seeds and hyperparameters, so the accuracy differences are the bases' alone. Each run records
whether it got each test example right, so :func:`summarize` (in :mod:`coldfusion_p2p.evaluation.report`)
compares bases paired, with a bootstrap confidence interval over seeds and test examples and a
verdict; a single seed shows only the test examples' share of the uncertainty, so claims need
``--seeds 3`` or more. :func:`evaluate_bases` runs the grid, :func:`write_report` leaves CSV,
JSON and plots behind.

The linear probe computes the frozen body's outputs once per example and replays them into the
model's own forward (see :mod:`coldfusion_p2p.contributor.head_fit`), at the cost of one body pass per example.

This module is the protocol itself: the methods and the grid that runs them. The datasets and
their splits are read in :mod:`coldfusion_p2p.evaluation.tasks`, the ``--base`` models resolved
and checked in :mod:`coldfusion_p2p.evaluation.bases`, so each can be read and tested alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedModel

from coldfusion_p2p.config import EvaluateConfig, EvaluationSettings, TrainingConfig
from coldfusion_p2p.contributor.data import TextSplit
from coldfusion_p2p.contributor.device import autocast, available_device, grad_scaler
from coldfusion_p2p.contributor.head_fit import FrozenBody, train_head
from coldfusion_p2p.contributor.model import body_parameters, forward_input_names, load_classifier, load_tokenizer
from coldfusion_p2p.contributor.trainer import (
    EVAL_BATCH_SIZE,
    SCHEDULES,
    EncodedSplit,
    LocalTrainer,
    batch_indices,
    collate,
    encode_split,
    pad_token_id,
)
from coldfusion_p2p.evaluation.bases import load_bases
from coldfusion_p2p.evaluation.report import (  # re-exported: the evaluation's public interface
    METHOD_TITLES,
    REPORT_FILES,
    EvalResult,
    plot_summary,
    results_table,
    summarize,
    write_report,
)
from coldfusion_p2p.evaluation.statistics import at_majority, encode_correct, majority_rate
from coldfusion_p2p.evaluation.tasks import EvalTask, carve_validation, few_shot_split, load_tasks

__all__ = [
    "METHOD_TITLES",
    "REPORT_FILES",
    "EvalResult",
    "evaluate_bases",
    "plot_summary",
    "results_table",
    "run_evaluation",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)

WEIGHT_DECAY = 0.01  # as TrainingConfig's default, for every method


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    """What one run of a method leaves: per-example test correctness and how it was trained."""

    correct: np.ndarray  # bool, one per test example in order
    steps: int  # optimizer steps taken
    best_step: int  # the step whose weights were tested
    validation_accuracy: float | None = None  # of those weights, on the early-stopping split
    history: tuple[tuple[int, float], ...] = ()  # (step, validation accuracy) of every validation

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else math.nan


@dataclass(frozen=True)
class Convergence:
    steps: int
    best_step: int
    best_accuracy: float
    history: tuple[tuple[int, float], ...]


def finetune_run(
    base: str,
    task: EvalTask,
    *,
    seed: int,
    lr: float,
    batch_size: int,
    max_length: int,
    epochs: int,
    patience: int = 1,
    steps: int = 0,
    validation_fraction: float = 0.15,
    eval_every: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
) -> RunOutcome:
    """Full finetuning from a fresh head seeded by ``seed``, then per-example test correctness.

    With ``epochs`` > 0: up to that many epochs over the train split less a seeded
    ``validation_fraction`` carved from it, early-stopped (see :func:`finetune_to_convergence`).
    With ``epochs`` = 0: exactly ``steps`` steps on the whole train split (the fixed budget).
    """
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, task.label_names, seed).to(device)
    test = encode_split(tokenizer, task.test, max_length)
    if epochs <= 0:
        config = _training_config(base, steps, lr, batch_size, seed, precision)
        LocalTrainer(model, tokenizer, task.train, task.test, config, max_length=max_length).train_round(1)
        return RunOutcome(predict_correct(model, test), steps, steps)
    fit, validation = carve_validation(task.train, validation_fraction, seed)
    run = finetune_to_convergence(
        model,
        tokenizer,
        fit,
        validation,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        epochs=epochs,
        patience=patience,
        eval_every=eval_every,
        precision=precision,
    )
    return RunOutcome(predict_correct(model, test), run.steps, run.best_step, run.best_accuracy, run.history)


def finetune_to_convergence(
    model: PreTrainedModel,
    tokenizer,
    train: TextSplit,
    validation: TextSplit,
    *,
    seed: int,
    lr: float,
    batch_size: int,
    max_length: int,
    epochs: int,
    patience: int,
    eval_every: int = 0,
    on_validation: Callable[[int, float], None] | None = None,
    precision: str = "fp32",
) -> Convergence:
    """Finetune ``model`` in place with early stopping; it ends holding its best validated weights.

    One AdamW with a linear warm-up (10%) and decay planned over ``epochs`` epochs; the batches
    are :class:`LocalTrainer`'s seeded stream. Validation accuracy is measured every epoch (or
    every ``eval_every`` steps); training stops after ``patience`` validations without a strictly
    better one, and the state of the best (head and body, kept in memory) is loaded back.
    ``on_validation(step, accuracy)`` is called after every validation, before any restore.
    """
    config = _training_config("", 1, lr, batch_size, seed, precision)
    trainer = LocalTrainer(
        model, tokenizer, train, validation, config, max_length=max_length, max_eval_examples=len(validation)
    )
    per_epoch = math.ceil(len(trainer.train_data) / batch_size)
    total, interval = epochs * per_epoch, eval_every or per_epoch
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = SCHEDULES["linear"](optimizer, math.floor(0.1 * total), total)
    torch.manual_seed(seed * 1_000_003 + 1)  # dropout, as the trainer's first round
    best, best_step, best_state, waited, history = (-1.0, -math.inf), 0, None, 0, []
    model.train()
    step = 0
    scaler = grad_scaler(trainer.device, precision)
    for step in range(1, total + 1):
        batch = collate(trainer.train_data, trainer.batch(step - 1), trainer.input_names, trainer.device)
        with autocast(trainer.device, precision):
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16: scaled so small gradients do not underflow; a step with an overflow is skipped
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % interval and step != total:
            continue
        stats = trainer.evaluate()
        history.append((step, stats.accuracy))
        if on_validation is not None:
            on_validation(step, stats.accuracy)
        if (stats.accuracy, -stats.loss) > best:  # ties in accuracy (a plateau) go to the lower loss
            best, best_step, waited = (stats.accuracy, -stats.loss), step, 0
            best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
        model.train()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return Convergence(step, best_step, best[0], tuple(history))


def few_shot_run(
    base: str,
    task: EvalTask,
    *,
    seed: int,
    lr: float,
    batch_size: int,
    max_length: int,
    shots: int,
    steps: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> RunOutcome:
    """Full finetuning for ``steps`` steps on ``shots`` training examples per class (seeded)."""
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, task.label_names, seed).to(device)
    train = few_shot_split(task.train, shots, seed)
    config = _training_config(base, steps, lr, min(batch_size, len(train)), seed, precision)
    LocalTrainer(model, tokenizer, train, task.test, config, max_length=max_length).train_round(1)
    return RunOutcome(predict_correct(model, encode_split(tokenizer, task.test, max_length)), steps, steps)


def linear_probe_run(
    base: str,
    task: EvalTask,
    *,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    device: str = "cpu",
) -> RunOutcome:
    """``steps`` AdamW steps on the head alone, the body frozen (and in eval mode), in fp32 whatever
    ``--precision`` (the head fit is cheap and replays cached body outputs)."""
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, task.label_names, seed).to(device)
    return probe_model(
        model, tokenizer, task, seed=seed, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length
    )


def probe_model(
    model: PreTrainedModel,
    tokenizer,
    task: EvalTask,
    *,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    replay: bool = True,
) -> RunOutcome:
    """Linear-probe ``model`` in place: freeze its body, train its head, test it.

    ``replay=False`` runs the frozen body in every step instead of replaying its cached outputs
    (same result up to float rounding, slower; for checks and exotic architectures).
    """
    for parameter in body_parameters(model):
        parameter.requires_grad_(False)
    body = FrozenBody(model, pad_token_id(tokenizer))
    train = encode_split(tokenizer, task.train, max_length)
    test = encode_split(tokenizer, task.test, max_length)
    batches = [batch_indices(len(train), batch_size, seed, step) for step in range(steps)]
    needed = np.unique(np.concatenate(batches)) if batches else np.arange(0)
    train_feed = body.prepare(train, needed, replay=replay)
    test_feed = body.prepare(test, np.arange(len(test)), replay=replay)
    train_head(body, train_feed, batches, lr=lr, seed=seed, weight_decay=WEIGHT_DECAY)
    model.eval()
    with torch.no_grad():
        chunks = [
            body.forward(test_feed, indices).logits.argmax(-1).cpu() == test.labels[indices]
            for indices in np.array_split(np.arange(len(test)), max(1, math.ceil(len(test) / EVAL_BATCH_SIZE)))
        ]
    return RunOutcome(torch.cat(chunks).numpy(), steps, steps)


def _training_config(
    base: str, steps: int, lr: float, batch_size: int, seed: int, precision: str = "fp32"
) -> TrainingConfig:
    return TrainingConfig(
        model=base or None,
        local_steps=steps,
        lr=lr,
        batch_size=batch_size,
        weight_decay=WEIGHT_DECAY,
        seed=seed,
        precision=precision,
    )


@torch.no_grad()
def predict_correct(model: PreTrainedModel, encoded: EncodedSplit) -> np.ndarray:
    """Whether ``model`` (in eval mode) classifies each example of ``encoded`` right, in order."""
    model.eval()
    names, chunks = forward_input_names(model), [np.zeros(0, dtype=bool)]
    device = next(model.parameters()).device
    for start in range(0, len(encoded), EVAL_BATCH_SIZE):
        batch = collate(encoded, np.arange(start, min(start + EVAL_BATCH_SIZE, len(encoded))), names, device)
        chunks.append((model(**batch).logits.argmax(-1) == batch["labels"]).cpu().numpy())
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


METHODS: dict[str, Callable[..., RunOutcome]] = {
    "finetune": finetune_run,
    "finetune_few_shot": few_shot_run,
    "linear_probe": linear_probe_run,
}


def method_options(settings: EvaluationSettings) -> dict[str, dict]:
    """Each method's keyword arguments from the settings (the same for every base)."""
    device = str(available_device(settings.device))  # asked for but absent: one clear error, before any run
    shared = dict(batch_size=settings.batch_size, max_length=settings.max_length, device=device)
    return {
        "finetune": dict(
            shared,
            lr=settings.lr,
            epochs=settings.finetune_epochs,
            patience=settings.patience,
            steps=settings.finetune_steps,
            validation_fraction=settings.validation_fraction,
            eval_every=settings.eval_every,
            precision=settings.precision,
        ),
        "finetune_few_shot": dict(
            shared,
            lr=settings.lr,
            shots=settings.few_shot_examples,
            steps=settings.few_shot_steps,
            precision=settings.precision,
        ),
        "linear_probe": dict(shared, lr=settings.probe_lr, steps=settings.probe_steps),
    }


def evaluate_bases(config: EvaluateConfig, console: Console | None = None) -> list[EvalResult]:
    """Run every method on every dataset for every base and seed, with one shared budget.

    Bases and datasets are all loaded and checked first, so a typo fails in seconds, not after
    the first base's runs. Progress goes to ``console`` (a bar on a terminal, one line per run
    otherwise; nothing with ``quiet``, JSON lines with ``log_format = "json"``).
    """
    settings, logs = config.evaluation, config.logging
    console = console or Console(highlight=False, soft_wrap=True)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    bases = load_bases(settings.base)
    tasks = load_tasks(config)
    jobs = [
        (task, base, seed, method)
        for task in tasks
        for base in bases
        for seed in range(settings.seeds)
        for method in settings.methods
    ]
    options = method_options(settings)
    results = []
    show_bar = console.is_terminal and not logs.quiet and logs.log_format != "json"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not show_bar) as progress:
        bar = progress.add_task("evaluating", total=len(jobs))
        for task, base, seed, method in jobs:
            progress.update(bar, description=f"{method} {base.label} on {task.name} (seed {seed})")
            started = time.perf_counter()
            outcome = METHODS[method](base.path, task, seed=seed, **options[method])
            rate = majority_rate(task.test.labels)
            result = EvalResult(
                base=base.path,
                base_label=base.label,
                dataset=task.name,
                seen=task.seen,
                method=method,
                seed=seed,
                accuracy=outcome.accuracy,
                seconds=time.perf_counter() - started,
                majority_rate=rate,
                at_majority=at_majority(outcome.accuracy, rate),
                steps=outcome.steps,
                best_step=outcome.best_step,
                validation_accuracy=outcome.validation_accuracy,
                correct=encode_correct(outcome.correct),
            )
            results.append(result)
            _report_result(console, result, logs.quiet, logs.log_format)
            progress.advance(bar)
    return results


def _report_result(console: Console, result: EvalResult, quiet: bool, log_format: str) -> None:
    if log_format == "json":
        console.file.write(json.dumps({"time": time.time(), "event": "result", **asdict(result)}) + "\n")
        console.file.flush()
    elif not quiet:
        kind = "seen" if result.seen else "unseen"
        console.print(
            f"{result.method} {result.base_label} on {result.dataset} ({kind}) seed {result.seed}: "
            f"accuracy {100 * result.accuracy:.1f}% (majority class {100 * result.majority_rate:.1f}%"
            f"{': AT MAJORITY' if result.at_majority else ''}) after {result.steps} steps in {result.seconds:.1f}s"
        )


def run_evaluation(config: EvaluateConfig, console: Console | None = None) -> list[EvalResult]:
    """The ``evaluate`` command: run the grid, print the table, write the report, say where it went."""
    console = console or Console(highlight=False, soft_wrap=True)
    results = evaluate_bases(config, console=console)
    summary = summarize(results, resamples=config.evaluation.bootstrap_resamples)
    paths = write_report(results, summary, config.evaluation.report_dir, config=config)
    if config.logging.log_format == "json":
        record = {"time": time.time(), "event": "summary", "summary": summary}
        record["files"] = {key: str(path) for key, path in paths.items()}
        console.file.write(json.dumps(record) + "\n")
        console.file.flush()
    else:
        console.print(results_table(summary))
        console.print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return results
