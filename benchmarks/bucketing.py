"""Local training samples/s with length-bucketed batches against the plain seeded stream.

    python benchmarks/bucketing.py            # MiniLM, three short-text contributors, ~3 minutes on 2 cores
    python benchmarks/bucketing.py --trials 3

Both modes train the same contributor's model on one whole stream window (the same examples,
grouped into batches differently: ``--steps`` defaults to the bucketing window), with the same
optimizer, batch size and padding rule (each batch padded to its own longest example, inside the
timed loop in both), after the same warm-up step. Trials alternate the order of the two modes;
the result is min/median/max samples/s of each and the ratio of medians, beside the padded-token
ratio (a property of the batches alone).
Writes ``benchmarks/results/bucketing.json`` and ``bucketing.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from coldfusion_p2p.apps.bundled import resolve_contributors  # noqa: E402
from coldfusion_p2p.config import build_config, read_config_file  # noqa: E402
from coldfusion_p2p.contributor.batches import BUCKET_WINDOW, padding_ratio  # noqa: E402
from coldfusion_p2p.contributor.learner import build_learner  # noqa: E402

DATASETS = ("trec_question_type", "tweet_sentiment", "sms_spam")


def time_mode(learner, bucketing: bool, steps: int) -> float:
    """Samples/s of ``steps`` optimizer steps (after one untimed warm-up step) in one mode."""
    trainer = learner.trainer
    trainer.config.length_bucketing = bucketing
    trainer.config.local_steps = 1
    trainer.train_round(round_number=1)  # warm-up: allocator, kernels
    trainer.config.local_steps = steps
    stats = trainer.train_round(round_number=2)
    return stats.samples_per_second


def measure(name: str, steps: int, trials: int) -> dict:
    (contributor,) = resolve_contributors([name], minimum=1)
    learner = build_learner(build_config(read_config_file(contributor.config_path), {"torch_threads": 1}))
    config = learner.trainer.config
    numbers = {"plain": [], "bucketed": []}
    for trial in range(trials):
        order = ("plain", "bucketed") if trial % 2 == 0 else ("bucketed", "plain")
        for mode in order:
            numbers[mode].append(time_mode(learner, mode == "bucketed", steps))
    first = steps  # round 2's batches: the ones timed
    ratios = {}
    for mode in ("plain", "bucketed"):
        config.length_bucketing = mode == "bucketed"
        batches = [learner.trainer.batch(first + index) for index in range(steps)]
        ratios[mode] = padding_ratio(learner.trainer.train_data, batches)
    summary = {
        mode: {"min": min(values), "median": statistics.median(values), "max": max(values), "trials": values}
        for mode, values in numbers.items()
    }
    return {
        "dataset": name,
        "steps": steps,
        "batch_size": config.batch_size,
        "samples_per_second": summary,
        "ratio_of_medians": summary["bucketed"]["median"] / summary["plain"]["median"],
        "padded_over_real_tokens": ratios,
    }


def padding_table(windows: int = 2) -> list[dict]:
    """Tokens computed per batch of 32, plain vs bucketed, for every bundled dataset (no timing)."""
    from coldfusion_p2p.apps.bundled import bundled_names
    from coldfusion_p2p.contributor.batches import encode_split, stream_batch
    from coldfusion_p2p.contributor.data import load_task_data
    from coldfusion_p2p.contributor.model import bundled_model_path, load_tokenizer

    tokenizer, rows = load_tokenizer(bundled_model_path()), []
    for name in bundled_names():
        (contributor,) = resolve_contributors([name], minimum=1)
        config = build_config(read_config_file(contributor.config_path))
        encoded = encode_split(tokenizer, load_task_data(config.data).train, config.data.max_length)
        count = windows * BUCKET_WINDOW
        modes = {
            mode: [stream_batch(encoded, 32, 0, number, mode == "bucketed") for number in range(count)]
            for mode in ("plain", "bucketed")
        }
        tokens = {
            mode: sum(len(batch) * int(encoded.lengths[batch].max()) for batch in batches) / count
            for mode, batches in modes.items()
        }
        rows.append(
            {
                "dataset": name,
                "mean_tokens": float(encoded.lengths.mean()),
                "tokens_per_batch": tokens,
                "padded_over_real": {mode: padding_ratio(encoded, batches) for mode, batches in modes.items()},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=BUCKET_WINDOW)  # one whole window: the same examples
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bucketing"))
    parser.add_argument("--padding-only", action="store_true", help="only the tokens-per-batch table (no timing)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    padding = padding_table()
    results = [] if arguments.padding_only else [measure(name, arguments.steps, arguments.trials) for name in DATASETS]
    payload = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread",
        "load_average_at_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
        "padding": padding,
    }
    Path(arguments.output + ".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Length bucketing: local samples/s (MiniLM, batch 32, 64 tokens max)",
        "",
        f"`{payload['command']}` on {payload['machine']}, {payload['time']}, "
        f"load average at the end {payload['load_average_at_end'][0]:.1f}.",
        "",
        "| dataset | plain samples/s (min/median/max) | bucketed samples/s (min/median/max) | ratio | "
        "padded/real tokens plain -> bucketed |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        plain, bucketed = result["samples_per_second"]["plain"], result["samples_per_second"]["bucketed"]
        pads = result["padded_over_real_tokens"]
        lines.append(
            f"| {result['dataset']} | {plain['min']:.1f} / {plain['median']:.1f} / {plain['max']:.1f} | "
            f"{bucketed['min']:.1f} / {bucketed['median']:.1f} / {bucketed['max']:.1f} | "
            f"{result['ratio_of_medians']:.2f}x | {pads['plain']:.2f} -> {pads['bucketed']:.2f} |"
        )
    lines += [
        "",
        "Tokens the model computes per batch of 32 (each batch padded to its own longest), every bundled dataset:",
        "",
        "| dataset | mean tokens | tokens/batch plain | tokens/batch bucketed | padded/real plain -> bucketed |",
        "|---|---|---|---|---|",
    ]
    for row in padding:
        tokens, pads = row["tokens_per_batch"], row["padded_over_real"]
        lines.append(
            f"| {row['dataset']} | {row['mean_tokens']:.1f} | {tokens['plain']:.0f} | {tokens['bucketed']:.0f} | "
            f"{pads['plain']:.2f} -> {pads['bucketed']:.2f} |"
        )
    Path(arguments.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
