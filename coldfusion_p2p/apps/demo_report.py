"""The demo's report: rounds, the accuracy curve over archived rounds, verdicts, Markdown and plots.

The demo (and the simulator, for its rounds) write what people look at through this module:
``rounds.csv``/``rounds.png`` (each contributor's validation accuracy before fusion, after it with
the old head, and after the head re-fit, beside its majority-class rate), ``curve.csv``/``curve.png``
(the fused base over rounds), ``demo.json`` and ``summary.md``. Pure functions of the numbers,
except the writers at the end.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coldfusion_p2p.contributor.checkpoints import read_history
from coldfusion_p2p.evaluation.report import CLAIM_SEEDS


def curve_rounds(last_round: int, every: int) -> list[int]:
    """Rounds on the accuracy-over-rounds curve: every ``every``-th one and always the last (0: the last)."""
    if last_round < 1:
        return []
    if every < 1:
        return [last_round]
    return sorted({*range(every, last_round + 1, every), last_round})


def archived_round(folder: Path) -> int | None:
    """The round number of an archive folder ``round_NNNNN`` (None for any other folder)."""
    name = Path(folder).name
    if name.startswith("round_") and name[len("round_") :].isdigit():
        return int(name[len("round_") :])
    return None


def base_round(label: str, last_round: int | None) -> int | None:
    """The round a base label stands for on the curve: original 0, "round N" N, fused the last."""
    if label == "original":
        return 0
    if label == "fused":
        return last_round
    if label.startswith("round ") and label[len("round ") :].isdigit():
        return int(label[len("round ") :])
    return None


def accuracy_curve(summary: list[dict[str, Any]], last_round: int | None) -> list[dict[str, Any]]:
    """One point per (split, method, base): the split's mean accuracy after that many fusion rounds."""
    points = []
    for row in summary:
        if not row.get("aggregate"):
            continue
        round_number = base_round(row["base_label"], last_round)
        if round_number is None:
            continue
        points.append(
            {
                "split": "seen" if row["seen"] else "unseen",
                "method": row["method"],
                "round": round_number,
                "mean": row["mean"],
                "std": row["std"],
                "delta_vs_original": row["delta_vs_first_base"],
                "ci_low": row.get("ci_low"),
                "ci_high": row.get("ci_high"),
                "verdict": row.get("verdict"),
                "majority_rate": row.get("majority_rate"),
                "n_seeds": row["n"],
            }
        )
    return sorted(points, key=lambda point: (point["split"], point["method"], point["round"]))


def first_gain_round(points: list[dict[str, Any]], split: str, method: str) -> int | None:
    """The first round after which the fused base beats the original on ``split`` by ``method``."""
    gains = [
        point["round"]
        for point in points
        if point["split"] == split
        and point["method"] == method
        and point["round"] > 0
        and (point["delta_vs_original"] or 0.0) > 0
    ]
    return min(gains, default=None)


def curve_lines(points: list[dict[str, Any]], last_round: int | None) -> list[str]:
    """How the fused base compares with the original after each evaluated round, per split and method."""
    lines = []
    for split, method in dict.fromkeys((point["split"], point["method"]) for point in points):
        line = [p for p in points if p["split"] == split and p["method"] == method and p["round"] > 0]
        if len(line) < 2:  # one fused base: the verdict already says it
            continue
        deltas = ", ".join(f"{p['round']}: {100 * (p['delta_vs_original'] or 0.0):+.1f}" for p in line)
        gain = first_gain_round(points, split, method)
        first = f"never ahead within {last_round} rounds" if gain is None else f"first ahead after {gain} rounds"
        label = method.replace("_", " ")
        lines.append(f"{label} on {split} datasets vs the original, by round ({deltas} points): {first}")
    return lines


def plot_curve(points: list[dict[str, Any]], path: Path) -> None:
    """Per method: accuracy over rounds (one line per split; round 0 is the original) and its delta with a 95% CI."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(point["method"] for point in points))
    figure = Figure(figsize=(5 * max(1, len(methods)), 7.5))
    for index, method in enumerate(methods):
        axis = figure.add_subplot(2, len(methods), index + 1)
        delta_axis = figure.add_subplot(2, len(methods), len(methods) + index + 1)
        for split, marker in (("seen", "o"), ("unseen", "s")):
            line = [point for point in points if point["method"] == method and point["split"] == split]
            if not line:
                continue
            bars = axis.errorbar(
                [point["round"] for point in line],
                [100 * point["mean"] for point in line],
                yerr=[100 * point["std"] for point in line],
                marker=marker,
                capsize=3,
                label=f"{split} datasets",
            )
            color = bars.lines[0].get_color()
            axis.axhline(100 * line[0]["mean"], linestyle=":", alpha=0.4, color=color)
            if line[0].get("majority_rate") is not None:
                axis.axhline(100 * line[0]["majority_rate"], linestyle="--", alpha=0.6, linewidth=1, color=color)
            rated = [p for p in line if p["round"] > 0 and p.get("ci_low") is not None]
            if rated:
                deltas = [100 * (p["delta_vs_original"] or 0.0) for p in rated]
                delta_axis.errorbar(
                    [p["round"] for p in rated],
                    deltas,
                    yerr=[
                        [d - 100 * p["ci_low"] for d, p in zip(deltas, rated, strict=True)],
                        [100 * p["ci_high"] - d for d, p in zip(deltas, rated, strict=True)],
                    ],
                    marker=marker,
                    capsize=3,
                    color=color,
                    label=f"{split} datasets",
                )
        axis.set_title(f"{method.replace('_', ' ')} (dashed: majority class)")
        axis.set_xlabel("fusion rounds (0 = original base)")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
        delta_axis.axhline(0, color="black", linewidth=0.8)
        delta_axis.set_title("Δ vs the original, 95% paired bootstrap CI")
        delta_axis.set_xlabel("fusion rounds")
        delta_axis.set_ylabel("Δ accuracy (points)")
        delta_axis.grid(alpha=0.3)
        if delta_axis.get_legend_handles_labels()[0]:
            delta_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


QUALITY_POINTER = (
    "a demo is too short for a claim about unseen tasks (few contributors, rounds and seeds): "
    "benchmarks/quality.py runs the leave-group-out quality run, see docs/measurements/quality/"
)


def learning_margin(majority_rate: float) -> float:
    """How far above its majority-class rate a contributor must end to count as having learned its task."""
    return min(0.10, (1.0 - majority_rate) / 2)


def learning_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Did each contributor learn its task? Its last round's accuracy (fused base, head re-fit) vs its majority rate."""
    lines = []
    for peer in dict.fromkeys(row["peer"] for row in rows):
        last = max((row for row in rows if row["peer"] == peer), key=lambda row: row["round"])
        accuracy, majority = last.get("accuracy_after"), last.get("majority_rate")
        if accuracy is None or majority is None:
            continue
        learned = accuracy >= majority + learning_margin(majority)
        own = last["accuracy_before"] or 0.0
        lines.append(
            f"{peer} {'learned its task' if learned else 'did NOT clearly learn its task'}: round {last['round']} "
            f"{100 * accuracy:.1f}% after fusion and head re-fit (own model {100 * own:.1f}%, "
            f"majority class {100 * majority:.1f}%)"
        )
    return lines


def verdict_lines(summary: list[dict[str, Any]]) -> list[str]:
    """Plain statements of how the fused base compares with the original, per method and split.

    The verdict is the 95% paired bootstrap interval's: "better" or "worse" only when it
    excludes 0. Runs at or below the majority-class rate and a single seed are called out.
    """
    lines = []
    for row in summary:
        if not str(row.get("dataset", "")).startswith("ALL") or row.get("base_label") != "fused":
            continue
        delta = row.get("delta_vs_first_base")
        if delta is None:
            continue
        split = "unseen" if "unseen" in row["dataset"] else "seen"
        method = row["method"].replace("_", " ")
        if row.get("ci_low") is None or row.get("ci_high") is None:
            evidence = "no confidence interval"
        else:
            evidence = f"95% CI [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]: {row['verdict']}"
        lines.append(
            f"{method} on {split} datasets: fused base {100 * row['mean']:.1f}% vs original "
            f"{100 * (row['mean'] - delta):.1f}% ({100 * delta:+.1f} points, {evidence})"
        )
    flagged = [
        f"{row['base_label']} {row['method'].replace('_', ' ')} on {row['dataset']}"
        for row in summary
        if row.get("at_majority") and not row.get("aggregate")
    ]
    if flagged:
        lines.append(f"at or below the majority-class rate (no visible learning) on: {', '.join(flagged)}")
    seeds = max((row.get("n", 0) for row in summary), default=0)
    if lines and 0 < seeds < CLAIM_SEEDS:
        lines.append(
            f"{seeds} seed{'s' if seeds != 1 else ''}: the intervals cover test examples only; "
            f"rerun with --seeds {CLAIM_SEEDS} or more before claiming a difference"
        )
    return lines


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, peer in enumerate(sorted({row["peer"] for row in rows})):
        points = sorted((row for row in rows if row["peer"] == peer), key=lambda row: row["round"])
        color = f"C{index}"
        rounds = [row["round"] for row in points]
        axis.plot(
            rounds,
            [row["accuracy_before"] for row in points],
            "--o",
            color=color,
            alpha=0.6,
            label=f"{peer} before fusion",
        )
        axis.plot(
            rounds,
            [row["accuracy_after"] for row in points],
            "-s",
            color=color,
            label=f"{peer} after fusion + head re-fit",
        )
        if any(row.get("accuracy_after_old_head") is not None for row in points):
            axis.plot(
                rounds,
                [row.get("accuracy_after_old_head") for row in points],
                "x",
                color=color,
                alpha=0.6,
                label=f"{peer} after fusion, old head",
            )
        majority = points[0].get("majority_rate") if points else None
        if majority is not None:
            axis.axhline(majority, color=color, linestyle=":", alpha=0.5, linewidth=1)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("round")
    axis.set_ylabel("validation accuracy")
    axis.set_title("Each peer's validation accuracy before and after fusion (dotted: its majority-class rate)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_summary(settings, timings, rows, summary, verdicts, curve) -> str:
    lines = [
        "# ColD Fusion demo report",
        "",
        f"{len({r['peer'] for r in rows})} peers, {settings['rounds']} rounds x {settings['local_steps']} local "
        f"steps (batch {settings['batch_size']}); swarm {timings.get('swarm_seconds', 0) / 60:.1f} min, "
        f"evaluation {timings.get('evaluation_seconds', 0) / 60:.1f} min, "
        f"total {timings.get('total_seconds', 0) / 60:.1f} min.",
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {line}" for line in verdicts] or ["- no comparison available"]
    lines += [
        "",
        "## Rounds (validation accuracy of each peer: its own model, then the fused base)",
        "",
        "| peer | round | outcome | group | own model | fused, old head | fused, head re-fit | majority class |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["peer"], r["round"])):
        lines.append(
            f"| {row['peer']} | {row['round']} | {row['outcome']} | {row['group_size']} | "
            f"{_pct(row['accuracy_before'])} | {_pct(row.get('accuracy_after_old_head'))} | "
            f"{_pct(row['accuracy_after'])} | {_pct(row.get('majority_rate'))} |"
        )
    lines += [
        "",
        "![rounds](rounds.png)",
        "",
        "## Evaluation (test accuracy, mean ± std over seeds)",
        "",
        "Delta vs the original with its 95% paired bootstrap CI over seeds and test examples; "
        "**at majority**: runs at or below the test set's majority-class rate (no visible learning). "
        f"Claims need {CLAIM_SEEDS} or more seeds.",
        "",
        "| dataset | split | method | base | mean | std | majority class | delta vs original | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        delta = row.get("delta_vs_first_base")
        mean = _pct(row["mean"]) + _at_majority(row)
        lines.append(
            f"| {row['dataset']} | {'seen' if row['seen'] else 'unseen'} | {row['method']} | "
            f"{row['base_label']} | {mean} | {_pct(row.get('std'))} | {_pct(row.get('majority_rate'))} | "
            f"{'-' if delta is None else f'{100 * delta:+.1f}'} | {_ci(row)} | {row.get('verdict') or '-'} |"
        )
    lines += ["", "![evaluation](evaluation.png)", ""]
    lines += [
        "## Accuracy over rounds (mean test accuracy per split; round 0 is the original base)",
        "",
        "| split | method | round | mean | std | delta vs original | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in curve:
        delta = point["delta_vs_original"]
        lines.append(
            f"| {point['split']} | {point['method']} | {point['round']} | {_pct(point['mean'])} | "
            f"{_pct(point['std'])} | {'-' if delta is None else f'{100 * delta:+.1f}'} | {_ci(point)} | "
            f"{point.get('verdict') or '-'} |"
        )
    lines += ["", "![accuracy over rounds](curve.png)", ""]
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"  # None or NaN


def _at_majority(row: dict[str, Any]) -> str:
    flagged = row.get("at_majority_runs", int(bool(row.get("at_majority"))))
    runs = row.get("n", 1) * row.get("datasets", 1)
    if not flagged:
        return ""
    return " **at majority**" if flagged >= runs else f" ({flagged}/{runs} runs **at majority**)"


def _ci(row: dict[str, Any]) -> str:
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return "-"
    return f"[{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"


def write_rounds(rows: list[dict[str, Any]], folder: Path) -> None:
    """``rounds.csv`` and ``rounds.png`` of per-contributor round rows (the demo's and the simulator's)."""
    with open(folder / "rounds.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["peer"])
        writer.writeheader()
        writer.writerows(rows)
    plot_rounds(rows, folder / "rounds.png")


@dataclass
class DemoRounds:
    """What the demo ran: its settings and timings, every contributor's round rows, the last archived round."""

    settings: dict[str, Any]
    timings: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_round: int | None = None


def write_demo_report(
    report_dir: Path, rounds: DemoRounds, summary: list[dict[str, Any]], files: dict[str, Path]
) -> tuple[Path, list[str]]:
    """Every report file of the demo; returns the summary's path and the verdict lines to print."""
    write_rounds(rounds.rows, report_dir)
    curve = accuracy_curve(summary, rounds.last_round)
    with open(report_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]) if curve else ["split"])
        writer.writeheader()
        writer.writerows(curve)
    plot_curve(curve, report_dir / "curve.png")
    verdicts = learning_lines(rounds.rows) + verdict_lines(summary) + curve_lines(curve, rounds.last_round)
    verdicts.append(QUALITY_POINTER)
    payload = {
        "settings": rounds.settings,
        "timings": rounds.timings,
        "rounds": rounds.rows,
        "summary": summary,
        "curve": curve,
        "verdicts": verdicts,
        "files": {key: str(path) for key, path in files.items()},
    }
    (report_dir / "demo.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (report_dir / "summary.md").write_text(
        markdown_summary(rounds.settings, rounds.timings, rounds.rows, summary, verdicts, curve)
    )
    return report_dir / "summary.md", verdicts


def round_rows(contributors: list[str], peers_dir: Path) -> list[dict[str, Any]]:
    """Every contributor's rounds, from the history its peer wrote under ``peers_dir/<name>``."""
    rows = []
    for name in contributors:
        for entry in read_history(peers_dir / name):
            rows.append(
                {
                    "peer": name,
                    "round": entry["round"],
                    "outcome": entry["outcome"],
                    "group_size": entry["group_size"],
                    "accuracy_before": entry["accuracy_before"],
                    "accuracy_after_old_head": entry.get("accuracy_after_old_head"),
                    "accuracy_after": entry["accuracy_after"],
                    "majority_rate": entry.get("majority_rate"),
                    "train_loss": entry["train_loss"],
                    "fusion_seconds": entry["fusion_seconds"],
                    "train_seconds": entry["train_seconds"],
                }
            )
    return rows
