"""``benchmarks/run.py``'s report: ``latest.json`` (every number), ``latest.md`` (the tables), ``scaling.png``.

A deterministic function of the results dict: ``write_report(json.load(...), folder)`` regenerates
a committed report exactly.
"""

from __future__ import annotations

from pathlib import Path

from common import bullet_section, fmt, pyplot, report_header, save_figure, section, table_header, table_row, write_json


def write_report(results: dict, out: Path) -> None:
    """The JSON first (it survives a report that fails to render), then the markdown and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "latest.json", results)
    lines = [
        *_headline_table(results),
        *_fusion_table(results),
        *_bytes_table(results),
        *_training_table(results),
        *_scaling_section(results),
        *_accuracy_line(results),
        *bullet_section("Notes", results.get("notes") or []),
    ]
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    if results.get("scaling"):
        plot_scaling(results["scaling"], out / "scaling.png")


def _headline_table(results: dict) -> list[str]:
    """The header, how the pairs were run, and one line per headline figure against its goal."""
    h = results["headline"]
    fusion_peers = "/".join(str(row["peers"]) for row in results["fusion"] if row["compression"] == "none")
    lines = [
        *report_header(
            "Benchmarks",
            results,
            f" Load while running (1-minute load average at start/end): {results['load_average']}.",
        ),
        f"Every pair ran the same work in the same run, alternating which arm goes first, after one untimed "
        f"warm-up trial; values are **median (min-max)** over the measured trials ({results['settings']}).",
        "",
        *table_header("figure", "value: median (min-max)", "goal"),
        table_row(
            f"fusion_vs_raw, all-reduce (group assembled -> result), fp32, N = {fusion_peers}, per-trial ratio",
            fmt(h["fusion_vs_raw"], suffix="x"),
            "<= 1.10x",
        ),
        table_row(
            "fusion_vs_raw, call to result (matchmaking included), fp32, per-trial ratio",
            fmt(h["fusion_vs_raw_call_to_result"], suffix="x"),
            "-",
        ),
        table_row(
            "bytes_vs_butterfly, wire bytes per peer / 2(N-1)/N*S, fp32", fmt(h["bytes_vs_butterfly"], suffix="x"), "-"
        ),
        table_row("bytes_vs_butterfly, wire, fp16", fmt(h["bytes_vs_butterfly_fp16"], suffix="x"), "-"),
        table_row(
            "(payload only: serialized tensor parts, fp32 / fp16)",
            f"{fmt(h['payload_vs_butterfly'], suffix='x')} / {fmt(h['payload_vs_butterfly_fp16'], suffix='x')}",
            "-",
        ),
    ]
    for row in results["training"]:
        lines.append(
            table_row(
                f"train_vs_plain, {row['model']}, per-trial ratio of samples/s",
                fmt(row["ratio"], suffix="x"),
                ">= 0.95x",
            )
        )
    return lines


def _fusion_table(results: dict) -> list[str]:
    """Seconds per round of both arms, both figures (all-reduce; call to result), per N and compression."""
    lines = [
        *section(
            "Fusion rounds",
            "Seconds per round (the slowest peer of each trial). *all-reduce*: from the moment the peer's group is "
            "assembled (hivemind's step stage turns RUNNING_ALLREDUCE) to the result; ours includes its "
            "validation and verdict exchange. *call to result*: from calling fuse()/step() with hivemind's "
            f"default schedule (now + matchmaking_time = {results['settings']['matchmaking_time']} s, the same in "
            "both arms) to the result: matchmaking included. Both arms: same tensors, DHT, timeouts and "
            "declare-state period; neither re-declares state inside the round. *raw* is hivemind 1.1.12's "
            "`DecentralizedAverager.step()`.",
        ),
        *table_header(
            "body MB",
            "N",
            "compr.",
            "ours all-reduce s",
            "raw all-reduce s",
            "ratio",
            "ours call->result s",
            "raw call->result s",
            "ratio",
            "failed trials ours/raw",
        ),
    ]
    for row in results["fusion"]:
        lines.append(
            table_row(
                f"{row['body_bytes'] / 1e6:.1f}",
                row["peers"],
                row["compression"],
                fmt(row["ours_allreduce_seconds"]),
                fmt(row["raw_allreduce_seconds"]),
                fmt(row["ratio_allreduce"]),
                fmt(row["ours_call_to_result_seconds"]),
                fmt(row["raw_call_to_result_seconds"]),
                fmt(row["ratio_call_to_result"]),
                f"{len(row['failures']['ours'])}/{len(row['failures']['raw'])}",
            )
        )
    return lines


def _bytes_table(results: dict) -> list[str]:
    """Bytes per peer per round on the wire and as payload, against the butterfly minimum; idle traffic."""
    lines = [
        *section(
            "Bytes per peer per round",
            "*Wire*: the loopback `tx_bytes` of a network namespace holding only this swarm (all its peers' "
            "processes), over the window from just before the round to every peer having its result, divided "
            "by N: TCP/IP headers, libp2p framing, matchmaking, DHT stores and ACKs included. *Payload*: the "
            "serialized tensor parts alone (what the README's earlier figure counted). Butterfly minimum: "
            "2(N-1)/N * S, S = the fp32 body. Idle: the swarm's background traffic with no round running.",
        ),
        *table_header(
            "N",
            "compr.",
            "butterfly MB",
            "ours wire MB",
            "ours wire / butterfly",
            "raw wire MB",
            "ours payload MB",
            "ours payload / butterfly",
            "idle KB/s per peer",
        ),
    ]
    for row in results["fusion"]:
        idle = row["idle_wire_bytes_per_second_per_peer"]
        lines.append(
            table_row(
                row["peers"],
                row["compression"],
                f"{row['butterfly_minimum'] / 1e6:.1f}",
                fmt(row["ours_wire_bytes_per_peer"], 1e6, 1),
                fmt(row["ours_wire_vs_butterfly"], digits=3),
                fmt(row["raw_wire_bytes_per_peer"], 1e6, 1),
                fmt(row["ours_payload_bytes_per_peer"], 1e6, 1),
                fmt(row["ours_payload_vs_butterfly"], digits=3),
                "-" if idle is None else f"{idle / 1e3:.1f}",
            )
        )
    return lines


def _training_table(results: dict) -> list[str]:
    """Samples/s of our trainer and the plain loop per model, with the hash that proves equal batches."""
    lines = [
        *section(
            "Training",
            "Both loops: the same model init, the same batches in the same order (sha256 of every batch's token "
            "ids and labels below, asserted equal), cut by the same `collate` inside the timer, a fresh AdamW "
            "per round with the same settings, the same warm-up round.",
        ),
        *table_header(
            "model", "steps x batch per trial", "ours samples/s", "plain loop samples/s", "ratio", "batches sha256"
        ),
    ]
    for row in results["training"]:
        lines.append(
            table_row(
                row["model"],
                f"{row['steps_per_trial']} x {row['batch_size']}",
                fmt(row["ours_samples_per_second"], digits=1),
                fmt(row["plain_samples_per_second"], digits=1),
                fmt(row["ratio"]),
                f"`{row['batches_sha256'][:16]}`",
            )
        )
    return lines


def _scaling_section(results: dict) -> list[str]:
    """The scaling swarms' table (one run each, no spread); nothing when they were skipped."""
    if not results.get("scaling"):
        return []
    lines = [
        *section("Scaling (real peer processes on loopback; one run each, means of rounds >= 2, no spread)"),
        *table_header("model", "peers", "round s", "fusion s", "fusion share", "peak RSS MB per peer", "all fused"),
    ]
    for row in results["scaling"]:
        lines.append(
            table_row(
                row["model"],
                row["peers"],
                f"{row['round_seconds']:.1f}",
                f"{row['fusion_seconds']:.1f}",
                f"{100 * row['fusion_share']:.0f}%",
                f"{row['peak_rss_mb']:.0f}",
                row["all_fused"],
            )
        )
    return lines


def _accuracy_line(results: dict) -> list[str]:
    """The fp16-against-fp32 accuracy sentence; nothing when that pair of swarms was skipped."""
    if not results.get("compression_accuracy"):
        return []
    accuracy = results["compression_accuracy"]
    return [
        "",
        f"Accuracy after fusion (mean of peers, same seeds, one run each): fp32 {100 * accuracy['fp32']:.1f}%, "
        f"fp16 {100 * accuracy['fp16']:.1f}% (difference {100 * accuracy['difference']:+.1f} points; "
        "goal within 0.5).",
    ]


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Round time and peak memory per peer against N, one line per model."""
    plt = pyplot()
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
    save_figure(figure, path)
