"""The project's benchmarks, each a ratio against its baseline measured in the same run.

    python benchmarks/run.py            # about ten minutes on two cores
    python benchmarks/run.py --quick    # tiny model only, about three minutes

Writes ``benchmarks/results/latest.json`` and ``latest.md`` (and ``scaling.png``):

- ``fusion_vs_raw``: one fusion round of ours (all-or-nothing, verdicts, validation) against a bare
  ``DecentralizedAverager.step()`` on the same tensors and group, matchmaking excluded and included;
- ``bytes_vs_butterfly``: bytes each peer sends per round, counted where parts are serialized,
  against the butterfly all-reduce minimum 2(N-1)/N * S, with and without fp16 compression;
- ``train_vs_plain``: local samples/s of our trainer against a minimal PyTorch loop;
- scaling: round time, fusion share and peak memory per peer for N = 2, 3, 4 and two model sizes;
  and the accuracy after fusion with fp16 against fp32 on the same seeds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder the tests use

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from coldfusion_p2p.cli import as_flags  # noqa: E402
from coldfusion_p2p.config import DataConfig, FusionConfig, TrainingConfig  # noqa: E402
from coldfusion_p2p.data import load_task_data  # noqa: E402
from coldfusion_p2p.model import body_parameters, load_classifier, load_tokenizer, resolve_model_name  # noqa: E402
from coldfusion_p2p.trainer import LocalTrainer, batch_indices  # noqa: E402

from tiny_models import build_tiny_model  # noqa: E402

DATA = ROOT / "peers" / "data"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


# ----------------------------------------------------------------------------- training
def bench_training(label: str, model_name: str, steps: int, batch_size: int = 32) -> dict:
    """Our LocalTrainer against a minimal loop on the same model, batches and optimizer."""
    data = load_task_data(DataConfig(dataset=str(DATA / "tweet_sentiment" / "train.csv")))
    tokenizer = load_tokenizer(model_name)
    config = TrainingConfig(local_steps=steps, batch_size=batch_size, lr=2e-4)
    model = load_classifier(model_name, data.label_names, seed=0)
    trainer = LocalTrainer(model, tokenizer, data.train, data.validation, config, max_length=64)
    trainer.train_round(1)  # warm-up: allocator, kernels
    ours = trainer.train_round(2).samples_per_second

    plain_model = load_classifier(model_name, data.label_names, seed=0)
    # The plain loop builds its batches inside the timed loop too, the textbook way: per-example
    # tensors padded with pad_sequence. Same examples, order, optimizer and batch size as ours.
    encoded = tokenizer(data.train.texts, truncation=True, max_length=64)
    examples = {name: [torch.tensor(row) for row in rows] for name, rows in encoded.items()}
    labels = torch.tensor(data.train.labels)
    accepted = set(inspect.signature(plain_model.forward).parameters)
    pad_values = {"input_ids": tokenizer.pad_token_id or 0}

    def plain_batch(step: int) -> dict[str, torch.Tensor]:
        chosen = batch_indices(len(labels), batch_size, 0, 1000 + step).tolist()
        batch = {
            name: torch.nn.utils.rnn.pad_sequence(
                [rows[i] for i in chosen], batch_first=True, padding_value=pad_values.get(name, 0)
            )
            for name, rows in examples.items()
            if name in accepted
        }
        batch["labels"] = labels[chosen]
        return batch

    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=2e-4)
    plain_model.train()
    for step in range(2):  # the same warm-up
        plain_model(**plain_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    started = time.perf_counter()
    for step in range(2, steps + 2):
        plain_model(**plain_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain = steps * batch_size / (time.perf_counter() - started)
    return {
        "model": label,
        "steps": steps,
        "batch_size": batch_size,
        "ours_samples_per_second": ours,
        "plain_samples_per_second": plain,
        "ratio": ours / plain,
    }


# ----------------------------------------------------------------------------- fusion
def _fusion_worker(index, shapes, n_peers, compression, trials, maddrs_queue, initial, barrier, start_at, results):
    torch.set_num_threads(1)
    from hivemind import DHT
    from hivemind.averaging import DecentralizedAverager

    from coldfusion_p2p.fusion import BodyFusion, CountingCompression, count_reducer_bytes
    from coldfusion_p2p.records import RecordBoard, RunKeys, swarm_validators

    keys = RunKeys.from_run_id(f"bench-{n_peers}-{compression}-{len(shapes)}")
    peers = [] if index == 0 else list(initial)
    dht = DHT(start=True, host_maddrs=[LOOPBACK], initial_peers=peers, record_validators=swarm_validators(keys))
    if index == 0:
        for _ in range(n_peers - 1):
            maddrs_queue.put([str(address) for address in dht.get_visible_maddrs()])
    config = FusionConfig(
        matchmaking_time=1.0,
        request_timeout=0.5,
        allreduce_timeout=120.0,
        next_chunk_timeout=30.0,
        compression=compression,
    )
    shared_start = torch.Generator().manual_seed(0)  # every peer starts a round from the same fused body
    body = [torch.randn(shape, generator=shared_start) for shape in shapes]
    generator = torch.Generator().manual_seed(index + 1)  # ... and makes its own update
    fusion = BodyFusion(dht, body, prefix=keys.averager_prefix("bench"), config=config, board=RecordBoard(dht, keys))
    raw_bytes = mp.Value("Q", 0)
    count_reducer_bytes(raw_bytes)
    from coldfusion_p2p.fusion import COMPRESSIONS

    raw_tensors = [tensor.clone() for tensor in body]
    raw = DecentralizedAverager(
        raw_tensors,
        dht,
        prefix=keys.prefix + "_raw",
        start=True,
        min_group_size=2,
        target_group_size=None,
        min_matchmaking_time=1.0,
        request_timeout=0.5,
        allreduce_timeout=120.0,
        next_chunk_timeout=30.0,
        compression=CountingCompression(COMPRESSIONS[compression](), raw_bytes),
    )
    measurements = {
        "ours_total": [],
        "ours_allreduce": [],
        "raw_total": [],
        "raw_allreduce": [],
        "ours_bytes": [],
        "raw_bytes": [],
        "fused": [],
    }
    from hivemind.utils import get_dht_time

    for trial in range(trials):
        for mode in ("ours", "raw"):
            barrier.wait()
            if index == 0:
                start_at.value = get_dht_time() + 2.0
            barrier.wait()
            scheduled = start_at.value
            started = get_dht_time()
            if mode == "ours":
                for tensor in body:  # a fresh "training" update each round
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * 1e-3)
                result = fusion.fuse(
                    body, round_number=trial + 1, scheduled_time=scheduled, weight=1.0, info={"round": trial + 1}
                )
                measurements["fused"].append(result.fused or result.reason)
                measurements["ours_bytes"].append(result.bytes_sent)
            else:
                before = raw_bytes.value
                raw.step(scheduled_time=scheduled, timeout=60.0, allow_retries=False)
                measurements["raw_bytes"].append(raw_bytes.value - before)
            ended = get_dht_time()
            measurements[f"{mode}_total"].append(ended - started)
            measurements[f"{mode}_allreduce"].append(ended - scheduled)
    barrier.wait()
    results.put(measurements)
    raw.shutdown()
    fusion.shutdown()
    dht.shutdown()


def bench_fusion(shapes: list[tuple[int, ...]], n_peers: int, compression: str, trials: int) -> dict:
    context = mp.get_context("fork")  # hivemind forks its own processes inside the workers too
    queue, results = context.Queue(), context.Queue()
    barrier, start_at = context.Barrier(n_peers), context.Value("d", 0.0)
    first = context.Process(
        target=_fusion_worker, args=(0, shapes, n_peers, compression, trials, queue, [], barrier, start_at, results)
    )
    first.start()
    workers = [first]
    for index in range(1, n_peers):
        initial = queue.get(timeout=120)
        worker = context.Process(
            target=_fusion_worker,
            args=(index, shapes, n_peers, compression, trials, queue, initial, barrier, start_at, results),
        )
        worker.start()
        workers.append(worker)
    collected = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    size_bytes = sum(torch.Size(shape).numel() for shape in shapes) * 4
    butterfly = 2 * (n_peers - 1) / n_peers * size_bytes

    def mean(key):  # per trial, the slowest peer sets the round time; skip the first (warm-up) trial
        per_trial = [max(peer[key][trial] for peer in collected) for trial in range(1, trials)]
        return statistics.mean(per_trial)

    ours_bytes = statistics.mean(b for peer in collected for b in peer["ours_bytes"][1:])
    raw_bytes = statistics.mean(b for peer in collected for b in peer["raw_bytes"][1:])
    return {
        "peers": n_peers,
        "compression": compression,
        "body_bytes": size_bytes,
        "trials": trials - 1,
        "all_fused": all(all(fused is True for fused in peer["fused"]) for peer in collected),
        "failures": sorted({str(f) for peer in collected for f in peer["fused"] if f is not True}),
        "ours_seconds_incl_matchmaking": mean("ours_total"),
        "raw_seconds_incl_matchmaking": mean("raw_total"),
        "ours_seconds_allreduce": mean("ours_allreduce"),
        "raw_seconds_allreduce": mean("raw_allreduce"),
        "ratio_incl_matchmaking": mean("ours_total") / mean("raw_total"),
        "ratio_excl_matchmaking": mean("ours_allreduce") / mean("raw_allreduce"),
        "ours_bytes_per_peer": ours_bytes,
        "raw_bytes_per_peer": raw_bytes,
        "butterfly_minimum": butterfly,
        "bytes_vs_butterfly": ours_bytes / butterfly,
    }


# ----------------------------------------------------------------------------- swarms
def run_swarm(model: str, n_peers: int, workdir: Path, **settings) -> list[dict]:
    """N real peer processes on loopback for a few rounds; returns every peer's round history."""
    from hivemind import DHT

    from coldfusion_p2p.checkpoints import read_history
    from coldfusion_p2p.records import RunKeys, swarm_validators

    run_id = f"bench-swarm-{workdir.name}"
    entry = DHT(start=True, host_maddrs=[LOOPBACK], record_validators=swarm_validators(RunKeys.from_run_id(run_id)))
    datasets = ["trec_question_type", "tweet_sentiment", "rotten_tomatoes_snippets", "sms_spam"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = []
    try:
        for index in range(n_peers):
            flags = {
                "dataset": str(DATA / datasets[index] / "train.csv"),
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
                        [sys.executable, "-m", "coldfusion_p2p.cli", "join", *as_flags(flags)],
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for process in processes:
            process.wait(timeout=1800)
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


# ----------------------------------------------------------------------------- report
def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {results['machine']}; {results['date']}.",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| fusion_vs_raw (all-reduce, matchmaking excluded) | {results['fusion_vs_raw']:.2f}x | <= 1.10x |",
        f"| fusion_vs_raw (matchmaking included) | {results['fusion_vs_raw_incl_matchmaking']:.2f}x | - |",
        f"| bytes_vs_butterfly (fp32) | {results['bytes_vs_butterfly']:.2f}x | - |",
        f"| bytes_vs_butterfly (fp16) | {results['bytes_vs_butterfly_fp16']:.2f}x | - |",
        f"| train_vs_plain | {results['train_vs_plain']:.2f}x | >= 0.95x |",
        "",
    ]
    lines += [
        "## Fusion rounds",
        "",
        "| body MB | peers | compression | ours s (all-reduce) | raw s | ours s (incl. "
        "matchmaking) | raw s | bytes/peer MB | butterfly MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["fusion"]:
        lines.append(
            f"| {row['body_bytes'] / 1e6:.1f} | {row['peers']} | {row['compression']} | "
            f"{row['ours_seconds_allreduce']:.2f} | {row['raw_seconds_allreduce']:.2f} | "
            f"{row['ours_seconds_incl_matchmaking']:.2f} | {row['raw_seconds_incl_matchmaking']:.2f} | "
            f"{row['ours_bytes_per_peer'] / 1e6:.1f} | {row['butterfly_minimum'] / 1e6:.1f} |"
        )
    lines += ["", "## Training", "", "| model | ours samples/s | plain loop samples/s | ratio |", "|---|---|---|---|"]
    for row in results["training"]:
        lines.append(
            f"| {row['model']} | {row['ours_samples_per_second']:.1f} | "
            f"{row['plain_samples_per_second']:.1f} | {row['ratio']:.2f} |"
        )
    lines += [
        "",
        "## Scaling (real peer processes on loopback)",
        "",
        "| model | peers | round s | fusion s | fusion share | peak RSS MB per peer | all fused |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["scaling"]:
        lines.append(
            f"| {row['model']} | {row['peers']} | {row['round_seconds']:.1f} | {row['fusion_seconds']:.1f} | "
            f"{100 * row['fusion_share']:.0f}% | {row['peak_rss_mb']:.0f} | {row['all_fused']} |"
        )
    if results.get("compression_accuracy"):
        accuracy = results["compression_accuracy"]
        lines += [
            "",
            f"Accuracy after fusion (mean of peers, same seeds): fp32 {100 * accuracy['fp32']:.1f}%, "
            f"fp16 {100 * accuracy['fp16']:.1f}% (difference {100 * accuracy['difference']:+.1f} points; "
            "goal within 0.5).",
        ]
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    plot_scaling(results["scaling"], out / "scaling.png")


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for model in sorted({row["model"] for row in rows}):
        points = sorted((row for row in rows if row["model"] == model), key=lambda row: row["peers"])
        left.plot([p["peers"] for p in points], [p["round_seconds"] for p in points], "-o", label=model)
        right.plot([p["peers"] for p in points], [p["peak_rss_mb"] for p in points], "-o", label=model)
    left.set(xlabel="peers", ylabel="seconds per round", title="Round time")
    right.set(xlabel="peers", ylabel="MB", title="Peak memory per peer")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    arguments = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="coldfusion-bench-"))
    tiny = str(build_tiny_model(workdir / "tiny", "bert"))
    models = {"tiny": tiny} if arguments.quick else {"tiny": tiny, "minilm": resolve_model_name(None)}
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }

    print("training vs a plain loop ...", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    results["training"] = [
        bench_training("tiny", tiny, steps=200),
        *([] if arguments.quick else [bench_training("minilm", models["minilm"], steps=12)]),
    ]

    print("fusion vs raw hivemind, bytes vs butterfly ...", flush=True)
    body_model = load_classifier(models["minilm" if not arguments.quick else "tiny"], ["a", "b"], seed=0)
    shapes = [tuple(parameter.shape) for parameter in body_parameters(body_model)]
    results["fusion"] = [
        bench_fusion(shapes, n, compression, trials=4) for n in (2, 3, 4) for compression in ("none", "fp16")
    ]
    by_compression = {c: [r for r in results["fusion"] if r["compression"] == c] for c in ("none", "fp16")}
    results["fusion_vs_raw"] = statistics.mean(r["ratio_excl_matchmaking"] for r in by_compression["none"])
    results["fusion_vs_raw_incl_matchmaking"] = statistics.mean(
        r["ratio_incl_matchmaking"] for r in by_compression["none"]
    )
    results["bytes_vs_butterfly"] = statistics.mean(r["bytes_vs_butterfly"] for r in by_compression["none"])
    results["bytes_vs_butterfly_fp16"] = statistics.mean(r["bytes_vs_butterfly"] for r in by_compression["fp16"])
    results["train_vs_plain"] = min(row["ratio"] for row in results["training"])

    print("scaling with real peers ...", flush=True)
    results["scaling"] = []
    for name, model in models.items():
        steps = {"tiny": dict(local_steps=20, batch_size=16), "minilm": dict(local_steps=5, batch_size=16)}[name]
        for n_peers in (2, 3, 4):
            rows = run_swarm(model, n_peers, workdir / f"{name}-{n_peers}", rounds=2, **steps)
            results["scaling"].append(swarm_summary(rows, n_peers, name))
    accuracy_model = models.get("minilm", tiny)
    fp = {}
    for compression in ("none", "fp16"):
        rows = run_swarm(
            accuracy_model,
            2,
            workdir / f"accuracy-{compression}",
            rounds=2,
            local_steps=10,
            batch_size=16,
            compression=compression,
        )
        fp[compression] = swarm_summary(rows, 2, "accuracy")["accuracy_after"]
    results["compression_accuracy"] = {"fp32": fp["none"], "fp16": fp["fp16"], "difference": fp["fp16"] - fp["none"]}
    write_report(results, Path(arguments.out))
    print((Path(arguments.out) / "latest.md").read_text())


if __name__ == "__main__":
    main()
