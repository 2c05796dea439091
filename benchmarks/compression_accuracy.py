"""The accuracy cost of compressing the all-reduce (fp16, int8) against fp32, on the same seeds.

    python3 benchmarks/compression_accuracy.py                 # fp32 twice, fp16, int8 (~20 min on 2 cores)
    python3 benchmarks/compression_accuracy.py --model tiny --rounds 1 --local-steps 2   # smoke test

Why: ``--compression int8`` quarters the bytes each peer sends, which is what a home uplink pays
(``benchmarks/nat_fusion.py``), but every fused body then carries quantization error. Whether that
error costs the contributors accuracy is measured here, not assumed.

Each *run* is a 3-peer swarm of real ``coldfusion-peer join`` processes on loopback, started by
``benchmarks/run.py``'s ``run_swarm`` (its contributors for N = 3: TREC question types, tweet
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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import run_swarm  # noqa: E402  (also puts tests/ on the path and sets HF_HUB_OFFLINE)

N_PEERS = 3
GOAL_POINTS = 0.5
NAMES = {"none": "fp32", "fp16": "fp16", "int8": "int8"}
ACCURACY_KEYS = ("accuracy_before", "accuracy_after_old_head", "accuracy_after")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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
        rows = {row["round"]: row for row in peer["rounds"]}
        for round_number in range(1, settings["rounds"] + 1):
            row = rows.get(round_number)
            if row is None:
                failures.append(f"{peer['contributor']} round {round_number}: no report")
            elif row["outcome"] != "fused" or row["group_size"] != N_PEERS:
                failures.append(
                    f"{peer['contributor']} round {round_number}: {row['outcome']} in a group of "
                    f"{row['group_size']} ({row.get('reason', '')})"
                )
    return {
        "label": label,
        "compression": compression,
        "wall_seconds": time.monotonic() - started,
        "ok": not failures,
        "failures": failures,
        "peers": peers,
    }


def accuracy(run: dict, contributor: str, round_number: int, key: str) -> float | None:
    for peer in run["peers"]:
        if peer["contributor"] == contributor:
            for row in peer["rounds"]:
                if row["round"] == round_number and row["outcome"] == "fused":
                    return row[key]
    return None


def compare(runs: list[dict], rounds: int) -> dict:
    """Deltas (points) of every run against the first fp32 run, per contributor and round."""
    reference = runs[0]
    contributors = [peer["contributor"] for peer in reference["peers"]]
    table = []
    for contributor in contributors:
        for round_number in range(1, rounds + 1):
            row = {"contributor": contributor, "round": round_number}
            for run in runs:
                for key in ACCURACY_KEYS:
                    value = accuracy(run, contributor, round_number, key)
                    base = accuracy(reference, contributor, round_number, key)
                    row[f"{run['label']}.{key}"] = value
                    row[f"{run['label']}.{key}.delta_points"] = (
                        None if value is None or base is None else 100 * (value - base)
                    )
            table.append(row)
    last = {}
    for run in runs[1:]:
        for key in ("accuracy_after", "accuracy_after_old_head"):
            deltas = [
                row[f"{run['label']}.{key}.delta_points"]
                for row in table
                if row["round"] == rounds and row[f"{run['label']}.{key}.delta_points"] is not None
            ]
            last[f"{run['label']}.{key}"] = {
                "mean_delta_points": statistics.mean(deltas) if len(deltas) == len(contributors) else None,
                "worst_delta_points": min(deltas) if deltas else None,
                "deltas_points": deltas,
            }
    return {"reference": reference["label"], "contributors": contributors, "table": table, "last_round": last}


def fmt_points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def fmt_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    comparison, runs, settings = results["comparison"], results["runs"], results["settings"]
    labels = [run["label"] for run in runs]
    rounds = settings["rounds"]
    floor = results["noise_floor"]
    lines = [
        "# Accuracy cost of compressing the all-reduce",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        f"Three real peers on loopback ({settings['model_label']}; contributors "
        f"{', '.join(comparison['contributors'])}; seed 0 for every peer in every run), {rounds} rounds x "
        f"{settings['local_steps']} local steps of batch {settings['batch_size']} at lr {settings['lr']:g}, "
        f"min_group_size {N_PEERS}, the default head re-fit. Runs in this order: {', '.join(labels)}; they differ "
        "only in `--compression`. Accuracy: each contributor's validation accuracy (%) after fusion and the head "
        f"re-fit; delta: points against `{comparison['reference']}`.",
        "",
        "## Last round",
        "",
        "| run | mean delta, after re-fit | worst contributor | mean delta, old head | goal |",
        "|---|---|---|---|---|",
    ]
    for run in runs[1:]:
        after = comparison["last_round"][f"{run['label']}.accuracy_after"]
        old = comparison["last_round"][f"{run['label']}.accuracy_after_old_head"]
        goal = "-"
        if run["compression"] == "int8" and after["mean_delta_points"] is not None:
            goal = "met (>= -0.5)" if after["mean_delta_points"] >= -GOAL_POINTS else "**not met** (< -0.5)"
        elif run["compression"] == "none":
            goal = "noise floor"
        lines.append(
            f"| {run['label']} | {fmt_points(after['mean_delta_points'])} | {fmt_points(after['worst_delta_points'])} "
            f"| {fmt_points(old['mean_delta_points'])} | {goal} |"
        )
    lines += [
        "",
        f"Noise floor (two fp32 runs, same seeds): accuracies identical in every round: "
        f"**{floor['identical_accuracies']}** (largest difference {floor['max_abs_difference_points']:.2f} points); "
        f"fused bodies of the last round identical (checkpoint fingerprints): **{floor['identical_fingerprints']}**.",
        "",
        "## Fused bodies",
        "",
        f"Distance of each run's last fused body from `{comparison['reference']}`'s, per contributor: largest "
        "absolute difference, L2 distance over the body's norm, and L2 distance over the length of the reference's "
        "own update from the pretrained body (the all-reduce is not bit-reproducible in fp32 either: which peer "
        "reduces which part follows the random peer ids).",
        "",
        "| run | contributor | max abs | relative L2 | relative to the fp32 update |",
        "|---|---|---|---|---|",
        *[
            f"| {row['run']} | {row['contributor']} | {row['max_abs']:.2e} | {row['relative_l2']:.2e} | "
            f"{row['relative_to_update']:.3f} |"
            for row in results["body_distances"]
        ],
        "",
        "Within each run: the largest distance between two peers' last fused bodies (in fp32 they hold one base, "
        "to rounding; with a lossy compression each peer adds its own decoded delta to its own values):",
        "",
        "| run | peer pairs | max abs | max L2 |",
        "|---|---|---|---|",
        *[
            f"| {row['run']} | {row['pairs']} | "
            + ("-" if row["max_abs"] is None else f"{row['max_abs']:.2e} | {row['max_l2']:.2e} |")
            for row in results.get("peer_spread", [])
        ],
        "",
        "Where they differ most (the tensor with the largest absolute difference, per run and contributor), beside "
        "that tensor's own largest value and standard deviation in the reference:",
        "",
        "| run | contributor | tensor | max abs difference | reference abs max | reference std |",
        "|---|---|---|---|---|---|",
        *[
            f"| {row['run']} | {row['contributor']} | `{row['worst_tensors'][0]['name']}` | "
            f"{row['worst_tensors'][0]['max_abs']:.2e} | {row['worst_tensors'][0]['reference_abs_max']:.3f} | "
            f"{row['worst_tensors'][0]['reference_std']:.3f} |"
            for row in results["body_distances"]
            if row.get("worst_tensors")
        ],
        "",
        "## Per contributor and round",
        "",
        "| contributor | round | "
        + " | ".join(f"{label} %" for label in labels)
        + " | "
        + " | ".join(f"{label} delta" for label in labels[1:])
        + " |",
        "|---|---|" + "---|" * (2 * len(labels) - 1),
    ]
    for row in comparison["table"]:
        lines.append(
            f"| {row['contributor']} | {row['round']} | "
            + " | ".join(fmt_accuracy(row[f"{label}.accuracy_after"]) for label in labels)
            + " | "
            + " | ".join(fmt_points(row[f"{label}.accuracy_after.delta_points"]) for label in labels[1:])
            + " |"
        )
    lines += [
        "",
        "Old head (after fusion, before the re-fit), same layout:",
        "",
        "| contributor | round | "
        + " | ".join(f"{label} %" for label in labels)
        + " | "
        + " | ".join(f"{label} delta" for label in labels[1:])
        + " |",
        "|---|---|" + "---|" * (2 * len(labels) - 1),
    ]
    for row in comparison["table"]:
        lines.append(
            f"| {row['contributor']} | {row['round']} | "
            + " | ".join(fmt_accuracy(row[f"{label}.accuracy_after_old_head"]) for label in labels)
            + " | "
            + " | ".join(fmt_points(row[f"{label}.accuracy_after_old_head.delta_points"]) for label in labels[1:])
            + " |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| run | wall s | fusion s per round (mean of peers) | sent MB per round (mean of peers) |",
    ]
    lines.append("|---|---|---|---|")
    for run in runs:
        fusion, sent = [], []
        for round_number in range(1, rounds + 1):
            rows = [row for peer in run["peers"] for row in peer["rounds"] if row["round"] == round_number]
            fusion.append(f"{statistics.mean(r['fusion_seconds'] for r in rows):.1f}" if rows else "-")
            sent.append(f"{statistics.mean(r['bytes_sent'] for r in rows) / 1e6:.1f}" if rows else "-")
        lines.append(f"| {run['label']} | {run['wall_seconds']:.0f} | {', '.join(fusion)} | {', '.join(sent)} |")
    failures = [f"{run['label']}: {failure}" for run in runs for failure in run["failures"]]
    lines += ["", "## Failures", ""]
    lines += [f"- {failure}" for failure in failures] or ["None: every round of every run fused in a group of 3."]
    if results.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]]]
    (out / "compression_accuracy.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "compression_accuracy.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparison, runs = results["comparison"], results["runs"]
    rounds = results["settings"]["rounds"]
    contributors = comparison["contributors"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"none": "-", "fp16": "--", "int8": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    from matplotlib.lines import Line2D

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
    compared = runs[1:]
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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def noise_floor(runs: list[dict], rounds: int) -> dict:
    """Do the two fp32 runs agree exactly: accuracies in every round, and the last fused body?"""
    fp32 = [run for run in runs if run["compression"] == "none"]
    if len(fp32) < 2:
        return {"identical_accuracies": None, "max_abs_difference_points": float("nan"), "identical_fingerprints": None}
    first, second = fp32[:2]
    differences = []
    for peer in first["peers"]:
        for round_number in range(1, rounds + 1):
            for key in ACCURACY_KEYS:
                a = accuracy(first, peer["contributor"], round_number, key)
                b = accuracy(second, peer["contributor"], round_number, key)
                if a is not None and b is not None:
                    differences.append(abs(100 * (a - b)))
    fingerprints = [
        (peer["last_fingerprint"], other["last_fingerprint"])
        for peer in first["peers"]
        for other in second["peers"]
        if peer["contributor"] == other["contributor"]
    ]
    return {
        "runs": [first["label"], second["label"]],
        "identical_accuracies": bool(differences) and max(differences) == 0.0,
        "max_abs_difference_points": max(differences) if differences else float("nan"),
        "identical_fingerprints": bool(fingerprints) and all(a == b and a is not None for a, b in fingerprints),
        "fingerprints": fingerprints,
    }


def body_distances(runs: list[dict], original: dict) -> list[dict]:
    """How far each run's last fused body lies from the first fp32 run's, per contributor.

    The all-reduce is not bit-reproducible even in fp32 (which peer reduces which part follows the
    random peer ids, so float sums round differently), so fp32 against fp32 is the floor here too.
    ``relative_to_update``: the distance over the fp32 run's own distance from the pretrained body."""
    import torch

    from coldfusion_p2p.contributor.checkpoints import latest_checkpoint, load_body_state

    def body(folder: str) -> dict | None:
        checkpoint = latest_checkpoint(folder)
        return None if checkpoint is None else load_body_state(checkpoint.path)

    reference = {peer["contributor"]: body(peer["folder"]) for peer in runs[0]["peers"]}
    rows = []
    for run in runs[1:]:
        for peer in run["peers"]:
            mine, theirs = body(peer["folder"]), reference.get(peer["contributor"])
            if mine is None or theirs is None:
                continue
            names = [name for name in theirs if name in mine and name in original and theirs[name].is_floating_point()]
            differences = {n: mine[n].float() - theirs[n].float() for n in names}
            difference = torch.cat([d.flatten() for d in differences.values()])
            worst = sorted(names, key=lambda n: -float(differences[n].abs().max()))[:3]
            update = torch.cat([(theirs[n].float() - original[n].float()).flatten() for n in names])
            reference_norm = torch.cat([theirs[n].float().flatten() for n in names]).norm()
            rows.append(
                {
                    "run": run["label"],
                    "contributor": peer["contributor"],
                    "max_abs": float(difference.abs().max()),
                    "relative_l2": float(difference.norm() / reference_norm),
                    "relative_to_update": float(difference.norm() / update.norm()),
                    "worst_tensors": [  # where the bodies differ most, beside the reference tensor's own scale
                        {
                            "name": n,
                            "max_abs": float(differences[n].abs().max()),
                            "reference_abs_max": float(theirs[n].float().abs().max()),
                            "reference_std": float(theirs[n].float().std()),
                        }
                        for n in worst
                    ],
                }
            )
    return rows


def peer_spread(runs: list[dict]) -> list[dict]:
    """Do the peers of one run hold the same fused base? Largest pairwise distances between their last bodies.

    In fp32 they agree to rounding. With a lossy compression each peer adds its own decoded delta to its
    own part, so they can end a fused round on different bodies."""
    import itertools

    import torch

    from coldfusion_p2p.contributor.checkpoints import latest_checkpoint, load_body_state

    rows = []
    for run in runs:
        bodies = []
        for peer in run["peers"]:
            checkpoint = latest_checkpoint(peer["folder"])
            if checkpoint is not None:
                bodies.append(load_body_state(checkpoint.path))
        pairs = []
        for first, second in itertools.combinations(bodies, 2):
            names = [n for n in first if n in second and first[n].is_floating_point()]
            difference = torch.cat([(first[n].float() - second[n].float()).flatten() for n in names])
            pairs.append((float(difference.abs().max()), float(difference.norm())))
        rows.append(
            {
                "run": run["label"],
                "pairs": len(pairs),
                "max_abs": max((pair[0] for pair in pairs), default=None),
                "max_l2": max((pair[1] for pair in pairs), default=None),
            }
        )
    return rows


def main() -> None:
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
    import torch

    from coldfusion_p2p.contributor.model import resolve_model_name

    wall_started = time.monotonic()
    workdir = Path(arguments.work_dir or tempfile.mkdtemp(prefix="coldfusion-compression-"))
    if arguments.model == "tiny":
        from tiny_models import build_tiny_model

        model, model_label = str(build_tiny_model(workdir / "tiny-model", "bert")), "a tiny BERT (smoke test)"
    else:
        model = resolve_model_name(arguments.model)
        model_label = "all-MiniLM-L6-v2 (bundled)" if arguments.model is None else Path(model).name
    settings = {
        "rounds": arguments.rounds,
        "local_steps": arguments.local_steps,
        "batch_size": arguments.batch_size,
        "lr": arguments.lr,
        "matchmaking_time": 5.0,  # the defaults (run_swarm's 2 s / 1 s are tight for 3 MiniLM peers on 2 cores)
        "request_timeout": 3.0,
    }
    from coldfusion_p2p.contributor.model import load_classifier

    original = {
        name: tensor.clone()
        for name, tensor in load_classifier(model, ["a", "b"], seed=0).base_model.state_dict().items()
    }
    plan = ["none", *arguments.compressions] + ["none"] * (arguments.fp32_runs - 1)
    runs = []
    for index, compression in enumerate(plan):
        label = NAMES[compression] + (
            f"-{sum(c == compression for c in plan[:index]) + 1}" if compression == "none" else ""
        )
        log(f"run {index + 1}/{len(plan)}: {label} ...")
        run = run_once(model, compression, label, workdir, settings)
        runs.append(run)
        last = {
            peer["contributor"]: accuracy(run, peer["contributor"], arguments.rounds, "accuracy_after")
            for peer in run["peers"]
        }
        finals = ", ".join(f"{name} {fmt_accuracy(value)}%" for name, value in last.items())
        log(f"  {label}: {'ok' if run['ok'] else 'FAILED'} in {run['wall_seconds']:.0f}s; last round: {finals}")
        for failure in run["failures"]:
            log(f"  failure: {failure}")
    results = {
        "command": "python3 benchmarks/compression_accuracy.py" + "".join(f" {argument}" for argument in sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            **settings,
            "model": model,
            "model_label": model_label,
            "peers": N_PEERS,
            "seed": 0,
            "order": [run["label"] for run in runs],
            "run_swarm": "benchmarks/run.py run_swarm: one torch thread per peer, min_group_size = peers, quiet",
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
    failed = [run["label"] for run in runs if not run["ok"]]
    if failed:
        print(
            f"error: {len(failed)} run(s) did not fuse every round in a group of {N_PEERS}: {failed}", file=sys.stderr
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
