"""The project's benchmarks, each a ratio against its baseline measured in the same run.

    python3 benchmarks/run.py            # all of it (see the results file for the wall time)
    python3 benchmarks/run.py --quick    # tiny model only

Writes ``benchmarks/results/latest.json`` and ``latest.md`` (and ``scaling.png``), with the exact
command and wall time in both. Every compared pair runs the same work in the same run, in
alternating order (trial t: ours first when t is even), over ``--trials`` measured trials after
one untimed warm-up trial; min/median/max of each arm and of the per-trial ratio are reported.

- ``fusion_vs_raw``: one fusion round of ours (all-or-nothing, verdicts, validation) against a
  bare hivemind ``DecentralizedAverager.step()`` on the same tensors, group and DHT. Both arms
  have the same averager settings (timeouts, declare-state period) and neither re-declares its
  state inside the timed region (hivemind's per-tensor ``_state_updated.set()`` is the one line
  the baseline drops, as ours does). Two figures per trial, both measured: *all-reduce* (from the
  moment the peer's group is assembled, read from hivemind's step control, to the result) and
  *call to result* (from calling step/fuse with hivemind's default schedule, now +
  matchmaking_time, to the result: matchmaking included);
- ``bytes_vs_butterfly``: bytes on the wire per peer per round, read from the loopback counters
  of a network namespace the benchmark creates for its peers (headers, framing, matchmaking and
  DHT traffic included), against the butterfly minimum 2(N-1)/N * S with S the fp32 body; beside
  it the serialized tensor payload only, counted where parts are serialized;
- ``train_vs_plain``: local samples/s of our trainer against a minimal PyTorch loop on exactly
  the same batches (asserted by a hash of every batch's token ids and labels), both building
  them with the same ``collate`` inside the timer, after the same warm-up round;
- scaling: round time, fusion share and peak memory per peer for N = 2, 3, 4 and two model sizes;
  and the accuracy after fusion with fp16 against fp32 on the same seeds (one run each).

The pieces: ``training_speed.py`` (train_vs_plain), ``fusion_speed.py`` (fusion_vs_raw and
bytes_vs_butterfly), ``loopback_swarm.py`` (the scaling swarms), ``run_report.py`` (the report),
``common.py`` (what the benchmark scripts share); this file runs them in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder the tests use
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import provenance  # noqa: E402  (also sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM)
from fusion_speed import bench_fusion, headline  # noqa: E402
from loopback_swarm import run_swarm, swarm_summary  # noqa: E402
from run_report import write_report  # noqa: E402
from training_speed import bench_training  # noqa: E402

from coldfusion_p2p.contributor.model import body_parameters, load_classifier, resolve_model_name  # noqa: E402

from tiny_models import build_tiny_model  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    """The command line (see the module docstring); at least one measured trial."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, N = 2 and 3, no scaling swarms")
    parser.add_argument("--trials", type=int, default=5, help="measured trials per pair (after one warm-up)")
    parser.add_argument("--peers", type=int, nargs="+", default=None, help="fusion group sizes (default 2 3 4)")
    parser.add_argument("--tiny-steps", type=int, default=200, help="training steps per trial, tiny model")
    parser.add_argument("--minilm-steps", type=int, default=12, help="training steps per trial, MiniLM")
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--request-timeout", type=float, default=0.5)
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling and accuracy swarms")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    arguments = parser.parse_args()
    if arguments.trials < 1:
        parser.error("--trials must be at least 1")
    return arguments


def start_results(arguments: argparse.Namespace, settings: dict) -> dict:
    """The results' provenance and settings, with a note for every setting below the defaults."""
    results: dict = {**provenance("python3 benchmarks/run.py"), "settings": settings, "notes": []}
    if arguments.trials < 5:
        results["notes"].append(f"only {arguments.trials} measured trials per pair (--trials): fewer than the 5 asked")

    if (arguments.tiny_steps, arguments.minilm_steps) != (200, 12):
        results["notes"].append(
            f"training trials shortened to {arguments.tiny_steps} (tiny) / {arguments.minilm_steps} (MiniLM) "
            "steps (defaults 200 / 12) to shorten the run on the loaded machine"
        )
    return results


def bench_all_fusion(model: str, peers: list[int], trials: int, settings: dict) -> list[dict]:
    """fusion_vs_raw and bytes_vs_butterfly for every N, fp32 and fp16, on the body of ``model``."""
    body_model = load_classifier(model, ["a", "b"], seed=0)
    shapes = [tuple(parameter.shape) for parameter in body_parameters(body_model)]
    del body_model
    rows = []
    for n_peers in peers:
        for compression in ("none", "fp16"):
            print(f"  N = {n_peers}, {compression}", flush=True)
            rows.append(bench_fusion(shapes, n_peers, compression, trials, settings))
    return rows


def headlines(results: dict) -> dict:
    """The report's first table: each figure pooled over the group sizes, per compression."""
    by_compression = {c: [r for r in results["fusion"] if r["compression"] == c] for c in ("none", "fp16")}
    return {
        "fusion_vs_raw": headline(by_compression["none"], "allreduce"),
        "fusion_vs_raw_call_to_result": headline(by_compression["none"], "call_to_result"),
        "bytes_vs_butterfly": headline(by_compression["none"], "wire"),
        "bytes_vs_butterfly_fp16": headline(by_compression["fp16"], "wire"),
        "payload_vs_butterfly": headline(by_compression["none"], "payload"),
        "payload_vs_butterfly_fp16": headline(by_compression["fp16"], "payload"),
        "train_vs_plain": {row["model"]: row["ratio"] for row in results["training"]},
    }


def bench_scaling(models: dict[str, str], workdir: Path) -> list[dict]:
    """Real peer swarms of N = 2, 3, 4 per model: round time, fusion share, peak memory (one run each)."""
    rows = []
    for name, model in models.items():
        swarm_steps = {"tiny": dict(local_steps=20, batch_size=16), "minilm": dict(local_steps=5, batch_size=16)}
        for n_peers in (2, 3, 4):
            swarm = run_swarm(model, n_peers, workdir / f"{name}-{n_peers}", rounds=2, **swarm_steps[name])
            rows.append(swarm_summary(swarm, n_peers, name))
    return rows


def bench_compression_accuracy(model: str, workdir: Path) -> dict:
    """Accuracy after fusion of two-peer swarms with fp32 and with fp16 on the same seeds (one run each)."""
    fp = {}
    for compression in ("none", "fp16"):
        rows = run_swarm(
            model,
            2,
            workdir / f"accuracy-{compression}",
            rounds=2,
            local_steps=10,
            batch_size=16,
            compression=compression,
        )
        fp[compression] = swarm_summary(rows, 2, "accuracy")["accuracy_after"]
    return {
        "fp32": fp["none"],
        "fp16": fp["fp16"],
        "difference": fp["fp16"] - fp["none"],
    }


def main() -> None:
    """Training, fusion, then (unless --quick or --no-scaling) the swarms; the report last."""
    arguments = parse_arguments()
    wall_started = time.monotonic()
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="coldfusion-bench-"))
    tiny = str(build_tiny_model(workdir / "tiny", "bert"))
    models = {"tiny": tiny} if arguments.quick else {"tiny": tiny, "minilm": resolve_model_name(None)}
    peers = arguments.peers or ([2, 3] if arguments.quick else [2, 3, 4])
    settings = {
        "trials": arguments.trials,
        "matchmaking_time": arguments.matchmaking_time,
        "request_timeout": arguments.request_timeout,
        "idle_seconds": 3.0,
    }
    results = start_results(arguments, settings)
    print("training vs a plain loop ...", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    steps = {"tiny": arguments.tiny_steps, "minilm": arguments.minilm_steps}
    results["training"] = [bench_training(name, model, steps[name], arguments.trials) for name, model in models.items()]

    print("fusion vs raw hivemind, bytes on the wire vs butterfly ...", flush=True)
    fusion_model = models["minilm" if not arguments.quick else "tiny"]
    results["fusion"] = bench_all_fusion(fusion_model, peers, arguments.trials, settings)
    results["headline"] = headlines(results)

    results["scaling"] = []
    if not arguments.no_scaling and not arguments.quick:
        print("scaling with real peers ...", flush=True)
        results["scaling"] = bench_scaling(models, workdir)
        results["compression_accuracy"] = bench_compression_accuracy(models.get("minilm", tiny), workdir)
    results["wall_seconds"] = time.monotonic() - wall_started
    results["load_average"] = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
    write_report(results, Path(arguments.out))
    print((Path(arguments.out) / "latest.md").read_text())


if __name__ == "__main__":
    main()
