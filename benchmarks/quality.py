"""The reproducible quality run: does ColD Fusion's base beat the original, on seen and unseen tasks?

    python benchmarks/quality.py           # the default run: the plain mean, 3 folds (about 50 min on 2 cores)
    python benchmarks/quality.py --name sweep --settings mean outer local_pooler ties --folds 0 --reuse

The default's time is estimated from the measured parts of the `default` run (9.9 min per
simulation, 3.2 min per evaluated base and fold): 3 simulations and 6 evaluations, about 49 min;
each extra setting adds about 20 min over 3 folds. ``--reuse`` skips simulations an earlier run
finished with the same settings, so a sweep can add settings to a finished run. ``--reuse-from``
goes further: it takes bases (the original included) whose evaluation an earlier run's
``quality.json`` already holds, with the same simulation and evaluation arguments, and neither
simulates nor evaluates them again. That is exact, not an approximation: every evaluation run
(base, dataset, seed, method) is seeded on its own, so a base's numbers do not depend on which
other bases share the run (seen: the sweep's re-evaluated plain mean equalled the default's).

For each *fold* (leave-group-out, as the paper's cross-validation over datasets) the bundled
datasets of that fold are kept unseen and every other bundled dataset is a contributor. For each
fusion *setting*, the proven-equal simulator (``tests/apps/test_simulate.py``: its fused body equals a
real swarm's) runs the contributors for ``--rounds`` rounds; then the original base and every
setting's fused base are evaluated on the fold's unseen datasets with the paper's protocol
(finetuning to convergence and a linear probe, ``--seeds`` seeds), and summarised with paired
bootstrap CIs pooled over every fold's unseen datasets. The seen side is each contributor's
validation accuracy at the last round after fusion and the head re-fit, against its own
finetuned model before fusion.

Writes ``docs/measurements/quality/<name>/``: ``quality.json`` (every number, settings, command),
``quality.md`` (the tables), ``unseen.png`` (deltas with CIs) and ``seen.png`` (rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from coldfusion_p2p.apps.bundled import BUNDLED_PEERS  # noqa: E402
from coldfusion_p2p.apps.simulate import Simulation  # noqa: E402
from coldfusion_p2p.config import EvaluateConfig, build_config  # noqa: E402
from coldfusion_p2p.contributor.model import bundled_model_path  # noqa: E402
from coldfusion_p2p.evaluation.evaluate import evaluate_bases  # noqa: E402
from coldfusion_p2p.evaluation.report import EvalResult, plot_summary, results_table, summarize  # noqa: E402

DATASETS = (
    "trec_question_type",
    "tweet_sentiment",
    "rotten_tomatoes_snippets",
    "sms_spam",
    "epistemic_reasoning_nli",
    "bbc_news_topic",
    "health_tweet_source",
    "spam_assassin_email",
    "vitaminc_fact_verification",
    "multiemo_product_reviews",
    "logical_fallacy_detection",
)
FOLDS = (  # unseen datasets of each fold; the rest contribute. Each dataset is unseen in at most one fold
    ("bbc_news_topic", "health_tweet_source", "multiemo_product_reviews"),
    ("tweet_sentiment", "vitaminc_fact_verification", "logical_fallacy_detection"),
    ("trec_question_type", "rotten_tomatoes_snippets", "epistemic_reasoning_nli"),
)
SETTINGS = {  # name: peer settings applied to every contributor on top of its bundled config
    "mean": {},
    "outer": {"outer_lr": 0.7, "outer_momentum": 0.5},
    "anchor": {"anchor": 0.3},
    "ties": {"aggregation": "ties", "ties_density": 0.2},
    "l2sp": {"l2sp": 0.1},
    "local_pooler": {"local_modules": ["pooler"]},
}


MATCHED_ARGUMENTS = (  # what a reused result must have been produced with
    "rounds",
    "local_steps",
    "lr",
    "validation_examples",
    "methods",
    "seeds",
    "max_train_examples",
    "max_test_examples",
    "finetune_epochs",
)


def load_earlier_runs(names: list[str], arguments) -> list[dict[str, Any]]:
    """The ``quality.json`` of each named earlier run; stops with a clear message when one differs."""
    runs = []
    for name in names:
        path = Path(arguments.output_root) / name / "quality.json"
        if not path.exists():
            raise SystemExit(f"error: --reuse-from {name}: no {path}; name a run under {arguments.output_root}")
        run = json.loads(path.read_text())
        theirs = run["arguments"]
        differing = [f"{k}={theirs.get(k)}" for k in MATCHED_ARGUMENTS if theirs.get(k) != getattr(arguments, k)]
        if differing:
            raise SystemExit(
                f"error: --reuse-from {name}: it ran with other settings ({', '.join(differing)}); "
                "reuse only runs with this run's settings"
            )
        runs.append(run)
    return runs


def reused_base(runs: list[dict[str, Any]], fold: int, label: str, arguments) -> tuple[list, list] | None:
    """An earlier run's complete evaluation of base ``label`` on ``fold`` (and its seen rows), or None."""
    expected = len(FOLDS[fold]) * arguments.seeds * len(arguments.methods)
    for run in runs:
        if label != "original" and run["settings"].get(label) != SETTINGS[label]:
            continue  # that run's setting of this name had other peer settings
        results = [
            EvalResult(**result)
            for result in run["results"]
            if result["base_label"] == label and result["dataset"] in FOLDS[fold]
        ]
        rows = [row for row in run["rounds"] if row["fold"] == fold and row["setting"] == label]
        if len(results) == expected and (label == "original" or rows):
            return results, rows
    return None


def simulate(fold: int, setting: str, arguments, console: Console) -> tuple[Path, list[dict[str, Any]], float]:
    """One simulated swarm of the fold's contributors; returns its base folder, round rows and seconds."""
    contributors = [name for name in DATASETS if name not in FOLDS[fold]]
    peer_settings = {
        "rounds": arguments.rounds,
        "local_steps": arguments.local_steps,
        "lr": arguments.lr,
        "max_eval_examples": arguments.validation_examples,
        **SETTINGS[setting],
    }
    output = Path(arguments.work_dir) / f"fold{fold}" / setting
    finished = output / "simulation.json"
    earlier = json.loads(finished.read_text()) if arguments.reuse and finished.exists() else None
    if earlier is not None and earlier["settings"] == {"fold": fold, "setting": setting, **peer_settings}:
        # the same simulation, finished by an earlier run (a sweep adds settings to a finished run)
        rows = [{**row, "fold": fold, "setting": setting} for row in earlier["rounds"]]
        console.print(f"[bold]fold {fold}, {setting}[/]: reusing the finished simulation in {output}")
        return (output / "latest").resolve(), rows, 0.0
    started = time.perf_counter()
    simulation = Simulation.from_names(contributors, peer_settings, output)
    console.print(f"[bold]fold {fold}, {setting}[/]: {len(contributors)} contributors, {arguments.rounds} rounds")
    simulation.run(arguments.rounds, console)
    seconds = time.perf_counter() - started
    simulation.write_report({"fold": fold, "setting": setting, **peer_settings})
    rows = [{**row.__dict__, "fold": fold, "setting": setting} for row in simulation.rows]
    return (output / "latest").resolve(), rows, seconds


def evaluate(fold: int, bases: dict[str, Path], arguments, console: Console):
    """The given bases (``original``: the bundled model) on the fold's unseen datasets, one budget."""
    config = build_config(
        {
            "base": [f"{name}={bundled_model_path() if name == 'original' else path}" for name, path in bases.items()],
            "unseen": [str(BUNDLED_PEERS / "data" / name) for name in FOLDS[fold]],
            "seeds": arguments.seeds,
            "methods": arguments.methods,
            "max_train_examples": arguments.max_train_examples,
            "max_test_examples": arguments.max_test_examples,
            "finetune_epochs": arguments.finetune_epochs,
            "report_dir": str(Path(arguments.work_dir) / f"fold{fold}" / "evaluation"),
        },
        config_type=EvaluateConfig,
    )
    return evaluate_bases(config, console=console)


def seen_summary(rows: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Per setting: the contributors' last-round accuracy after fusion and re-fit vs their own models."""
    summary = []
    for setting in dict.fromkeys(row["setting"] for row in rows):
        last = [row for row in rows if row["setting"] == setting and row["round"] == rounds]
        own = float(np.mean([row["accuracy_before"] for row in last]))
        fused = float(np.mean([row["accuracy_after"] for row in last]))
        summary.append(
            {
                "setting": setting,
                "contributors": len(last),
                "own_model": own,
                "after_fusion_old_head": float(np.mean([row["accuracy_after_old_head"] for row in last])),
                "after_fusion_refit": fused,
                "gap_to_own": fused - own,
                "majority_rate": float(np.mean([row["majority_rate"] for row in last])),
                "cleared_majority": sum(row["accuracy_after"] > row["majority_rate"] for row in last),
            }
        )
    return summary


def plot_seen(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axis = figure.add_subplot(1, 1, 1)
    for index, setting in enumerate(dict.fromkeys(row["setting"] for row in rows)):
        mine = [row for row in rows if row["setting"] == setting]
        rounds = sorted({row["round"] for row in mine})
        for key, style in (("accuracy_before", "--"), ("accuracy_after", "-")):
            values = [np.mean([row[key] for row in mine if row["round"] == r]) for r in rounds]
            label = f"{setting}: {'own model' if key == 'accuracy_before' else 'after fusion + re-fit'}"
            axis.plot(rounds, [100 * value for value in values], style, marker="o", color=f"C{index}", label=label)
    axis.set_xlabel("round")
    axis.set_ylabel("mean validation accuracy of the contributors (%)")
    axis.set_title("Seen tasks: contributors' own models vs the fused base (all folds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Quality run `{payload['name']}`",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{payload['machine']}; {payload['time']}; wall time {payload['seconds'] / 60:.1f} min "
        f"(simulations {payload['simulation_seconds'] / 60:.1f} min, evaluation "
        f"{payload['evaluation_seconds'] / 60:.1f} min).",
        "",
        "## Unseen datasets (each fold's held-out group; paired deltas vs the original, 95% bootstrap CI)",
        "",
        "| dataset | method | base | accuracy | majority | delta vs original | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["unseen"]:
        delta = row.get("delta_vs_first_base")
        ci = "-" if row.get("ci_low") is None else f"[{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"
        lines.append(
            f"| {row['dataset']} | {row['method']} | {row['base_label']} | {100 * row['mean']:.1f}% | "
            f"{100 * row['majority_rate']:.1f}% | {'-' if delta is None else f'{100 * delta:+.1f}'} | {ci} | "
            f"{row.get('verdict') or '-'} |"
        )
    lines += [
        "",
        "## Seen datasets (contributors' validation accuracy at the last round, mean over contributors and folds)",
        "",
        "| setting | own model | after fusion (old head) | after fusion + re-fit | gap to own | majority rate | "
        "cleared majority |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["seen"]:
        lines.append(
            f"| {row['setting']} | {100 * row['own_model']:.1f}% | {100 * row['after_fusion_old_head']:.1f}% | "
            f"{100 * row['after_fusion_refit']:.1f}% | {100 * row['gap_to_own']:+.1f} | "
            f"{100 * row['majority_rate']:.1f}% | {row['cleared_majority']}/{row['contributors']} |"
        )
    lines += ["", "![unseen](unseen.png)", "", "![seen](seen.png)", ""]
    return "\n".join(lines)


def run_folds(arguments, earlier_runs: list[dict[str, Any]], output: Path, console: Console):
    """Every fold: simulate and evaluate each base an earlier run does not already hold.

    Returns (seen rows, evaluation results, simulation seconds, evaluation seconds); after each fold
    ``partial.json`` keeps what is done, so a long run killed later keeps its finished folds.
    """
    seen_rows, results, simulation_seconds, evaluation_seconds = [], [], 0.0, 0.0
    for fold in arguments.folds:
        bases = {}
        for label in ["original", *arguments.settings]:
            reused = reused_base(earlier_runs, fold, label, arguments)
            if reused is not None:
                console.print(f"[bold]fold {fold}, {label}[/]: reusing an earlier run's evaluation")
                results += reused[0]
                seen_rows += reused[1]
            elif label == "original":
                bases[label] = None
            else:
                bases[label], rows, seconds = simulate(fold, label, arguments, console)
                seen_rows += rows
                simulation_seconds += seconds
        evaluation_started = time.perf_counter()
        if bases:
            results += evaluate(fold, bases, arguments, console)
        evaluation_seconds += time.perf_counter() - evaluation_started
        partial = {"folds_done": arguments.folds[: arguments.folds.index(fold) + 1], "rounds": seen_rows}
        partial["results"] = [result.__dict__ for result in results]
        (output / "partial.json").write_text(json.dumps(partial, default=str) + "\n")
    return seen_rows, results, simulation_seconds, evaluation_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default")
    parser.add_argument("--settings", nargs="+", default=["mean"], choices=list(SETTINGS))
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(len(FOLDS))))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--validation-examples", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["finetune", "linear_probe"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-train-examples", type=int, default=300)
    parser.add_argument("--max-test-examples", type=int, default=400)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--reuse", action="store_true", help="reuse simulations an earlier run finished with the same settings"
    )
    parser.add_argument(
        "--reuse-from",
        nargs="+",
        default=[],
        metavar="NAME",
        help="take bases an earlier run (under --output-root) evaluated with the same settings",
    )
    parser.add_argument("--work-dir", default="/tmp/coldfusion-quality")
    parser.add_argument("--output-root", default=str(ROOT / "docs" / "measurements" / "quality"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.torch_threads)
    console = Console(highlight=False)
    output = Path(arguments.output_root) / arguments.name
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    earlier_runs = load_earlier_runs(arguments.reuse_from, arguments)
    seen_rows, results, simulation_seconds, evaluation_seconds = run_folds(arguments, earlier_runs, output, console)
    summary = summarize(results, ["original", *arguments.settings])
    console.print(results_table(summary))
    plot_summary(summary, output / "unseen.png")
    plot_seen(seen_rows, output / "seen.png")
    payload = {
        "name": arguments.name,
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{arguments.torch_threads} torch threads",
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - started,
        "simulation_seconds": simulation_seconds,
        "evaluation_seconds": evaluation_seconds,
        "arguments": vars(arguments),
        "folds": [
            {"unseen": list(FOLDS[f]), "contributors": [d for d in DATASETS if d not in FOLDS[f]]}
            for f in arguments.folds
        ],
        "settings": {name: SETTINGS[name] for name in arguments.settings},
        "unseen": summary,
        "seen": seen_summary(seen_rows, arguments.rounds),
        "rounds": seen_rows,
        "results": [result.__dict__ for result in results],
    }
    (output / "quality.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (output / "partial.json").unlink(missing_ok=True)
    (output / "quality.md").write_text(markdown(payload))
    console.print(
        f"wrote {output}/quality.md (and quality.json, unseen.png, seen.png): {payload['seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
