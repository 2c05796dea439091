"""``benchmarks/compression_accuracy.py``'s report: the JSON (every number), the markdown tables and the plot.

A deterministic function of the results dict: ``write_report(json.load(...), folder)`` regenerates
a committed report exactly.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import bullet_section, pyplot, report_header, save_figure, section, table_header, table_row, write_json
from compression_analysis import GOAL_POINTS, N_PEERS, NAMES, accuracy


def fmt_points(value: float | None) -> str:
    """A delta in points, signed, or ``-`` where there is none to compare."""
    return "-" if value is None else f"{value:+.1f}"


def fmt_accuracy(value: float | None) -> str:
    """An accuracy in percent, or ``-`` where the round did not fuse."""
    return "-" if value is None else f"{100 * value:.1f}"


def write_report(results: dict, out: Path) -> None:
    """The JSON first (it survives a report that fails to render), then the markdown and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compression_accuracy.json", results)
    comparison, runs = results["comparison"], results["runs"]
    labels = [run["label"] for run in runs]
    failures = [f"{run['label']}: {failure}" for run in runs for failure in run["failures"]]
    lines = [
        *_overview(results),
        *_last_round_table(results),
        *_fused_bodies(results),
        *section("Per contributor and round"),
        *_contributor_table(comparison, labels, "accuracy_after"),
        "",
        "Old head (after fusion, before the re-fit), same layout:",
        "",
        *_contributor_table(comparison, labels, "accuracy_after_old_head"),
        *_runs_table(results),
        *bullet_section("Failures", failures, "None: every round of every run fused in a group of 3."),
        *bullet_section("Notes", results.get("notes") or []),
    ]
    (out / "compression_accuracy.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "compression_accuracy.png")


def _overview(results: dict) -> list[str]:
    """The header and how the runs were made (what they share, the one thing they differ in)."""
    comparison, settings = results["comparison"], results["settings"]
    labels = [run["label"] for run in results["runs"]]
    return [
        *report_header("Accuracy cost of compressing the all-reduce", results),
        f"Three real peers on loopback ({settings['model_label']}; contributors "
        f"{', '.join(comparison['contributors'])}; seed 0 for every peer in every run), {settings['rounds']} rounds "
        f"x {settings['local_steps']} local steps of batch {settings['batch_size']} at lr {settings['lr']:g}, "
        f"min_group_size {N_PEERS}, the default head re-fit. Runs in this order: {', '.join(labels)}; they differ "
        "only in `--compression`. Accuracy: each contributor's validation accuracy (%) after fusion and the head "
        f"re-fit; delta: points against `{comparison['reference']}`.",
        "",
    ]


def _goal(run: dict, after: dict) -> str:
    """int8's verdict against the goal; the second fp32 run is the noise floor; fp16 has no goal."""
    if run["compression"] == "int8" and after["mean_delta_points"] is not None:
        return "met (>= -0.5)" if after["mean_delta_points"] >= -GOAL_POINTS else "**not met** (< -0.5)"
    if run["compression"] == "none":
        return "noise floor"
    return "-"


def _last_round_table(results: dict) -> list[str]:
    """Each run's mean and worst delta at the last round against the reference, and the goal."""
    last = results["comparison"]["last_round"]
    lines = [
        "## Last round",
        "",
        *table_header("run", "mean delta, after re-fit", "worst contributor", "mean delta, old head", "goal"),
    ]
    for run in results["runs"][1:]:
        after = last[f"{run['label']}.accuracy_after"]
        old = last[f"{run['label']}.accuracy_after_old_head"]
        lines.append(
            table_row(
                run["label"],
                fmt_points(after["mean_delta_points"]),
                fmt_points(after["worst_delta_points"]),
                fmt_points(old["mean_delta_points"]),
                _goal(run, after),
            )
        )
    return lines


def _fused_bodies(results: dict) -> list[str]:
    """The noise floor, then how far the fused bodies lie from the reference's and from each other."""
    floor = results["noise_floor"]
    return [
        "",
        f"Noise floor (two fp32 runs, same seeds): accuracies identical in every round: "
        f"**{floor['identical_accuracies']}** (largest difference {floor['max_abs_difference_points']:.2f} points); "
        f"fused bodies of the last round identical (checkpoint fingerprints): **{floor['identical_fingerprints']}**.",
        *section(
            "Fused bodies",
            f"Distance of each run's last fused body from `{results['comparison']['reference']}`'s, per contributor: "
            "largest absolute difference, L2 distance over the body's norm, and L2 distance over the length of the "
            "reference's own update from the pretrained body (the all-reduce is not bit-reproducible in fp32 either: "
            "which peer reduces which part follows the random peer ids).",
        ),
        *table_header("run", "contributor", "max abs", "relative L2", "relative to the fp32 update"),
        *[
            table_row(
                row["run"],
                row["contributor"],
                f"{row['max_abs']:.2e}",
                f"{row['relative_l2']:.2e}",
                f"{row['relative_to_update']:.3f}",
            )
            for row in results["body_distances"]
        ],
        "",
        "Within each run: the largest distance between two peers' last fused bodies (in fp32 they hold one base, "
        "to rounding; with a lossy compression each peer adds its own decoded delta to its own values):",
        "",
        *table_header("run", "peer pairs", "max abs", "max L2"),
        *[
            f"| {row['run']} | {row['pairs']} | "
            + ("-" if row["max_abs"] is None else f"{row['max_abs']:.2e} | {row['max_l2']:.2e} |")
            for row in results.get("peer_spread", [])
        ],
        "",
        "Where they differ most (the tensor with the largest absolute difference, per run and contributor), beside "
        "that tensor's own largest value and standard deviation in the reference:",
        "",
        *table_header("run", "contributor", "tensor", "max abs difference", "reference abs max", "reference std"),
        *[
            table_row(
                row["run"],
                row["contributor"],
                f"`{row['worst_tensors'][0]['name']}`",
                f"{row['worst_tensors'][0]['max_abs']:.2e}",
                f"{row['worst_tensors'][0]['reference_abs_max']:.3f}",
                f"{row['worst_tensors'][0]['reference_std']:.3f}",
            )
            for row in results["body_distances"]
            if row.get("worst_tensors")
        ],
    ]


def _contributor_table(comparison: dict, labels: list[str], key: str) -> list[str]:
    """Per contributor and round: every run's ``key`` in percent, and each later run's delta against the first."""
    lines = table_header(
        "contributor", "round", *[f"{label} %" for label in labels], *[f"{label} delta" for label in labels[1:]]
    )
    for row in comparison["table"]:
        lines.append(
            table_row(
                row["contributor"],
                row["round"],
                *[fmt_accuracy(row[f"{label}.{key}"]) for label in labels],
                *[fmt_points(row[f"{label}.{key}.delta_points"]) for label in labels[1:]],
            )
        )
    return lines


def _runs_table(results: dict) -> list[str]:
    """Each run's wall time, and its fusion seconds and megabytes sent per round (means of the peers)."""
    lines = [
        *section("Runs"),
        *table_header("run", "wall s", "fusion s per round (mean of peers)", "sent MB per round (mean of peers)"),
    ]
    for run in results["runs"]:
        fusion, sent = [], []
        for round_number in range(1, results["settings"]["rounds"] + 1):
            rows = [row for peer in run["peers"] for row in peer["rounds"] if row["round"] == round_number]
            fusion.append(f"{statistics.mean(r['fusion_seconds'] for r in rows):.1f}" if rows else "-")
            sent.append(f"{statistics.mean(r['bytes_sent'] for r in rows) / 1e6:.1f}" if rows else "-")
        lines.append(table_row(run["label"], f"{run['wall_seconds']:.0f}", ", ".join(fusion), ", ".join(sent)))
    return lines


def plot(results: dict, path: Path) -> None:
    """Each contributor's accuracy per round in every run (left), each run's delta at the last round (right)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_accuracies(left, results, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    _plot_last_deltas(right, results)
    save_figure(figure, path)


def _plot_accuracies(left, results: dict, colors: list[str]) -> None:
    """Accuracy after re-fit per round: one colour per contributor, one line style per compression."""
    from matplotlib.lines import Line2D

    runs, rounds = results["runs"], results["settings"]["rounds"]
    contributors = results["comparison"]["contributors"]
    styles = {"none": "-", "fp16": "--", "int8": ":"}
    for index, contributor in enumerate(contributors):
        for run in runs:
            values = [accuracy(run, contributor, r, "accuracy_after") for r in range(1, rounds + 1)]
            points = [(r, 100 * v) for r, v in zip(range(1, rounds + 1), values, strict=True) if v is not None]
            if points:
                left.plot(
                    *zip(*points, strict=True),
                    styles[run["compression"]],
                    marker="o",
                    color=colors[index % len(colors)],
                    alpha=0.8,
                )
    handles = [Line2D([], [], color=colors[i % len(colors)], label=name) for i, name in enumerate(contributors)]
    handles += [
        Line2D([], [], color="black", linestyle=styles[c], label=NAMES[c])
        for c in dict.fromkeys(r["compression"] for r in runs)
    ]
    left.set(xlabel="round", ylabel="validation accuracy % (after re-fit)", title="Accuracy after fusion")
    left.set_xticks(range(1, rounds + 1))
    left.grid(alpha=0.3)
    left.legend(handles=handles, fontsize=7)


def _plot_last_deltas(right, results: dict) -> None:
    """Bars of each later run's delta per contributor at the last round, with the goal as a line."""
    comparison, rounds = results["comparison"], results["settings"]["rounds"]
    contributors = comparison["contributors"]
    compared = results["runs"][1:]
    width = 0.8 / max(1, len(compared))
    for offset, run in enumerate(compared):
        deltas = [
            next(
                (
                    row[f"{run['label']}.accuracy_after.delta_points"]
                    for row in comparison["table"]
                    if row["contributor"] == contributor and row["round"] == rounds
                ),
                None,
            )
            for contributor in contributors
        ]
        right.bar(
            [i + (offset - (len(compared) - 1) / 2) * width for i in range(len(contributors))],
            [0.0 if d is None else d for d in deltas],
            width=width,
            label=run["label"],
        )
    right.axhline(-GOAL_POINTS, color="#c44e52", linestyle="--", linewidth=1, label="goal: int8 >= -0.5 points")
    right.axhline(0.0, color="black", linewidth=0.8)
    shown = [
        row[f"{run['label']}.accuracy_after.delta_points"] or 0.0 for run in compared for row in comparison["table"]
    ]
    right.set_ylim(min(-1.0, min(shown, default=0.0) - 0.5), max(1.0, max(shown, default=0.0) + 0.5))
    right.set_xticks(range(len(contributors)), contributors, fontsize=8)
    right.set(ylabel=f"points vs {comparison['reference']}", title=f"Delta at round {rounds} (after re-fit)")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
