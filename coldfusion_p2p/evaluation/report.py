"""What the evaluation leaves behind: one record per run, the summary, the table, CSV/JSON and plots.

Every run records its per-example test correctness, so :func:`summarize` can compare two bases
*paired*, on the same test examples and seeds: each base after the first gets its delta to the
first base with a 95% bootstrap confidence interval (:mod:`coldfusion_p2p.evaluation.statistics`) and a
verdict, "better" or "worse" only when the interval excludes 0. The majority-class rate of each
test set stands beside every accuracy, and a run at or below it is flagged: such a run learned
nothing visible, and a delta between two of them says nothing about the bases.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from coldfusion_p2p.config import SectionedConfig
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.evaluation.statistics import RESAMPLES, aggregate_delta, decode_correct

METHOD_TITLES = {
    "finetune": "full finetuning",
    "finetune_few_shot": "few-shot finetuning",
    "linear_probe": "linear probe (frozen body)",
}
REPORT_FILES = ("results.csv", "summary.csv", "results.json", "evaluation.png")
SUMMARY_COLUMNS = [
    "dataset",
    "seen",
    "method",
    "base_label",
    "base",
    "mean",
    "std",
    "n",
    "datasets",
    "aggregate",
    "examples",
    "majority_rate",
    "at_majority",
    "at_majority_runs",
    "delta_vs_first_base",
    "ci_low",
    "ci_high",
    "verdict",
]
CLAIM_SEEDS = 3  # fewer seeds show the test examples' uncertainty but not the runs'


@dataclass
class EvalResult:
    """One run: one base, one dataset, one seed, one method."""

    base: str  # what was loaded (a folder or a Hub name)
    base_label: str
    dataset: str
    seen: bool
    method: str  # "finetune" | "finetune_few_shot" | "linear_probe"
    seed: int
    accuracy: float
    seconds: float
    majority_rate: float = math.nan  # accuracy of always predicting the test set's most common label
    at_majority: bool = False  # accuracy at or below majority_rate
    steps: int = 0  # optimizer steps taken
    best_step: int = 0  # the step whose weights were tested (early stopping keeps the best)
    validation_accuracy: float | None = None  # of the tested weights, on the split carved for early stopping
    correct: str = ""  # per test example, in order: "1" right, "0" wrong (for paired comparisons)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarize(
    results: Sequence[EvalResult],
    bases: Sequence[str] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (dataset, method, base), and "ALL seen"/"ALL unseen" per (method, base).

    ``std`` is the sample standard deviation over seeds (0 for one seed). ``delta_vs_first_base``
    is the paired delta to the first base on the same dataset and method (``bases[0]`` or else
    the first label in ``results``), with ``ci_low``/``ci_high`` its 95% bootstrap interval over
    seeds and test examples (``resamples`` replicates, seeded by ``seed``) and ``verdict``; the
    interval is None when the runs carry no per-example correctness. Aggregate rows average the
    dataset means and deltas; their std is over seeds of the per-seed average across datasets
    (seeds every dataset has), ``datasets`` says how many were averaged.
    """
    base_order = list(dict.fromkeys([*(bases or []), *(result.base_label for result in results)]))
    dataset_order = list(dict.fromkeys((result.seen, result.dataset) for result in results))
    dataset_order.sort(key=lambda item: not item[0])  # seen first, each group in order of appearance
    method_order = list(dict.fromkeys(result.method for result in results))
    paths = {result.base_label: result.base for result in results}
    grouped: dict[tuple, dict[int, EvalResult]] = {}
    for result in results:
        grouped.setdefault((result.seen, result.dataset, result.method, result.base_label), {})[result.seed] = result

    rows, covered = [], []  # covered: the datasets behind each row
    for seen, dataset in dataset_order:
        for method in method_order:
            for base in base_order:
                by_seed = grouped.get((seen, dataset, method, base))
                if by_seed:
                    rows.append(_row(dataset, seen, method, base, paths.get(base, ""), list(by_seed.values())))
                    covered.append([dataset])
    for seen in (True, False):
        for method in method_order:
            for base in base_order:
                datasets = [d for s, d in dataset_order if s == seen and (seen, d, method, base) in grouped]
                if not datasets:
                    continue
                per_dataset = [grouped[seen, dataset, method, base] for dataset in datasets]
                seeds = sorted(set.intersection(*(set(values) for values in per_dataset)))
                per_seed = [float(np.mean([values[s].accuracy for values in per_dataset])) for s in seeds]
                name = f"ALL {'seen' if seen else 'unseen'}"
                row = _row(name, seen, method, base, paths.get(base, ""), [])
                parts = [_row("", seen, method, base, "", list(values.values())) for values in per_dataset]
                row.update(
                    mean=float(np.mean([part["mean"] for part in parts])),
                    std=float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                    n=len(per_seed),
                    examples=sum(part["examples"] for part in parts),
                    majority_rate=float(np.mean([part["majority_rate"] for part in parts])),
                    at_majority_runs=sum(part["at_majority_runs"] for part in parts),
                    datasets=len(datasets),
                    aggregate=True,
                )
                row["at_majority"] = row["at_majority_runs"] > 0
                rows.append(row)
                covered.append(datasets)
    first = base_order[0] if base_order else None
    reference = {(row["dataset"], row["seen"], row["method"]): row for row in rows if row["base_label"] == first}
    for row, datasets in zip(rows, covered, strict=True):
        baseline = reference.get((row["dataset"], row["seen"], row["method"]))
        row.update(delta_vs_first_base=None, ci_low=None, ci_high=None, verdict=None)
        if baseline is None:
            continue
        row["delta_vs_first_base"] = row["mean"] - baseline["mean"]
        if row["base_label"] == first:
            continue
        keys = [(row["seen"], dataset, row["method"]) for dataset in datasets]
        pairs = [_paired(grouped.get((*key, first)), grouped.get((*key, row["base_label"]))) for key in keys]
        if pairs and all(pair is not None for pair in pairs):
            estimate = aggregate_delta(pairs, resamples=resamples, seed=seed)
            row.update(
                delta_vs_first_base=estimate.delta,
                ci_low=estimate.low,
                ci_high=estimate.high,
                verdict=estimate.verdict,
            )
    return rows


def _row(dataset: str, seen: bool, method: str, base: str, path: str, runs: list[EvalResult]) -> dict:
    values = [run.accuracy for run in runs]
    majority = [run.majority_rate for run in runs if not math.isnan(run.majority_rate)]
    flagged = sum(bool(run.at_majority) for run in runs)
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
        "examples": len(runs[0].correct) if runs else 0,
        "majority_rate": majority[0] if majority else math.nan,
        "at_majority": flagged > 0,
        "at_majority_runs": flagged,
    }


def _paired(reference: dict[int, EvalResult] | None, other: dict[int, EvalResult] | None):
    """(seeds, examples) correctness of both bases on their common seeds; None when not comparable."""
    if not reference or not other:
        return None
    seeds = sorted(set(reference) & set(other))
    first = [decode_correct(reference[seed].correct) for seed in seeds]
    second = [decode_correct(other[seed].correct) for seed in seeds]
    lengths = {len(row) for row in first + second}
    if not seeds or len(lengths) != 1 or 0 in lengths:
        return None
    return np.vstack(first), np.vstack(second)


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def card_table(summary: Sequence[dict[str, Any]], label: str) -> str:
    """Base ``label``'s rows of ``summary`` against the first base, as a model card's Markdown table."""
    lines = [
        "| dataset | seen | method | accuracy | majority class | delta vs the original [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        if row["base_label"] != label:
            continue
        delta = row.get("delta_vs_first_base")
        ci = "" if row.get("ci_low") is None else f" [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"
        lines.append(
            f"| {row['dataset']} | {'seen' if row['seen'] else 'unseen'} | {row['method']} | "
            f"{100 * row['mean']:.1f}% | {100 * row['majority_rate']:.1f}% | "
            f"{'' if delta is None else f'{100 * delta:+.1f}'}{ci} | {row.get('verdict') or ''} |"
        )
    seeds = max((int(row.get("n") or 0) for row in summary), default=0)
    lines.append(f"\nPaired bootstrap intervals over test examples and {seeds} seed(s) (coldfusion-p2p evaluate).")
    return "\n".join(lines)


def results_table(summary: Sequence[dict[str, Any]]) -> Table:
    """Accuracy (%) as mean ± std over seeds, one column per base with its delta and 95% CI to the first.

    Seen and unseen datasets are separate sections; "ALL" rows (averages over datasets) close each
    section when it holds more than one dataset. "maj" is the test set's majority-class rate, and
    "≤maj" marks a cell whose runs were at or below it.
    """
    bases = list(dict.fromkeys(row["base_label"] for row in summary))
    methods = list(dict.fromkeys(row["method"] for row in summary))
    seeds = max((row["n"] for row in summary), default=0)
    first = bases[0] if bases else "-"
    title = (
        f"test accuracy (%), mean ± std over {seeds} seed{'s' if seeds != 1 else ''}; "
        f"Δ vs {first} [95% paired bootstrap CI]; ≤maj: at or below the majority-class rate"
    )
    if seeds < CLAIM_SEEDS:
        title += f"; claims need --seeds {CLAIM_SEEDS} or more"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("dataset")
    table.add_column("method")
    table.add_column("maj", justify="right")
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
                row_cells = [cells.get((seen, name, method, base)) for base in bases]
                if all(cell is None for cell in row_cells):
                    continue
                majority = next((cell["majority_rate"] for cell in row_cells if cell is not None), math.nan)
                values = [_cell(cell, base == first) for cell, base in zip(row_cells, bases, strict=True)]
                style = "bold" if bold else None
                table.add_row(group, name, method, _percent(majority), *values, style=style)
                group = ""
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _cell(row: dict[str, Any] | None, is_first: bool) -> str:
    if row is None:
        return "-"
    text = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    flagged = row.get("at_majority_runs", 0)
    if flagged:
        text += " ≤maj" if flagged >= row["n"] * row.get("datasets", 1) else f" ≤maj {flagged}/{row['n']}"
    delta = row.get("delta_vs_first_base")
    if is_first or delta is None:
        return text
    color = {"better": "green", "worse": "red"}.get(row.get("verdict"), "white")
    return f"{text} [{color}]({100 * delta:+.1f}{ci_text(row)})[/{color}]"


def ci_text(row: dict[str, Any]) -> str:
    """`` [low, high]`` in points, or nothing when the row has no interval."""
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return ""
    return f" [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


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
    _write_csv(paths["summary"], list(summary), SUMMARY_COLUMNS)
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
    """Per method: accuracy bars (± std, the majority rate as a black tick) and the deltas with their CI."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg for savefig

    bases = list(dict.fromkeys(row["base_label"] for row in summary))
    methods = list(dict.fromkeys(row["method"] for row in summary)) or ["-"]
    cells = {(row["seen"], row["dataset"], row["method"], row["base_label"]): row for row in summary}
    groups: list[tuple[bool, str]] = []
    for seen in (True, False):
        names = list(dict.fromkeys(row["dataset"] for row in summary if row["seen"] == seen and not row["aggregate"]))
        groups += [(seen, name) for name in names]
        if len(names) > 1:
            groups.append((seen, f"ALL {'seen' if seen else 'unseen'}"))
    gap = 0.6  # extra space between the seen and the unseen datasets
    positions = [
        index + (gap if not seen and any(s for s, _ in groups) else 0.0) for index, (seen, _) in enumerate(groups)
    ]
    width = 0.8 / max(1, len(bases))
    others = bases[1:]
    figure_width = max(6.0, 1.2 * len(groups) * max(1, len(bases)) ** 0.5 + 2)
    figure = Figure(figsize=(2 * figure_width, 3.6 * len(methods)))
    axes = figure.subplots(len(methods), 2, squeeze=False)
    colors = {base: f"C{index % 10}" for index, base in enumerate(bases)}
    for (accuracy_axis, delta_axis), method in zip(axes, methods, strict=True):
        for number, base in enumerate(bases):
            offsets = [position + (number - (len(bases) - 1) / 2) * width for position in positions]
            rows = [cells.get((seen, name, method, base)) for seen, name in groups]
            means = [100 * row["mean"] if row else 0.0 for row in rows]
            errors = [100 * row["std"] if row else 0.0 for row in rows]
            bars = accuracy_axis.bar(offsets, means, width, yerr=errors, capsize=3, label=base, color=colors[base])
            for bar, row in zip(bars, rows, strict=True):
                if row and row["aggregate"]:
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
        for position, (seen, name) in zip(positions, groups, strict=True):
            rate = next((cells[key]["majority_rate"] for key in cells if key[:3] == (seen, name, method)), math.nan)
            if not math.isnan(rate):
                accuracy_axis.hlines(100 * rate, position - 0.45, position + 0.45, colors="black", linewidth=1.5)
        accuracy_axis.plot([], [], color="black", label="majority class")
        _decorate(
            accuracy_axis, groups, positions, f"{METHOD_TITLES.get(method, method)}: accuracy", "test accuracy (%)"
        )
        accuracy_axis.set_ylim(0, 100)
        other_width = 0.8 / max(1, len(others))
        for number, base in enumerate(others):
            offsets = [position + (number - (len(others) - 1) / 2) * other_width for position in positions]
            rows = [cells.get((seen, name, method, base)) for seen, name in groups]
            deltas = [100 * (row["delta_vs_first_base"] or 0.0) if row else 0.0 for row in rows]
            below = [
                d - 100 * row["ci_low"] if row and row["ci_low"] is not None else 0.0
                for d, row in zip(deltas, rows, strict=True)
            ]
            above = [
                100 * row["ci_high"] - d if row and row["ci_high"] is not None else 0.0
                for d, row in zip(deltas, rows, strict=True)
            ]
            delta_axis.bar(offsets, deltas, other_width, yerr=[below, above], capsize=3, label=base, color=colors[base])
        delta_axis.axhline(0, color="black", linewidth=0.8)
        first = bases[0] if bases else "-"
        _decorate(delta_axis, groups, positions, f"Δ vs {first}, 95% CI", "Δ accuracy (points)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def _decorate(axis, groups: list[tuple[bool, str]], positions: list[float], title: str, ylabel: str) -> None:
    axis.set_xticks(positions, [name for _, name in groups], rotation=20, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title, pad=18)
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
    if positions:
        axis.set_xlim(positions[0] - 0.6, positions[-1] + 0.6)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="base")
