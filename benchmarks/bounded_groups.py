"""Real loopback swarms of N = 4, 8, 16 peers: one group against bounded groups (``--target-group-size``).

    python3 benchmarks/bounded_groups.py --out docs/measurements/bounded-groups

For each N and each arm (one group; groups of K over the fewest stages that hold N), ``--trials``
swarms of tiny-model peers (separate processes, one torch thread each) run ``--rounds`` rounds of
one local step; the arms alternate which goes first. From the peers' round reports (rounds 2 on:
round 1 includes the start-up skew) it takes each round's fusion time (the slowest peer's, from
entering fusion to holding the result) and the bytes each peer sent. It also samples the memory of
every peer's process tree (main process, forked DHT and averager processes, p2pd) every 2 s: the
proportional set size (PSS: shared pages split among their sharers, so the trees add up to what
the machine holds) and the main process's RSS.

Writes ``bounded_groups.json`` (every number), ``bounded_groups.md`` (the table) and
``bounded_groups.png``. Exits 1 (after writing) if a round of some swarm did not fuse all N.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import (
    benchmark_model,
    bullet_section,
    fmt,
    log,
    order_of,
    provenance,
    pyplot,
    report_header,
    save_figure,
    section,
    spread,
    table_header,
    table_row,
    write_json,
)
from loopback_swarm import run_swarm

from coldfusion_p2p.swarm.grid import stages_needed

MACHINE_GIB = 24  # this project's machines: how many peers of this kind fit in their memory
HEADROOM = 0.9  # the share of it peers may take (the OS, page cache and the test process need the rest)


@dataclasses.dataclass(frozen=True)
class Settings:
    out: Path
    peers: tuple[int, ...] = (4, 8, 16)
    group_size: int = 4
    trials: int = 2
    rounds: int = 3
    model: str | None = "tiny"
    work_dir: Path | None = None
    rebuild: bool = False


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bounded-groups"))
    parser.add_argument("--peers", type=int, nargs="+", default=list(Settings.peers))
    parser.add_argument("--group-size", type=int, default=Settings.group_size)
    parser.add_argument("--trials", type=int, default=Settings.trials)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--model", default=Settings.model, help="'tiny' (default), a model folder, or 'minilm'")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the swarms write (default: a temp dir)")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="only rewrite the report from --out's bounded_groups.json and the swarms' histories in --work-dir",
    )
    arguments = parser.parse_args(argv)
    if arguments.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes the start-up skew and is not measured)")
    return Settings(
        out=arguments.out,
        peers=tuple(arguments.peers),
        group_size=arguments.group_size,
        trials=arguments.trials,
        rounds=arguments.rounds,
        model=None if arguments.model == "minilm" else arguments.model,
        work_dir=arguments.work_dir,
        rebuild=arguments.rebuild,
    )


# ----------------------------------------------------------------------------- memory of process trees
def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _kilobytes(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int, children: dict[int, list[int]]) -> float:
    """The PSS of ``root`` and all its descendants, in MB."""
    pending, total = [root], 0
    while pending:
        pid = pending.pop()
        total += _kilobytes(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
        pending.extend(children.get(pid, ()))
    return total / 1024


class PeakMemory:
    """Per peer (by main pid), the peak PSS of its process tree, the peak sum over all peers, and each
    main process's peak RSS."""

    def __init__(self):
        self.tree_mb: dict[int, float] = {}
        self.main_rss_mb: dict[int, float] = {}
        self.swarm_mb = 0.0

    def __call__(self, processes) -> None:
        children = _children_by_parent()
        total = 0.0
        for process in processes:
            pss = tree_pss_mb(process.pid, children)
            rss = _kilobytes(Path(f"/proc/{process.pid}/status"), "VmRSS:") / 1024
            self.tree_mb[process.pid] = max(self.tree_mb.get(process.pid, 0.0), pss)
            self.main_rss_mb[process.pid] = max(self.main_rss_mb.get(process.pid, 0.0), rss)
            total += pss
        self.swarm_mb = max(self.swarm_mb, total)


def peer_errors(workdir: Path, peers: int) -> list[str]:
    """The one-line errors peers exited with (e.g. a start that found its initial peers too busy)."""
    errors = []
    for peer in range(peers):
        log_path = workdir / f"peer{peer}.log"
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        errors += [f"peer{peer}: {line[:200]}" for line in lines if line.startswith("error:")]
    return errors


# ----------------------------------------------------------------------------- one swarm
def run_arm(settings: Settings, model: str, peers: int, bounded: bool, workdir: Path) -> dict:
    """One swarm of ``peers`` peers; its per-round fusion times and bytes, failures and memory."""
    memory = PeakMemory()
    options = dict(
        rounds=settings.rounds,
        local_steps=1,
        refit_steps=0,
        fusion_window=300.0,  # closed early once all are ready: only the start-up skew waits
        allreduce_timeout=60.0,
        record_period=2.0,
        matchmaking_time=5.0,  # the defaults users run: one group of 16 never assembled in 2 s on 2 cores
        request_timeout=3.0,
    )
    if bounded:
        options["target_group_size"] = settings.group_size
    started = time.monotonic()
    rows = run_swarm(model, peers, workdir, sampler=memory, **options)
    measured = [row for row in rows if row["round"] >= 2]
    by_round: dict[int, list[dict]] = {}
    for row in measured:
        by_round.setdefault(row["round"], []).append(row)
    failures = [
        f"round {row['round']}: {row['outcome']} in a group of {row['group_size']} ({row.get('reason', '')[:120]})"
        for row in rows
        if row["outcome"] != "fused" or row["group_size"] != peers
    ]
    return {
        "workdir": str(workdir),
        "peers": peers,
        "arm": "bounded" if bounded else "one group",
        "group_size": settings.group_size if bounded else peers,
        "stages": stages_needed(peers, settings.group_size) if bounded else 1,
        "wall_seconds": time.monotonic() - started,
        "round_fusion_seconds": [max(row["fusion_seconds"] for row in group) for group in by_round.values()],
        "group_sizes": [row["group_size"] for row in measured],  # contributions each peer's round reached
        "bytes_per_peer": [row["bytes_sent"] for row in measured],
        "failures": failures,
        "errors": peer_errors(workdir, peers),
        "tree_pss_mb": sorted(memory.tree_mb.values()),
        "main_rss_mb": sorted(memory.main_rss_mb.values()),
        "swarm_pss_mb": memory.swarm_mb,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (N, arm): every trial's rounds pooled."""
    rows = []
    for key in sorted({(run["peers"], run["arm"]) for run in runs}, key=lambda k: (k[0], k[1] != "one group")):
        arm_runs = [run for run in runs if (run["peers"], run["arm"]) == key]
        per_peer = [value for run in arm_runs for value in run["tree_pss_mb"]]
        rows.append(
            {
                "peers": key[0],
                "arm": key[1],
                "group_size": arm_runs[0]["group_size"],
                "stages": arm_runs[0]["stages"],
                "trials": len(arm_runs),
                "short_rounds": sum(size != key[0] for run in arm_runs for size in run["group_sizes"]),
                "reached": statistics.mean(size / key[0] for run in arm_runs for size in run["group_sizes"]),
                "fusion_seconds": spread(value for run in arm_runs for value in run["round_fusion_seconds"]),
                "bytes_per_peer": spread(value for run in arm_runs for value in run["bytes_per_peer"]),
                "tree_pss_mb": spread(per_peer),
                "main_rss_mb": spread(value for run in arm_runs for value in run["main_rss_mb"]),
                "swarm_pss_mb": max(run["swarm_pss_mb"] for run in arm_runs),
                "peers_in_machine": int(MACHINE_GIB * 1024 * HEADROOM // max(per_peer)) if per_peer else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------- report
def report(results: dict) -> str:
    lines = report_header("One group against bounded groups: real loopback swarms", results)
    lines += section(
        "What ran",
        f"Peers of {results['model_label']}, one process each (one torch thread), on 127.0.0.1; {results['rounds']} "
        f"rounds of 1 local step; bounded groups of K = {results['group_size']} over the fewest stages that hold N "
        f"(N = 4 is one stage, the same group as one group); the default timeouts (matchmaking 5 s, requests 3 s), "
        f"min_group_size N. {results['trials']} swarms per row, the arms' order "
        "alternating. Fusion time: each round's slowest peer, rounds 2 on (median (min-max) over every trial's "
        "rounds). Bytes: what each peer sent in a round's all-reduces. Memory: the peak PSS of each peer's "
        "process tree (main, DHT and averager processes, p2pd), and of all peers together.",
    )
    lines += table_header(
        "N",
        "groups",
        "stages",
        "peer-rounds short of N (rounds 2 on)",
        "reached",
        "fusion s per round",
        "kB sent per peer per round",
        "PSS per peer tree, MB",
        "main RSS, MB",
        "all peers, GB",
        f"peers in {MACHINE_GIB} GiB",
    )
    for row in results["rows"]:
        lines.append(
            table_row(
                row["peers"],
                "one" if row["arm"] == "one group" else f"K={row['group_size']}",
                row["stages"],
                row["short_rounds"],
                f"{row['reached']:.2f}",
                fmt(row["fusion_seconds"], digits=1),
                fmt(row["bytes_per_peer"], scale=1000, digits=0),
                fmt(row["tree_pss_mb"], digits=0),
                fmt(row["main_rss_mb"], digits=0),
                f"{row['swarm_pss_mb'] / 1024:.1f}",
                row["peers_in_machine"],
            )
        )
    short = []
    for index, run in enumerate(results["runs"]):
        sizes = [size for size in run["group_sizes"] if size != run["peers"]]
        if sizes or run["errors"]:
            short.append(
                f"N={run['peers']} {run['arm']} (run {index + 1}): {len(sizes)} peer-rounds short of N, in "
                f"groups of {', '.join(map(str, sorted(set(sizes)))) or '-'}"
                + "".join(f"; {error[:110]}..." for error in run["errors"])
            )
    lines += bullet_section("Swarms with rounds that did not fuse all N", short, empty="None.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, marker in (("one group", "o"), ("bounded", "s")):
        rows = [row for row in results["rows"] if row["arm"] == arm and row["fusion_seconds"]]
        peers = [row["peers"] for row in rows]
        label = arm if arm == "one group" else f"K={results['group_size']}"
        for axis, key, scale in ((axes[0], "fusion_seconds", 1.0), (axes[1], "bytes_per_peer", 1000.0)):
            medians = [row[key]["median"] / scale for row in rows]
            low = [(row[key]["median"] - row[key]["min"]) / scale for row in rows]
            high = [(row[key]["max"] - row[key]["median"]) / scale for row in rows]
            axis.errorbar(peers, medians, yerr=[low, high], marker=marker, capsize=3, label=label)
    axes[0].set_ylabel("fusion seconds per round (slowest peer)")
    axes[1].set_ylabel("kB sent per peer per round")
    for axis in axes:
        axis.set_xlabel("peers N")
        axis.set_xticks(list(results["peers"]))
        axis.legend()
    save_figure(figure, path)


def rebuild(settings: Settings) -> dict:
    """The results of an earlier run, with what its swarms' histories say and the JSON lacks (older runs)."""
    import json

    from coldfusion_p2p.contributor.checkpoints import read_history

    results = json.loads((settings.out / "bounded_groups.json").read_text())
    for run in results["runs"]:
        trial = sum(
            1
            for other in results["runs"][: results["runs"].index(run)]
            if other["arm"] == run["arm"] and other["peers"] == run["peers"]
        )
        workdir = Path(run.get("workdir") or settings.work_dir / f"n{run['peers']}-{run['arm'].split()[0]}-{trial}")
        rows = [row for peer in range(run["peers"]) for row in read_history(workdir / f"peer{peer}")]
        run["workdir"] = str(workdir)
        run["group_sizes"] = [row["group_size"] for row in rows if row["round"] >= 2]
        run["errors"] = peer_errors(workdir, run["peers"])
    results["rows"] = summarize(results["runs"])
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bounded_groups.json", results)
    (out / "bounded_groups.md").write_text(report(results))
    plot(results, out / "bounded_groups.png")
    print(report(results))


def main(argv: list[str] | None = None) -> None:
    settings = parse(argv)
    if settings.rebuild:
        write(rebuild(settings), settings.out)
        return
    started = time.monotonic()
    work_dir = settings.work_dir or Path(tempfile.mkdtemp(prefix="bounded-groups-"))
    model, model_label = benchmark_model(settings.model, work_dir)
    if settings.model == "tiny":  # the tests' tiny BERT: start-up, memory and protocol cost, not bandwidth
        model_label = "the tests' tiny BERT (2 layers, hidden 32: a body of 86 kB)"
    runs = []
    for peers in settings.peers:
        for trial in range(settings.trials):
            for arm in order_of(trial, "one", "bounded"):
                log(f"N={peers}, {arm}, trial {trial + 1}/{settings.trials}")
                run = run_arm(settings, model, peers, arm == "bounded", work_dir / f"n{peers}-{arm}-{trial}")
                fusion = statistics.median(run["round_fusion_seconds"] or [0])
                log(f"  {fusion:.1f} s fusion per round, {run['failures'] or 'every round fused all'}")
                runs.append(run)
    results = {
        **provenance("python3 benchmarks/bounded_groups.py"),
        "wall_seconds": time.monotonic() - started,
        "model_label": model_label,
        "peers": list(settings.peers),
        "group_size": settings.group_size,
        "trials": settings.trials,
        "rounds": settings.rounds,
        "rows": summarize(runs),
        "runs": runs,
    }
    write(results, settings.out)
    if any(run["failures"] for run in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
