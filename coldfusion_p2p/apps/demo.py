"""The main job in one command: a real local swarm on bundled data, then evidence that fusion helps.

``coldfusion-peer demo`` starts a bootstrap node (which archives every fused base) and one peer
per bundled contributor dataset, each a separate process on 127.0.0.1, shows the live dashboard
while they run their rounds, then evaluates the original and the fused base with the paper's
protocol on the contributors' held-out test sets ("seen") and on datasets the swarm never trained
on ("unseen"), and writes a report folder: Markdown summary, CSV/JSON of every number, PNG plots.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from coldfusion_p2p.apps.bundled import BUNDLED_PEERS, UNSEEN, resolve_contributors
from coldfusion_p2p.config import (
    DemoConfig,
    EvaluateConfig,
    NetworkConfig,
    as_flags,
    build_config,
    effective_demo_settings,
)
from coldfusion_p2p.contributor.checkpoints import read_history
from coldfusion_p2p.contributor.model import resolve_model_name
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.evaluation.report import CLAIM_SEEDS

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class Demo:
    """``setup -> run swarm -> evaluate -> report``; ``shutdown`` kills what is still running."""

    def __init__(self, config: DemoConfig, console: Console | None = None):
        self.config, self.settings = config, effective_demo_settings(config.demo)
        self.console = console or Console()
        self.report_dir = Path(self.settings["report_dir"]).resolve()
        self.work_dir = self.report_dir / "swarm"
        self.contributors = resolve_contributors(self.settings["contributors"])
        self.unseen = [BUNDLED_PEERS / "data" / name for name in (self.settings["unseen_datasets"] or UNSEEN)]
        for folder in self.unseen:
            if not (folder / "train.csv").is_file():
                raise UserError(f"no bundled dataset {folder.name!r}", "pass --unseen with a folder of peers/data")
        self.model = resolve_model_name(self.settings["model"])
        self.processes: list[subprocess.Popen] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ swarm
    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE=environment.get("HF_HUB_OFFLINE", "1"),
            PYTHONUNBUFFERED="1",
        )
        return environment

    def _spawn(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = open(self.work_dir / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", "coldfusion_p2p.cli", *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def start_bootstrap(self) -> list[str]:
        peers_file = self.work_dir / "initial_peers.txt"
        peers_file.unlink(missing_ok=True)
        bootstrap = self._spawn(
            "bootstrap",
            [
                "bootstrap",
                *as_flags(
                    {
                        "run_id": self.settings["run_id"],
                        "host_maddrs": [LOOPBACK],
                        "peers_file": str(peers_file),
                        "archive_dir": str(self.work_dir / "archive"),
                        "base_model": self.model,
                        "poll_period": 0.5,
                        "quiet": True,
                    }
                ),
            ],
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if peers_file.exists() and peers_file.read_text().strip():
                return peers_file.read_text().split()
            if bootstrap.poll() is not None:
                raise UserError(
                    "the demo's bootstrap node failed to start", f"see {self.work_dir / 'logs' / 'bootstrap.log'}"
                )
            time.sleep(0.2)
        raise UserError("the demo's bootstrap node did not start within 120 s", "see its log in the report folder")

    def start_peers(self, initial_peers: list[str]) -> dict[str, subprocess.Popen]:
        settings = self.settings
        shared = {
            "run_id": settings["run_id"],
            "initial_peers": initial_peers,
            "host_maddrs": [LOOPBACK],
            "model": self.model,
            "rounds": settings["rounds"],
            "local_steps": settings["local_steps"],
            "batch_size": settings["batch_size"],
            "max_eval_examples": settings["validation_examples"],
            "torch_threads": 1,  # one thread per peer: several peers share the cores
            "min_group_size": len(self.contributors),  # every round fuses all contributors
            "fusion_window": 120.0,
            "matchmaking_time": 2.0,  # loopback: groups form fast
            # four MiniLM peers and the archiver share two cores: a reducer starved for 10 s (the default)
            # lost a slice in one CI-like run and the round rolled back; on loopback only CPU is slow
            "next_chunk_timeout": 30.0,
            "allreduce_timeout": 180.0,
            "request_timeout": 1.0,
            "keep_checkpoints": 1,  # history.jsonl keeps every round's numbers
            "quiet": True,
        }
        if settings["peer_lr"] is not None:
            shared["lr"] = settings["peer_lr"]
        return {
            contributor.name: self._spawn(
                contributor.name,
                [
                    "join",
                    "--config",
                    str(contributor.config_path),
                    *as_flags({**shared, "output_dir": str(self.work_dir / "peers" / contributor.name)}),
                ],
            )
            for contributor in self.contributors
        }

    def watch(self, initial_peers: list[str], peers: dict[str, subprocess.Popen]) -> None:
        """The live dashboard while the peers run; bounded by ``swarm_timeout``."""
        from coldfusion_p2p.swarm.monitor import SwarmView, render
        from coldfusion_p2p.swarm.network import start_dht
        from coldfusion_p2p.swarm.records import RecordBoard, RunKeys

        keys = RunKeys.from_run_id(self.settings["run_id"])
        dht = start_dht(NetworkConfig(initial_peers=initial_peers, host_maddrs=[LOOPBACK]), keys, client_mode=True)
        board, view = RecordBoard(dht, keys), SwarmView(keys.run_id, stale_after=30, drop_after=120)
        deadline = time.monotonic() + self.settings["swarm_timeout"]
        last_round = -1
        try:
            live = Live(console=self.console, auto_refresh=False, transient=False) if self.console.is_terminal else None
            with live if live is not None else contextlib.nullcontext():
                while any(process.poll() is None for process in peers.values()):
                    if time.monotonic() > deadline:
                        raise UserError(
                            f"the swarm did not finish within {self.settings['swarm_timeout']:.0f} s",
                            "raise --swarm-timeout or lower --rounds",
                        )
                    view.update(board.fetch())
                    snapshot = view.snapshot()
                    if live is not None:
                        live.update(render(snapshot), refresh=True)
                    elif snapshot.swarm_round != last_round:
                        last_round = snapshot.swarm_round
                        self.console.print(
                            f"swarm round {snapshot.swarm_round}/{self.settings['rounds']}, "
                            f"{snapshot.live_peers} live peers"
                        )
                    time.sleep(1.0)
        finally:
            dht.shutdown()
        failed = {name: process.returncode for name, process in peers.items() if process.returncode != 0}
        if failed:
            raise UserError(f"demo peers failed: {failed}", f"see their logs in {self.work_dir / 'logs'}")

    def run_swarm(self) -> None:
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        initial_peers = self.start_bootstrap()
        self.console.print(
            f"bootstrap node up; starting {len(self.contributors)} peers "
            f"({', '.join(c.name for c in self.contributors)}) for {self.settings['rounds']} rounds"
        )
        self.watch(initial_peers, self.start_peers(initial_peers))
        self.timings["swarm_seconds"] = time.perf_counter() - started

    # ------------------------------------------------------------------ evaluation
    def fused_base(self) -> Path:
        latest = self.work_dir / "archive" / "latest"
        if latest.exists():
            return latest.resolve()
        peer_latest = self.work_dir / "peers" / self.contributors[0].name / "latest"
        if peer_latest.exists():
            return peer_latest.resolve()
        raise UserError("the swarm produced no fused base", f"see the logs in {self.work_dir / 'logs'}")

    def bases(self) -> list[str]:
        """``label=path`` of every base to evaluate: the original, the curve's rounds, the last fused base."""
        fused = self.fused_base()
        archive = self.work_dir / "archive"
        last = archived_round(fused)
        earlier = [
            f"round {number}={archive / f'round_{number:05d}'}"
            for number in curve_rounds(last or 0, self.settings["curve_every"])
            if number != last and (archive / f"round_{number:05d}").is_dir()
        ]
        return [f"original={self.model}", *earlier, f"fused={fused}"]

    def evaluate(self):
        from coldfusion_p2p.evaluation.evaluate import evaluate_bases, results_table, summarize, write_report

        started = time.perf_counter()
        settings = self.settings
        # finetuning to convergence (evaluate's default), or the fixed budget with --quick or --finetune-steps
        fixed_budget = settings["quick"] or self.config.demo.finetune_steps is not None
        config = build_config(
            {
                "base": self.bases(),
                "dataset": [str(c.data_dir) for c in self.contributors[: settings["evaluated_contributors"]]],
                "unseen": [str(folder) for folder in self.unseen],
                "seeds": settings["seeds"],
                "finetune_steps": settings["finetune_steps"],
                **({"finetune_epochs": 0} if fixed_budget else {}),
                "probe_steps": settings["probe_steps"],
                "max_train_examples": settings["max_train_examples"],
                "max_test_examples": settings["max_test_examples"],
                "report_dir": str(self.report_dir),
            },
            config_type=EvaluateConfig,
        )
        results = evaluate_bases(config, console=self.console)
        summary = summarize(results)
        self.console.print(results_table(summary))
        files = write_report(results, summary, self.report_dir)
        self.timings["evaluation_seconds"] = time.perf_counter() - started
        return results, summary, files

    # ------------------------------------------------------------------ report
    def round_rows(self) -> list[dict[str, Any]]:
        rows = []
        for contributor in self.contributors:
            for entry in read_history(self.work_dir / "peers" / contributor.name):
                rows.append(
                    {
                        "peer": contributor.name,
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

    def write_report(self, summary: list[dict[str, Any]], files: dict[str, Path]) -> tuple[Path, list[str]]:
        """Every report file; returns the summary's path and the verdict lines to print."""
        rows = self.round_rows()
        with open(self.report_dir / "rounds.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["peer"])
            writer.writeheader()
            writer.writerows(rows)
        plot_rounds(rows, self.report_dir / "rounds.png")
        last_round = archived_round(self.fused_base())
        curve = accuracy_curve(summary, last_round)
        with open(self.report_dir / "curve.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(curve[0]) if curve else ["split"])
            writer.writeheader()
            writer.writerows(curve)
        plot_curve(curve, self.report_dir / "curve.png")
        verdicts = learning_lines(rows) + verdict_lines(summary) + curve_lines(curve, last_round)
        verdicts.append(QUALITY_POINTER)
        payload = {
            "settings": self.settings,
            "timings": self.timings,
            "rounds": rows,
            "summary": summary,
            "curve": curve,
            "verdicts": verdicts,
            "files": {key: str(path) for key, path in files.items()},
        }
        (self.report_dir / "demo.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (self.report_dir / "summary.md").write_text(
            markdown_summary(self.settings, self.timings, rows, summary, verdicts, curve)
        )
        return self.report_dir / "summary.md", verdicts

    def run(self) -> Path:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.run_swarm()
        _, summary, files = self.evaluate()
        self.timings["total_seconds"] = time.perf_counter() - started
        path, verdicts = self.write_report(summary, files)
        for line in verdicts:
            self.console.print(line)
        self.console.print(
            f"report: {path} (and CSV, JSON, PNG beside it); wall time {self.timings['total_seconds'] / 60:.1f} min"
        )
        return path

    def shutdown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


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


def run_demo(config: DemoConfig, console: Console | None = None) -> Path:
    demo = Demo(config, console)
    try:
        return demo.run()
    finally:
        demo.shutdown()
