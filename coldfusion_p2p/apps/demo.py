"""The main job in one command: a real local swarm on bundled data, then evidence that fusion helps.

``coldfusion-peer demo`` starts a bootstrap node (which archives every fused base) and one peer
per bundled contributor dataset, each a separate process on 127.0.0.1, shows the live dashboard
while they run their rounds, then evaluates the original and the fused base with the paper's
protocol on the contributors' held-out test sets ("seen") and on datasets the swarm never trained
on ("unseen"), and writes a report folder: Markdown summary, CSV/JSON of every number, PNG plots.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from coldfusion_p2p.apps.bundled import BUNDLED_PEERS, UNSEEN, resolve_contributors
from coldfusion_p2p.apps.demo_report import (  # plot_rounds: a running quality sweep imports it from here
    DemoRounds,
    archived_round,
    curve_rounds,
    plot_rounds,  # noqa: F401
    round_rows,
    write_demo_report,
)
from coldfusion_p2p.config import (
    DemoConfig,
    EvaluateConfig,
    NetworkConfig,
    as_flags,
    build_config,
    effective_demo_settings,
)
from coldfusion_p2p.contributor.model import resolve_model_name
from coldfusion_p2p.errors import UserError

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
        from coldfusion_p2p.contributor.model_card import CARD_FILE, add_evaluation
        from coldfusion_p2p.evaluation.evaluate import evaluate_bases, results_table, summarize, write_report
        from coldfusion_p2p.evaluation.report import card_table

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
        if (self.fused_base() / CARD_FILE).exists():  # the evaluated base's model card gets the table
            add_evaluation(self.fused_base(), card_table(summary, "fused"))
        self.timings["evaluation_seconds"] = time.perf_counter() - started
        return results, summary, files

    # ------------------------------------------------------------------ report
    def write_report(self, summary: list[dict[str, Any]], files: dict[str, Path]) -> tuple[Path, list[str]]:
        """Every report file; returns the summary's path and the verdict lines to print."""
        rows = round_rows([contributor.name for contributor in self.contributors], self.work_dir / "peers")
        rounds = DemoRounds(self.settings, self.timings, rows, archived_round(self.fused_base()))
        return write_demo_report(self.report_dir, rounds, summary, files)

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


def run_demo(config: DemoConfig, console: Console | None = None) -> Path:
    demo = Demo(config, console)
    try:
        return demo.run()
    finally:
        demo.shutdown()
