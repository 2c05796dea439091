"""LoRA contributors against full finetuning: samples/s and peak memory of one peer's local round.

    python3 benchmarks/lora_vs_full.py                          # MiniLM, 5 trials per arm
    python3 benchmarks/lora_vs_full.py --model mpnet --trials 3 --steps 8   # the larger preset

Why: ``--lora-rank`` is for bigger models on small machines, so what it buys is memory (no
gradients and no AdamW state for the body's weights) at some cost in speed (the adapters' extra
matmuls, and the merge at the end of the round). Both arms do the same work: the same bundled
dataset (TREC question types), the same seeded batches (the trainer's stream), ``--steps`` AdamW
steps of batch 32, one torch thread... (``--threads``), including the LoRA merge into the body.
Each trial runs in a fresh process (``--worker``), so peak memory is that trial's own: it reports
the peak resident memory of the process and its growth over the model-loaded baseline (what the
round itself costs). Arms alternate (trial t: full first when t is even) after one untimed warm-up
trial per arm; min/median/max over trials.

Writes ``docs/measurements/lora/<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, ROOT, fmt, log, order_of, provenance, report_header, spread, table_header, table_row

ARMS = ("full", "lora")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(arm: str, model: str, steps: int, rank: int, threads: int) -> dict:
    """One trial in this (fresh) process: build the learner, run one local round, measure it."""
    import torch

    from coldfusion_p2p.config import build_config
    from coldfusion_p2p.contributor.learner import build_learner

    torch.set_num_threads(threads)
    settings = {
        "dataset": str(DATA / "trec_question_type" / "train.csv"),
        "model": model,
        "local_steps": steps,
        "batch_size": 32,
        "max_length": 64,
        "refit_steps": 0,
        "lora_rank": rank if arm == "lora" else 0,
    }
    learner = build_learner(build_config(settings))
    loaded = peak_rss_mb()
    trainable = []  # counted at the first step: LoRA's adapters exist only inside the round

    def count(step: int, loss: float) -> None:
        if not trainable:
            trainable.append(sum(p.numel() for p in learner.model.parameters() if p.requires_grad))

    started = time.perf_counter()
    stats = learner.trainer.train_round(1, on_step=count)
    seconds = time.perf_counter() - started
    return {
        "arm": arm,
        "samples_per_second": stats.samples_per_second,
        "round_seconds": seconds,  # the round with LoRA's merge
        "peak_rss_mb": peak_rss_mb(),
        "round_rss_growth_mb": peak_rss_mb() - loaded,
        "trainable_parameters": trainable[0],
        "loss": stats.loss,
    }


def run_trial(arm: str, arguments) -> dict:
    command = [sys.executable, __file__, "--worker", arm, "--model", arguments.model, "--steps", str(arguments.steps)]
    command += ["--rank", str(arguments.rank), "--threads", str(arguments.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"error: the {arm} trial failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(trials: list[dict]) -> dict:
    keys = ("samples_per_second", "round_seconds", "peak_rss_mb", "round_rss_growth_mb")
    summary = {arm: {key: spread([t[key] for t in trials if t["arm"] == arm]) for key in keys} for arm in ARMS}
    for arm in ARMS:
        summary[arm]["trainable_parameters"] = next(t["trainable_parameters"] for t in trials if t["arm"] == arm)
    return summary


def write_report(results: dict, out: Path) -> None:
    summary = results["summary"]
    lines = report_header(f"LoRA (rank {results['rank']}) vs full finetuning: {results['model']}", results)
    lines += table_header("arm", "trainable parameters", "samples/s", "round s", "peak RSS MB", "round's RSS growth MB")
    for arm in ARMS:
        row = summary[arm]
        lines.append(
            table_row(
                arm,
                f"{row['trainable_parameters']:,}",
                fmt(row["samples_per_second"], digits=1),
                fmt(row["round_seconds"], digits=1),
                fmt(row["peak_rss_mb"], digits=0),
                fmt(row["round_rss_growth_mb"], digits=0),
            )
        )
    lines += [
        "",
        f"median (min-max) over {results['trials']} trials per arm, order alternating, after one warm-up each.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="a preset (minilm, mpnet) or a model folder")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "measurements" / "lora"))
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(worker(arguments.worker, arguments.model, arguments.steps, arguments.rank, arguments.threads)))
        return
    started = time.perf_counter()
    for arm in ARMS:
        log(f"warm-up: {arm}")
        run_trial(arm, arguments)
    trials = []
    for trial in range(arguments.trials):
        for arm in order_of(trial, *ARMS):
            trials.append({**run_trial(arm, arguments), "trial": trial})
            log(
                f"trial {trial} {arm}: {trials[-1]['samples_per_second']:.1f} samples/s, "
                f"{trials[-1]['peak_rss_mb']:.0f} MB"
            )
    results = {
        **provenance("python3 benchmarks/lora_vs_full.py"),
        "wall_seconds": time.perf_counter() - started,
        "model": arguments.model,
        "rank": arguments.rank,
        "steps": arguments.steps,
        "trials": arguments.trials,
        "load_average_1min_at_end": __import__("os").getloadavg()[0],  # other jobs share the cores?
        "summary": summarize(trials),
        "runs": trials,
    }
    out = Path(arguments.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, out / arguments.model.replace("/", "_"))
    log(f"wrote {out}/{arguments.model}.md")


if __name__ == "__main__":
    main()
