"""The accuracy cost of compressing the all-reduce (fp16, int8) against fp32, on the same seeds.

    python3 benchmarks/compression_accuracy.py                 # fp32 twice, fp16, int8 (~20 min on 2 cores)
    python3 benchmarks/compression_accuracy.py --model tiny --rounds 1 --local-steps 2   # smoke test

Why: ``--compression int8`` quarters the bytes each peer sends, which is what a home uplink pays
(``benchmarks/nat_fusion.py``), but every fused body then carries quantization error. Whether that
error costs the contributors accuracy is measured here, not assumed.

Each *run* is a 3-peer swarm of real ``coldfusion-peer join`` processes on loopback, started by
``benchmarks/loopback_swarm.py``'s ``run_swarm`` (its contributors for N = 3: TREC question types, tweet
sentiment, Rotten Tomatoes snippets; every peer ``seed=0`` in every run), at the demo's settings
(``--rounds 3``, ``--local-steps 20``, ``--batch-size 32``, ``--lr 2e-4``, ``min_group_size=3``) and
the default head re-fit. The runs differ only in ``--compression``: fp32 (``none``), fp16, int8,
then fp32 again, which is the noise floor: with the same seeds, do two fp32 runs give the same
accuracies (and the same fused body: the checkpoints' fingerprints are compared)?

Reported per contributor and round: validation accuracy after fusion and the head re-fit (what the
peer goes on with; ``accuracy_after``), the same with the old head (``accuracy_after_old_head``),
and the delta of each run against the first fp32 run, in points; plus the mean delta over the
contributors at the last round, against the goal that int8 costs at most 0.5 points. A round not
fused in a group of 3 makes its comparison meaningless: it is listed as a failure, and the
benchmark exits with status 1 after writing the results.

Writes ``docs/measurements/compression/compression_accuracy.json`` (every number, the settings, the
command, machine, date), ``compression_accuracy.md`` (the tables) and ``compression_accuracy.png``.

The pieces: ``loopback_swarm.py`` (the swarm), ``compression_analysis.py`` (deltas, noise floor,
body distances), ``compression_report.py`` (the report), ``common.py`` (what the benchmark scripts
share); this file runs the swarms in order and collects what their peers wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model builder for --model tiny
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402  (also sets HF_HUB_OFFLINE)
    benchmark_model,
    exit_if_any_failed,
    log,
    provenance,
    round_failures,
    run_record,
)
from compression_analysis import (  # noqa: E402
    ACCURACY_KEYS,
    N_PEERS,
    NAMES,
    accuracy,
    body_distances,
    compare,
    noise_floor,
    peer_spread,
)
from compression_report import fmt_accuracy, write_report  # noqa: E402
from loopback_swarm import run_swarm  # noqa: E402

from coldfusion_p2p.contributor.model import load_classifier  # noqa: E402


def peer_summary(folder: Path) -> dict:
    """One peer's contributor name (from its checkpoint's config), last fingerprint and round rows."""
    from coldfusion_p2p.contributor.checkpoints import read_history

    checkpoints = sorted(folder.glob("rounds/round_*/round.json"))
    metadata = json.loads(checkpoints[-1].read_text()) if checkpoints else {}
    dataset = (metadata.get("config") or {}).get("dataset") or ""
    keep = (
        "round",
        "outcome",
        "group_size",
        "reason",
        *ACCURACY_KEYS,
        "validation_loss_after",
        "majority_rate",
        "train_loss",
        "fusion_seconds",
        "bytes_sent",
    )
    return {
        "folder": str(folder),
        "contributor": Path(dataset).parent.name or folder.name,
        "last_round": metadata.get("round"),
        "last_fingerprint": metadata.get("fingerprint"),
        "rounds": [{key: row.get(key) for key in keep} for row in read_history(folder)],
    }


def run_once(model: str, compression: str, label: str, workdir: Path, settings: dict) -> dict:
    """One swarm; every peer's rounds; failures listed (a crashed swarm is a failure, not an exception)."""
    started = time.monotonic()
    failures: list[str] = []
    try:
        run_swarm(model, N_PEERS, workdir / label, compression=compression, **settings)
    except Exception as error:
        failures.append(f"{type(error).__name__}: {str(error)[:800]}")
    peers = [peer_summary(workdir / label / f"peer{index}") for index in range(N_PEERS)]
    for peer in peers:
        failures += round_failures(peer["contributor"], peer["rounds"], settings["rounds"], N_PEERS)
    return run_record(label, compression, started, failures, peers=peers)


def parse_arguments() -> argparse.Namespace:
    """The command line (see the module docstring); at least one fp32 run and one round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressions", nargs="+", default=["fp16", "int8"], choices=["fp16", "int8"])
    parser.add_argument("--fp32-runs", type=int, default=2, help="fp32 runs (first and last); 2: the noise floor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--model", default=None, help="base model folder (default: the bundled MiniLM); 'tiny': a tiny BERT"
    )
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "measurements" / "compression"))
    parser.add_argument("--work-dir", default=None, help="peers' output and logs (default: a fresh temp dir)")
    arguments = parser.parse_args()
    if arguments.fp32_runs < 1 or arguments.rounds < 1:
        parser.error("--fp32-runs and --rounds must be at least 1")
    return arguments


def swarm_settings(arguments: argparse.Namespace) -> dict:
    """What every run's swarm is given: the same in all of them, only the compression differs."""
    return {
        "rounds": arguments.rounds,
        "local_steps": arguments.local_steps,
        "batch_size": arguments.batch_size,
        "lr": arguments.lr,
        "matchmaking_time": 5.0,  # the defaults (run_swarm's 2 s / 1 s are tight for 3 MiniLM peers on 2 cores)
        "request_timeout": 3.0,
    }


def pretrained_body(model: str) -> dict:
    """The body every run starts from, to measure how far a fused body moved from it."""
    return {
        name: tensor.clone()
        for name, tensor in load_classifier(model, ["a", "b"], seed=0).base_model.state_dict().items()
    }


def run_label(plan: list[str], index: int) -> str:
    """``fp32-1``, ``fp32-2``, ... for the fp32 runs (there may be several), the compression's name otherwise."""
    compression = plan[index]
    return NAMES[compression] + (f"-{sum(c == compression for c in plan[:index]) + 1}" if compression == "none" else "")


def run_all(model: str, plan: list[str], workdir: Path, settings: dict) -> list[dict]:
    """Every run of ``plan`` in order, each logged with its last round's accuracies as soon as it ends."""
    runs = []
    for index, compression in enumerate(plan):
        label = run_label(plan, index)
        log(f"run {index + 1}/{len(plan)}: {label} ...")
        run = run_once(model, compression, label, workdir, settings)
        runs.append(run)
        last = {
            peer["contributor"]: accuracy(run, peer["contributor"], settings["rounds"], "accuracy_after")
            for peer in run["peers"]
        }
        finals = ", ".join(f"{name} {fmt_accuracy(value)}%" for name, value in last.items())
        log(f"  {label}: {'ok' if run['ok'] else 'FAILED'} in {run['wall_seconds']:.0f}s; last round: {finals}")
        for failure in run["failures"]:
            log(f"  failure: {failure}")
    return runs


def main() -> None:
    """fp32, each compression, fp32 again; compare them, write the report; exit 1 if a round did not fuse."""
    arguments = parse_arguments()
    wall_started = time.monotonic()
    workdir = Path(arguments.work_dir or tempfile.mkdtemp(prefix="coldfusion-compression-"))
    model, model_label = benchmark_model(arguments.model, workdir)
    settings = swarm_settings(arguments)
    original = pretrained_body(model)
    plan = ["none", *arguments.compressions] + ["none"] * (arguments.fp32_runs - 1)
    runs = run_all(model, plan, workdir, settings)
    results = {
        **provenance("python3 benchmarks/compression_accuracy.py", with_platform=True),
        "settings": {
            **settings,
            "model": model,
            "model_label": model_label,
            "peers": N_PEERS,
            "seed": 0,
            "order": [run["label"] for run in runs],
            "run_swarm": "benchmarks/loopback_swarm.py run_swarm: one torch thread per peer, min_group_size = peers, "
            "quiet",
        },
        "runs": runs,
        "comparison": compare(runs, arguments.rounds),
        "noise_floor": noise_floor(runs, arguments.rounds),
        "body_distances": body_distances(runs, original),
        "peer_spread": peer_spread(runs),
        "work_dir": str(workdir),
        "notes": [
            "one seed (0) per contributor and 200 validation examples each (one example = 0.5 points): the deltas "
            "are exact for these seeds when the fp32 noise floor is 0, not an estimate of the expected cost over seeds",
        ],
        "wall_seconds": time.monotonic() - wall_started,
    }
    write_report(results, Path(arguments.output_dir))
    print((Path(arguments.output_dir) / "compression_accuracy.md").read_text())
    exit_if_any_failed(runs, N_PEERS)


if __name__ == "__main__":
    main()
