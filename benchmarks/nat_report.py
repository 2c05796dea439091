"""``benchmarks/nat_fusion.py``'s report: ``nat_fusion.json`` (every number), ``nat_fusion.md``, ``nat_fusion.png``.

A deterministic function of the results dict: ``write_report(json.load(...), folder)`` regenerates
a committed report exactly.
"""

from __future__ import annotations

from pathlib import Path

from common import bullet_section, fmt, pyplot, report_header, save_figure, section, table_header, table_row, write_json
from nat_swarm import GROUP_SIZE, PEER_SETTINGS, PEERS


def write_report(results: dict, out: Path) -> None:
    """The JSON first (it survives a report that fails to render), then the markdown and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "nat_fusion.json", results)
    failures = [failure for row in results["summary"] for failure in row["failures"]]
    logged = [
        f"{run['label']} {name}: `{line}`"
        for run in results["runs"]
        for name, found in run.get("errors_in_logs", {}).items()
        for line in dict.fromkeys(found)
    ]
    lines = [
        *_overview(results),
        *_summary_table(results),
        *_per_peer_table(results),
        *_runs_table(results),
        *bullet_section("Failures", failures, "None: every round of every run fused in a group of 3."),
        *bullet_section("Exceptions in the peers' logs", logged, "None."),
        *bullet_section("Notes", results.get("notes") or []),
    ]
    (out / "nat_fusion.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "nat_fusion.png")


def _overview(results: dict) -> list[str]:
    """The header, the lab and its settings, and the bounds a round is measured against (and why)."""
    settings, sizes = results["settings"], results["sizes"]
    b = sizes["bounds"]
    return [
        *report_header("Fusion through home NAT on slow links", results),
        f"A fresh network lab per run: a bootstrap and a public peer on the lab's internet, two peers behind NAT "
        f"(home1, home2) on links shaped to {settings['rate_mbit']:g} Mbit/s each way; the homes fuse in hivemind "
        f"client mode (checked in every log), the public peer reduces. {settings['model_label']}, "
        f"{settings['rounds']} rounds of {PEER_SETTINGS['local_steps']} local step, no head re-fit, "
        f"min_group_size {GROUP_SIZE}, matchmaking_time {PEER_SETTINGS['matchmaking_time']:g} s. Each compression "
        f"ran {settings['repeats']} times, order alternating ({'; '.join(results['order'])}). "
        "Values: **median (min-max)** over repeats x rounds.",
        "",
        f"Body: {sizes['body_parameters'] / 1e6:.2f} M parameters, S = {sizes['body_bytes'] / 1e6:.2f} MB in fp32. "
        f"Butterfly bound 2(N-1)/N * S / rate, N = {GROUP_SIZE}: **{b['butterfly_fp32_seconds']:.1f} s** with S in "
        "fp32; per compression also with S = that compression's exact payload (the body split into hivemind's parts, "
        "each compressed and serialized). In client mode each home link must carry its whole payload S up and the "
        "whole average S down; full duplex that is S / rate, but hivemind sends a client its results only once the "
        "client has sent everything (`AllReduceRunner.should_delay_results`: clients get nothing back until they "
        "finish sending), so up and down follow one another: **2 S / rate** is the floor of this protocol, 1.5x the "
        "butterfly bound for N = 3; at TCP's goodput through the shaper (1448/1514 of the rate) a little more.",
        "",
    ]


def _goal(ratio: dict | None) -> str:
    """Whether a compression's rounds met the goal of at most 1.3x its payload's butterfly bound."""
    if ratio is None:
        return "-"
    return "met" if ratio["max"] <= 1.3 else "median met" if ratio["median"] <= 1.3 else "**not met**"


def _summary_table(results: dict) -> list[str]:
    """Per compression: payload, bounds, the round's time and its ratios to the bounds, rounds fused."""
    b = results["sizes"]["bounds"]
    lines = table_header(
        "compression",
        "payload MB",
        "butterfly bound s (payload)",
        "hivemind client floor 2S/rate s (at TCP goodput)",
        "round s (slowest peer)",
        "round / fp32 butterfly bound",
        "round / payload butterfly bound",
        "goal <= 1.3x payload bound",
        "round / client floor (TCP)",
        "rounds fused in 3",
    )
    for row in results["summary"]:
        c = row["compression"]
        lines.append(
            table_row(
                c,
                f"{row['payload_bytes'] / 1e6:.2f}",
                f"{b['butterfly_payload_seconds'][c]:.1f}",
                f"{b['hivemind_client_floor_seconds'][c]:.1f} ({b['hivemind_client_floor_tcp_seconds'][c]:.1f})",
                fmt(row["round_seconds"], digits=1),
                fmt(row["round_over_butterfly_fp32"], suffix="x"),
                fmt(row["round_over_butterfly_payload"], suffix="x"),
                _goal(row["round_over_butterfly_payload"]),
                fmt(row["round_over_hivemind_client_floor_tcp"], suffix="x"),
                f"{row['rounds_fused']}/{row['rounds_run']}",
            )
        )
    return lines


def _per_peer_table(results: dict) -> list[str]:
    """Per compression: each peer's fusion seconds and bytes sent, each home link's bytes up and down."""
    lines = [
        *section(
            "Per peer: fusion seconds and bytes sent",
            "`fusion_seconds` and `bytes_sent` from each peer's round reports (fusion_seconds: entering fusion to "
            "the fused result, matchmaking and the verdict exchange included; bytes_sent: the serialized parts it "
            "sent). Link MB: bytes through each home router's shaper over a whole run (all rounds, start-up, DHT), "
            "up and down.",
        ),
        *table_header(
            "compression",
            *[f"{name} fusion s" for name in PEERS],
            *[f"{name} sent MB" for name in PEERS],
            "home1 link up / down MB",
            "home2 link up / down MB",
        ),
    ]
    for row in results["summary"]:
        links = row["link_bytes_per_run"]
        lines.append(
            table_row(
                row["compression"],
                *[fmt(row["fusion_seconds"][name], digits=1) for name in PEERS],
                *[fmt(row["bytes_sent"][name], 1e6, 1) for name in PEERS],
                *[
                    f"{fmt(links[f'{home}_upload'], 1e6, 0)} / {fmt(links[f'{home}_download'], 1e6, 0)}"
                    for home in PEERS[1:]
                ],
            )
        )
    return lines


def _runs_table(results: dict) -> list[str]:
    """Every run: its compression, wall time, each round's fusion seconds per peer, whether it was ok."""
    lines = [
        *section("Runs"),
        *table_header("run", "compression", "wall s", "per-round seconds (public, home1, home2)", "ok"),
    ]
    for run in results["runs"]:
        per_round = "; ".join(
            f"r{r}: "
            + ", ".join(
                next((f"{row['fusion_seconds']:.1f}" for row in run["rounds"].get(name, []) if row["round"] == r), "-")
                for name in PEERS
            )
            for r in range(1, results["settings"]["rounds"] + 1)
        )
        lines.append(table_row(run["label"], run["compression"], f"{run['wall_seconds']:.0f}", per_round, run["ok"]))
    return lines


def plot(results: dict, path: Path) -> None:
    """Bars of each compression's round time with its spread, its bounds and the goal as lines."""
    plt = pyplot()
    bounds_ = results["sizes"]["bounds"]
    rows = results["summary"]
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    for index, row in enumerate(rows):
        _draw_round_bar(axis, index, row["round_seconds"])
        _draw_bounds(axis, index, bounds_, row["compression"])
    axis.axhline(
        bounds_["butterfly_fp32_seconds"], color="grey", linestyle="-.", linewidth=1, label="butterfly bound, fp32 S"
    )
    axis.set_xticks(list(positions), [row["compression"] for row in rows])
    axis.set_ylabel("round fusion seconds (slowest peer)")
    axis.set_title(
        f"Fusion through NAT at {results['settings']['rate_mbit']:g} Mbit/s, N = {GROUP_SIZE}: median, min-max"
    )
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def _draw_round_bar(axis, index: int, value: dict | None) -> None:
    """One compression's median round time, min-max as an error bar."""
    if value is None:
        return
    axis.bar(index, value["median"], width=0.6, color="#4c72b0", alpha=0.85)
    axis.errorbar(
        index,
        value["median"],
        yerr=[[value["median"] - value["min"]], [value["max"] - value["median"]]],
        color="black",
        capsize=6,
    )


def _draw_bounds(axis, index: int, bounds_: dict, c: str) -> None:
    """Compression ``c``'s butterfly bound and hivemind's client floor across its bar, with the goal line."""
    for key, style, label in (
        ("butterfly_payload_seconds", "-", "butterfly bound (payload)"),
        ("hivemind_client_floor_seconds", ":", "hivemind client-mode floor 2S/rate (payload)"),
    ):
        axis.hlines(
            bounds_[key][c],
            index - 0.4,
            index + 0.4,
            colors="#c44e52",
            linestyles=style,
            label=label if index == 0 else None,
        )
        axis.hlines(
            1.3 * bounds_["butterfly_payload_seconds"][c],
            index - 0.4,
            index + 0.4,
            colors="#dd8452",
            linestyles="--",
            label="1.3 x butterfly bound (goal)" if index == 0 and key.startswith("b") else None,
        )
