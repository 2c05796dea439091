"""N real peer processes on loopback for a few rounds: ``benchmarks/run.py``'s scaling swarms.

Also ``benchmarks/compression_accuracy.py``'s runs: ``run_swarm`` starts the peers (one torch thread
each, ``min_group_size`` = N, quiet) and returns every peer's round history; ``swarm_summary``
reduces it to the scaling table's row.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import DATA, LOOPBACK, cli, peer_environment

from coldfusion_p2p.config import as_flags

SAMPLE_SECONDS = 2.0  # how often a sampler looks at the running peers


def run_swarm(
    model: str,
    n_peers: int,
    workdir: Path,
    sampler: Callable[[list[subprocess.Popen]], None] | None = None,
    **settings,
) -> list[dict]:
    """N real peer processes on loopback for a few rounds; returns every peer's round history.

    Peers take the bundled contributors' data in turn. ``sampler`` is called with the live peer
    processes every ``SAMPLE_SECONDS`` until they all exit (memory sampling, say)."""
    from hivemind import DHT

    from coldfusion_p2p.contributor.checkpoints import read_history
    from coldfusion_p2p.swarm.records import RunKeys, swarm_validators

    run_id = f"bench-swarm-{workdir.name}"
    entry = DHT(start=True, host_maddrs=[LOOPBACK], record_validators=swarm_validators(RunKeys.from_run_id(run_id)))
    datasets = ["trec_question_type", "tweet_sentiment", "rotten_tomatoes_snippets", "sms_spam"]
    environment = peer_environment()
    processes = []
    try:
        for index in range(n_peers):
            flags = {
                "dataset": str(DATA / datasets[index % len(datasets)] / "train.csv"),
                "model": model,
                "run_id": run_id,
                "initial_peers": [str(a) for a in entry.get_visible_maddrs()],
                "host_maddrs": [LOOPBACK],
                "output_dir": str(workdir / f"peer{index}"),
                "torch_threads": 1,
                "min_group_size": n_peers,
                "matchmaking_time": 2.0,
                "request_timeout": 1.0,
                "quiet": True,
                "keep_checkpoints": 1,
                "seed": 0,
                **settings,
            }
            workdir.mkdir(parents=True, exist_ok=True)
            with open(workdir / f"peer{index}.log", "w") as log:
                processes.append(
                    subprocess.Popen(
                        cli("join", *as_flags(flags)),
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 1800
        while any(process.poll() is None for process in processes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {n_peers}-peer swarm in {workdir} ran past 30 minutes")
            if sampler is not None:
                sampler([process for process in processes if process.poll() is None])
            time.sleep(SAMPLE_SECONDS)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        entry.shutdown()
    rows = [row for index in range(n_peers) for row in read_history(workdir / f"peer{index}")]
    if not rows:
        tail = (workdir / "peer0.log").read_text()[-2000:]
        raise RuntimeError(f"the {n_peers}-peer swarm in {workdir} completed no round; peer0 said:\n{tail}")
    return rows


def swarm_summary(rows: list[dict], n_peers: int, model: str) -> dict:
    """One scaling row: means over rounds >= 2 of round time, fusion time and share, peak memory, accuracy."""
    rounds = [row for row in rows if row["round"] >= 2] or rows  # round 1 includes start-up skew
    round_seconds = [row["train_seconds"] + row["wait_seconds"] + row["fusion_seconds"] for row in rounds]
    return {
        "model": model,
        "peers": n_peers,
        "rounds": max(row["round"] for row in rows),
        "all_fused": all(row["outcome"] == "fused" and row["group_size"] == n_peers for row in rows),
        "round_seconds": statistics.mean(round_seconds),
        "fusion_seconds": statistics.mean(row["fusion_seconds"] for row in rounds),
        "fusion_share": statistics.mean(row["fusion_seconds"] for row in rounds) / statistics.mean(round_seconds),
        "peak_rss_mb": max(row.get("peak_rss_mb", 0.0) for row in rows),
        "accuracy_after": statistics.mean(
            row["accuracy_after"] for row in rows if row["round"] == max(r["round"] for r in rows)
        ),
    }
