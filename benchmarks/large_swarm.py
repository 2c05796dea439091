"""One group against bounded groups for swarms of 16 to 1,000 peers, in the pure simulator.

    python3 benchmarks/large_swarm.py --out docs/measurements/large-swarm

Writes ``large_swarm.json`` (every number), ``large_swarm.md`` (the table) and ``large_swarm.png``
(distance to the global mean after each stage). No network and no training: see
:mod:`coldfusion_p2p.apps.large_swarm` for what is modelled and what is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    provenance,
    pyplot,
    report_header,
    save_figure,
    section,
    table_header,
    table_row,
    write_json,
)
from rich.progress import Progress

from coldfusion_p2p.apps.large_swarm import Scenario, ScenarioSummary, summarize


@dataclasses.dataclass(frozen=True)
class Settings:
    out: Path
    peers: tuple[int, ...] = (16, 64, 256, 1000)
    failure_probabilities: tuple[float, ...] = (0.01, 0.05)
    group_size: int = 8
    trials: int = 200
    seed: int = 0


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/large-swarm"))
    parser.add_argument("--peers", type=int, nargs="+", default=list(Settings.peers))
    parser.add_argument("--failure-probabilities", type=float, nargs="+", default=list(Settings.failure_probabilities))
    parser.add_argument("--group-size", type=int, default=Settings.group_size)
    parser.add_argument("--trials", type=int, default=Settings.trials)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    arguments = parser.parse_args(argv)
    return Settings(
        out=arguments.out,
        peers=tuple(arguments.peers),
        failure_probabilities=tuple(arguments.failure_probabilities),
        group_size=arguments.group_size,
        trials=arguments.trials,
        seed=arguments.seed,
    )


def scenarios(settings: Settings) -> list[Scenario]:
    return [
        Scenario(peers=peers, group_size=group_size, failure_probability=probability)
        for probability in settings.failure_probabilities
        for peers in settings.peers
        for group_size in (None, settings.group_size)
    ]


def as_record(summary: ScenarioSummary) -> dict:
    scenario = summary.scenario
    return {
        "peers": scenario.peers,
        "group_size": scenario.group_size,
        "stages": scenario.stages,
        "failure_probability": scenario.failure_probability,
        **{key: value for key, value in dataclasses.asdict(summary).items() if key != "scenario"},
    }


def report(results: dict) -> str:
    link = results["link"]
    lines = report_header("One group against bounded groups, simulated", results)
    lines += section(
        "What is modelled",
        f"Each peer fails a round with probability p, at a stage drawn uniformly, and sits out the rest of it; "
        f"a group with a failing member keeps its stage input (all or nothing). Payload "
        f"{results['payload_mb']} MB (all-MiniLM-L6-v2's body, fp32); every link {link['bandwidth_mbit']} Mbit/s, "
        f"{link['latency_ms']} ms; a broken group waits {link['failure_timeout_seconds']} s before it rolls back. "
        f"{results['trials']} rounds per row. Groups come from `coldfusion_p2p.swarm.grid`.",
        "Columns: *fused*, the probability that a peer's round averaged anything beyond its own body; *exact*, that "
        "it ends holding the global mean; *reached*, the mean fraction of all contributions in what a peer holds; "
        "*distance*, |held - global mean| over the RMS spread of the bodies (1 = no averaging at all).",
    )
    lines += table_header(
        "p", "peers", "groups", "stages", "fused", "exact", "reached", "distance", "round s", "MB sent/peer"
    )
    for row in results["rows"]:
        lines.append(
            table_row(
                row["failure_probability"],
                row["peers"],
                "one" if row["group_size"] is None else f"K={row['group_size']}",
                row["stages"],
                f"{row['fused']:.3f}",
                f"{row['exact']:.3f}",
                f"{row['reached']:.3f}",
                f"{row['distance']:.4f}",
                f"{row['seconds']:.0f}",
                f"{row['megabytes_per_peer']:.0f}",
            )
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    probabilities = sorted({row["failure_probability"] for row in results["rows"]})
    figure, axes = plt.subplots(1, len(probabilities), figsize=(5 * len(probabilities), 4), squeeze=False)
    for axis, probability in zip(axes[0], probabilities, strict=True):
        for row in results["rows"]:
            if row["failure_probability"] != probability or row["group_size"] is None:
                continue
            stages = range(1, len(row["distance_by_stage"]) + 1)
            axis.plot(stages, row["distance_by_stage"], marker="o", label=f"N={row['peers']}, K={row['group_size']}")
        for row in results["rows"]:
            if row["failure_probability"] == probability and row["group_size"] is None:
                axis.axhline(row["distance"], linestyle=":", linewidth=1, color="grey")
        axis.set_title(f"p = {probability} (dotted: one group, each N)")
        axis.set_xlabel("stage")
        axis.set_ylabel("distance to the global mean")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    started = time.perf_counter()
    results = provenance("python3 benchmarks/large_swarm.py")
    rows = []
    todo = scenarios(settings)
    with Progress() as progress:
        task = progress.add_task("simulating", total=len(todo))
        for scenario in todo:
            rows.append(as_record(summarize(scenario, settings.trials, seed=settings.seed)))
            progress.advance(task)
    first = todo[0]
    results.update(
        rows=rows,
        trials=settings.trials,
        payload_mb=first.payload_mb,
        link=dataclasses.asdict(first.link),
        wall_seconds=time.perf_counter() - started,
    )
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json(settings.out / "large_swarm.json", results)
    (settings.out / "large_swarm.md").write_text(report(results))
    plot(results, settings.out / "large_swarm.png")
    print(f"wrote {settings.out}/large_swarm.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
