"""ColD Fusion's evaluation protocol: is a fused base a better starting point than the original?

The paper answers with two kinds of datasets and two ways of using a base:

- *seen* datasets are ones the swarm trained on, *unseen* ones it never saw; each is judged on a
  held-out test split that no run ever trains on (a folder's ``test`` file, or a seeded split
  carved from a single file with :func:`coldfusion_p2p.data.split_indices`).
- *finetune*: a fresh head on the base, every weight trained for a fixed number of steps;
  *linear_probe*: the body frozen, only the model's own classification head trained.

Every base gets exactly the same datasets, subsamples, seeds, hyperparameters and step budget,
so the accuracy differences are the bases' alone. :func:`evaluate_bases` runs the grid,
:func:`summarize` reduces it to mean ± std over seeds with the difference to the first base,
and :func:`write_report` leaves CSV, JSON and a bar chart behind.

The linear probe computes the frozen body's outputs once per example and replays them into the
model's own forward (the body's ``forward`` is swapped for a lookup), so every architecture's
head (BERT's pooler path, RoBERTa's ``<s>`` dense head, DeBERTa's context pooler...) is trained
exactly as it would be on a live body, at the cost of one body pass per example. When replaying
is not possible (an exotic body output, or too large a cache) it falls back to running the frozen
body in every step, which gives the same result more slowly.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import AutoConfig, PreTrainedModel

from coldfusion_p2p.config import DataConfig, EvaluateConfig, SectionedConfig, TrainingConfig
from coldfusion_p2p.data import FILE_FORMATS, TaskData, TextSplit, load_task_data
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.head_fit import FrozenBody, head_accuracy, train_head
from coldfusion_p2p.model import (
    body_parameters,
    load_classifier,
    load_tokenizer,
    resolve_model_name,
)
from coldfusion_p2p.trainer import (
    LocalTrainer,
    batch_indices,
    encode_split,
    pad_token_id,
)

logger = logging.getLogger(__name__)

METHOD_TITLES = {"finetune": "full finetuning", "linear_probe": "linear probe (frozen body)"}
BUNDLED = "bundled"
WEIGHT_DECAY = 0.01  # as TrainingConfig's default, for both methods
REPORT_FILES = ("results.csv", "summary.csv", "results.json", "evaluation.png")


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """One dataset of the evaluation: a train split, a held-out test split and the label vocabulary."""

    name: str
    train: TextSplit
    test: TextSplit
    label_names: list[str]
    seen: bool


def load_eval_task(
    spec: str,
    *,
    seen: bool,
    max_train_examples: int,
    max_test_examples: int,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> EvalTask:
    """Read a dataset for evaluation; UserError for anything unusable.

    ``spec`` is a folder holding ``train.<ext>`` and ``test.<ext>`` (used as given), or anything
    ``--dataset`` accepts (a file, a ``save_to_disk`` folder, a Hub name): then its validation
    split, or a seeded ``test_fraction`` carved from its rows, is the test split. Both splits are
    then subsampled (seeded) to at most ``max_train_examples`` / ``max_test_examples``.
    """
    path = Path(spec).expanduser()
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    train_file = _split_file(path, "train") if path.is_dir() else None
    if train_file is not None:
        test_file = _split_file(path, "test")
        if test_file is None:
            raise UserError(
                f"folder {path} has {train_file.name} but no test file",
                f"add test{train_file.suffix} beside it, or pass {train_file} alone to carve a test split",
            )
        name = path.name
        train_data = load_task_data(DataConfig(dataset=str(train_file), **columns), split_seed)
        test_data = load_task_data(
            DataConfig(
                dataset=str(test_file),
                text_column=train_data.text_column,
                text_pair_column=train_data.text_pair_column,
                label_column=train_data.label_column,
            ),
            split_seed,
        )
        if (test_data.text_pair_column is None) != (train_data.text_pair_column is None):
            raise UserError(
                f"{train_file} and {test_file} disagree on the text pair column "
                f"({train_data.text_pair_column} vs {test_data.text_pair_column})",
                "give both files the same columns",
            )
        label_names = train_data.label_names
        train = _whole(train_data)
        test = _relabel(_whole(test_data), test_data.label_names, label_names, test_file, train_file)
    else:
        data = load_task_data(DataConfig(dataset=spec, validation_fraction=test_fraction, **columns), split_seed)
        name, label_names, train, test = data.name, data.label_names, data.train, data.validation
    return EvalTask(
        name=name,
        train=_subsample(train, max_train_examples, [split_seed, 1]),
        test=_subsample(test, max_test_examples, [split_seed, 2]),
        label_names=label_names,
        seen=seen,
    )


def _split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in FILE_FORMATS if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise UserError(
            f"folder {folder} has several {split} files ({', '.join(path.name for path in found)})",
            f"keep only one {split} file",
        )
    return found[0] if found else None


def _whole(data: TaskData) -> TextSplit:
    """A file read by load_task_data back in one piece (it always carves a validation split)."""
    first, second = data.train, data.validation
    return TextSplit(
        texts=first.texts + second.texts,
        text_pairs=None if first.text_pairs is None else first.text_pairs + (second.text_pairs or []),
        labels=first.labels + second.labels,
    )


def _relabel(split: TextSplit, names: list[str], target: list[str], test_file: Path, train_file: Path) -> TextSplit:
    """Express the test labels as indices into the train label vocabulary."""
    index = {name: position for position, name in enumerate(target)}
    unknown = sorted({names[label] for label in split.labels} - set(index))
    if unknown:
        raise UserError(
            f"label(s) {', '.join(map(repr, unknown))} of {test_file} never occur in {train_file}",
            "a head cannot learn labels it never sees: add them to the train file or drop those test rows",
        )
    return TextSplit(split.texts, split.text_pairs, [index[names[label]] for label in split.labels])


def _subsample(split: TextSplit, limit: int, seed: list[int]) -> TextSplit:
    """At most ``limit`` rows, chosen by a seeded permutation, kept in their original order."""
    if len(split) <= limit:
        return split
    keep = sorted(np.random.default_rng(seed).permutation(len(split))[:limit].tolist())
    return TextSplit(
        texts=[split.texts[i] for i in keep],
        text_pairs=None if split.text_pairs is None else [split.text_pairs[i] for i in keep],
        labels=[split.labels[i] for i in keep],
    )


# ---------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    label: str  # how tables and plots name it
    path: str  # what load_classifier loads


def parse_base(value: str) -> BaseSpec:
    """``PATH``, ``LABEL=PATH`` or ``bundled``; a run's output folder stands for its ``latest`` checkpoint.

    Raises UserError for an empty label or path and for a local-looking path that does not exist.
    """
    value = value.strip()
    label, separator, target = value.partition("=")
    if not separator or "/" in label or "\\" in label:  # "=" inside a path is not a label
        label, target = "", value
    label, target = label.strip(), target.strip()
    if separator and not target:
        raise UserError(f"--base {value!r} names no model", "write LABEL=PATH, e.g. --base fused=out/latest")
    if not target:
        raise UserError("--base is empty", "pass a model folder, LABEL=PATH or bundled")
    if target == BUNDLED:
        return BaseSpec(label or BUNDLED, resolve_model_name(None))
    path = Path(target).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and (path / "latest" / "config.json").exists():
            path = path / "latest"  # a peer's --output-dir: its newest fused base
        return BaseSpec(label or Path(target.rstrip("/\\")).name or target, str(path))
    try:
        resolved = resolve_model_name(target)
    except UserError:
        raise UserError(f"base model folder {target} does not exist", "check the --base path") from None
    return BaseSpec(label or target, resolved)


def _check_base(base: BaseSpec) -> None:
    """Fail before any training when a base has no usable config or tokenizer."""
    try:
        AutoConfig.from_pretrained(base.path)
        load_tokenizer(base.path)
    except (UserError, OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"base {base.label!r} ({base.path}) could not be loaded ({reason})",
            "pass --base a Hugging Face model folder with config.json, weights and tokenizer files, or bundled",
        ) from None


# ---------------------------------------------------------------------------------------------
# The two methods
# ---------------------------------------------------------------------------------------------


def finetune_accuracy(
    base: str, task: EvalTask, *, seed: int, steps: int, lr: float, batch_size: int, max_length: int
) -> float:
    """Test accuracy after ``steps`` AdamW steps of full finetuning with a fresh head seeded by ``seed``."""
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, task.label_names, seed)
    config = TrainingConfig(
        model=base, local_steps=steps, lr=lr, batch_size=batch_size, weight_decay=WEIGHT_DECAY, seed=seed
    )
    trainer = LocalTrainer(
        model, tokenizer, task.train, task.test, config, max_length=max_length, max_eval_examples=len(task.test)
    )
    trainer.train_round(round_number=1)
    return trainer.evaluate().accuracy


def linear_probe_accuracy(
    base: str, task: EvalTask, *, seed: int, steps: int, lr: float, batch_size: int, max_length: int
) -> float:
    """Test accuracy after ``steps`` AdamW steps on the head alone, the body frozen (and in eval mode)."""
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, task.label_names, seed)
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
) -> float:
    """Linear-probe ``model`` in place: freeze its body, train its head, return test accuracy.

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
    return head_accuracy(body, test_feed)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One run: one base, one dataset, one seed, one method."""

    base: str  # what was loaded (a folder or a Hub name)
    base_label: str
    dataset: str
    seen: bool
    method: str  # "finetune" | "linear_probe"
    seed: int
    accuracy: float
    seconds: float


METHODS = {"finetune": finetune_accuracy, "linear_probe": linear_probe_accuracy}


def _repeated(names: Sequence[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


def load_bases(values: Sequence[str]) -> list[BaseSpec]:
    """Parse and check every ``--base``; labels must be distinct."""
    bases = [parse_base(value) for value in values]
    duplicates = _repeated([base.label for base in bases])
    if duplicates:
        raise UserError(
            f"several bases are labelled {', '.join(map(repr, duplicates))}",
            "name them with LABEL=PATH, e.g. --base original=PATH --base fused=PATH",
        )
    for base in bases:
        _check_base(base)
    return bases


def load_tasks(config: EvaluateConfig) -> list[EvalTask]:
    """Every seen then unseen dataset, subsampled and split; names must be distinct."""
    settings = config.evaluation
    options = dict(
        max_train_examples=settings.max_train_examples,
        max_test_examples=settings.max_test_examples,
        test_fraction=settings.test_fraction,
    )
    tasks = [load_eval_task(spec, seen=True, **options) for spec in settings.dataset]
    tasks += [load_eval_task(spec, seen=False, **options) for spec in settings.unseen]
    duplicates = _repeated([task.name for task in tasks])
    if duplicates:
        raise UserError(
            f"several datasets are named {', '.join(map(repr, duplicates))} (a file's stem or a folder's name)",
            "rename the files or folders so that every dataset has its own name",
        )
    return tasks


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
    hyperparameters = {
        "finetune": dict(steps=settings.finetune_steps, lr=settings.lr),
        "linear_probe": dict(steps=settings.probe_steps, lr=settings.probe_lr),
    }
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
            accuracy = METHODS[method](
                base.path,
                task,
                seed=seed,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                **hyperparameters[method],
            )
            result = EvalResult(
                base=base.path,
                base_label=base.label,
                dataset=task.name,
                seen=task.seen,
                method=method,
                seed=seed,
                accuracy=accuracy,
                seconds=time.perf_counter() - started,
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
            f"accuracy {100 * result.accuracy:.1f}% in {result.seconds:.1f}s"
        )


# ---------------------------------------------------------------------------------------------
# Summary, table, report
# ---------------------------------------------------------------------------------------------


def summarize(results: Sequence[EvalResult], bases: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (dataset, method, base), and "ALL seen"/"ALL unseen" per (method, base).

    ``std`` is the sample standard deviation over seeds (0 for one seed). ``delta_vs_first_base``
    is the mean minus the first base's mean on the same dataset and method; the first base is
    ``bases[0]`` or else the first label in ``results`` (evaluate_bases keeps --base order).
    Aggregate rows average the dataset means; their std is over seeds of the per-seed average
    across datasets (seeds every dataset has), ``datasets`` says how many were averaged.
    """
    base_order = list(dict.fromkeys([*(bases or []), *(result.base_label for result in results)]))
    dataset_order = list(dict.fromkeys((result.seen, result.dataset) for result in results))
    dataset_order.sort(key=lambda item: not item[0])  # seen first, each group in order of appearance
    method_order = list(dict.fromkeys(result.method for result in results))
    paths = {result.base_label: result.base for result in results}
    grouped: dict[tuple, dict[int, float]] = {}
    for result in results:
        key = (result.seen, result.dataset, result.method, result.base_label)
        grouped.setdefault(key, {})[result.seed] = result.accuracy

    rows = []
    for seen, dataset in dataset_order:
        for method in method_order:
            for base in base_order:
                by_seed = grouped.get((seen, dataset, method, base))
                if by_seed:
                    rows.append(_row(dataset, seen, method, base, paths.get(base, ""), list(by_seed.values())))
    for seen in (True, False):
        for method in method_order:
            for base in base_order:
                datasets = [d for s, d in dataset_order if s == seen and (seen, d, method, base) in grouped]
                if not datasets:
                    continue
                per_dataset = [grouped[seen, dataset, method, base] for dataset in datasets]
                seeds = sorted(set.intersection(*(set(values) for values in per_dataset)))
                per_seed = [float(np.mean([values[seed] for values in per_dataset])) for seed in seeds]
                row = _row(f"ALL {'seen' if seen else 'unseen'}", seen, method, base, paths.get(base, ""), per_seed)
                row["mean"] = float(np.mean([np.mean(list(values.values())) for values in per_dataset]))
                row.update(datasets=len(datasets), aggregate=True)
                rows.append(row)
    first = base_order[0] if base_order else None
    reference = {
        (row["dataset"], row["seen"], row["method"]): row["mean"] for row in rows if row["base_label"] == first
    }
    for row in rows:
        baseline = reference.get((row["dataset"], row["seen"], row["method"]))
        row["delta_vs_first_base"] = None if baseline is None else row["mean"] - baseline
    return rows


def _row(dataset: str, seen: bool, method: str, base: str, path: str, values: list[float]) -> dict:
    return {
        "dataset": dataset,
        "seen": seen,
        "method": method,
        "base_label": base,
        "base": path,
        "mean": float(np.mean(values)) if values else math.nan,
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
        "datasets": 1,
        "aggregate": False,
    }


def results_table(summary: Sequence[dict[str, Any]]) -> Table:
    """Accuracy (%) as mean ± std over seeds, one column per base with its delta to the first base.

    Seen and unseen datasets are separate sections; "ALL" rows (averages over datasets) close each
    section when it holds more than one dataset.
    """
    bases = list(dict.fromkeys(row["base_label"] for row in summary))
    methods = list(dict.fromkeys(row["method"] for row in summary))
    seeds = max((row["n"] for row in summary), default=0)
    first = bases[0] if bases else "-"
    table = Table(
        title=f"test accuracy (%), mean ± std over {seeds} seed{'s' if seeds != 1 else ''}; Δ vs {first}",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("dataset")
    table.add_column("method")
    for base in bases:
        table.add_column(base, justify="right")
    cells = {(row["seen"], row["dataset"], row["method"], row["base_label"]): row for row in summary}
    for seen in (True, False):
        names = list(dict.fromkeys(row["dataset"] for row in summary if row["seen"] == seen and not row["aggregate"]))
        if not names:
            continue
        if table.row_count:
            table.add_section()
        aggregate = f"ALL {'seen' if seen else 'unseen'}"
        rows = [(name, False) for name in names] + ([(aggregate, True)] if len(names) > 1 else [])
        group = "seen" if seen else "unseen"
        for name, bold in rows:
            for method in methods:
                values = [_cell(cells.get((seen, name, method, base)), base == first) for base in bases]
                if all(value == "-" for value in values):
                    continue
                style = "bold" if bold else None
                table.add_row(group, name, method, *values, style=style)
                group = ""
    return table


def _cell(row: dict[str, Any] | None, is_first: bool) -> str:
    if row is None:
        return "-"
    text = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    delta = row.get("delta_vs_first_base")
    if is_first or delta is None:
        return text
    color = "green" if delta > 0 else "red" if delta < 0 else "white"
    return f"{text} [{color}]({100 * delta:+.1f})[/{color}]"


def write_report(
    results: Sequence[EvalResult],
    summary: Sequence[dict[str, Any]],
    output_dir: str | Path,
    config: SectionedConfig | dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write results.csv, summary.csv, results.json and evaluation.png into ``output_dir``."""
    folder = Path(output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create report folder {folder} ({error.strerror})", "pass another --report-dir"
        ) from None
    paths = dict(zip(("results", "summary", "json", "plot"), (folder / name for name in REPORT_FILES), strict=True))
    rows = [asdict(result) for result in results]
    _write_csv(paths["results"], rows, [field.name for field in fields(EvalResult)])
    summary_keys = ["dataset", "seen", "method", "base_label", "base", "mean", "std", "n", "datasets", "aggregate"]
    _write_csv(paths["summary"], list(summary), [*summary_keys, "delta_vs_first_base"])
    config_values = config.to_dict() if isinstance(config, SectionedConfig) else config
    payload = {"config": config_values, "results": rows, "summary": list(summary)}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_summary(summary, paths["plot"])
    return paths


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_summary(summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: one subplot per method, one group per dataset (seen | unseen), one bar per base."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg for savefig

    bases = list(dict.fromkeys(row["base_label"] for row in summary))
    methods = list(dict.fromkeys(row["method"] for row in summary))
    cells = {(row["seen"], row["dataset"], row["method"], row["base_label"]): row for row in summary}
    groups: list[tuple[bool, str]] = []
    for seen in (True, False):
        names = list(dict.fromkeys(row["dataset"] for row in summary if row["seen"] == seen and not row["aggregate"]))
        groups += [(seen, name) for name in names]
        if len(names) > 1:
            groups.append((seen, f"ALL {'seen' if seen else 'unseen'}"))
    gap = 0.6  # extra space between the seen and the unseen datasets
    positions = []
    for index, (seen, _) in enumerate(groups):
        positions.append(index + (gap if not seen and any(s for s, _ in groups) else 0.0))
    width = 0.8 / max(1, len(bases))
    figure = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(bases)) ** 0.5 + 2), 3.6 * max(1, len(methods))))
    axes = figure.subplots(max(1, len(methods)), 1, squeeze=False)[:, 0]
    colors = [f"C{index % 10}" for index in range(len(bases))]
    for axis, method in zip(axes, methods or ["-"], strict=False):
        for number, base in enumerate(bases):
            offsets = [position + (number - (len(bases) - 1) / 2) * width for position in positions]
            rows = [cells.get((seen, name, method, base)) for seen, name in groups]
            means = [100 * row["mean"] if row else 0.0 for row in rows]
            errors = [100 * row["std"] if row else 0.0 for row in rows]
            bars = axis.bar(offsets, means, width, yerr=errors, capsize=3, label=base, color=colors[number])
            for bar, row in zip(bars, rows, strict=True):
                if row and row["aggregate"]:
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
        axis.set_xticks(positions, [name for _, name in groups], rotation=20, ha="right")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.set_title(METHOD_TITLES.get(method, method), pad=18)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
        seen_positions = [p for p, (s, _) in zip(positions, groups, strict=True) if s]
        unseen_positions = [p for p, (s, _) in zip(positions, groups, strict=True) if not s]
        if unseen_positions:  # shade the datasets the swarm never saw
            axis.axvspan(unseen_positions[0] - 0.5, unseen_positions[-1] + 0.5, color="0.93", zorder=0)
        for label, spots in (("seen datasets", seen_positions), ("unseen datasets", unseen_positions)):
            if spots:
                axis.text(
                    (spots[0] + spots[-1]) / 2,
                    1.01,
                    label,
                    transform=axis.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontweight="bold",
                )
        axis.set_xlim(positions[0] - 0.6, positions[-1] + 0.6)
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="base")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def run_evaluation(config: EvaluateConfig, console: Console | None = None) -> list[EvalResult]:
    """The ``evaluate`` command: run the grid, print the table, write the report, say where it went."""
    console = console or Console(highlight=False, soft_wrap=True)
    results = evaluate_bases(config, console=console)
    summary = summarize(results)
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
