"""How long until a relay reserves a peer behind NAT a slot, on the network lab, and whether one ever
does when the relay's address is private.

    sudo python3 benchmarks/relay_reservation.py --out docs/measurements/relay

Each trial builds a fresh lab (``tests/netlab.py``): a bootstrap started with ``--relay`` and a
public peer on the lab's internet, a peer behind a NAT router with ``--use-relay on``. It times the
NATed peer from its start to its ``reachability: relayed`` line (a ``/p2p-circuit`` address through
the bootstrap), bounded by ``--timeout``, and checks that the two peers fuse meanwhile (the NATed
one as a client). ``--private-trials`` more trials put the lab's internet on 10.77.0.0/24, a range
libp2p counts as private. Writes ``relay.json`` and ``relay.md``; needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netlab
from common import DATA, cli, log, provenance, report_header, section, table_header, table_row, write_json
from nat_swarm import PEER_SETTINGS, Process, start_bootstrap

from coldfusion_p2p.config import as_flags
from coldfusion_p2p.contributor.checkpoints import read_history

PRIVATE_INTERNET = "10.77.0"  # what the lab used before: a relay there never reserved a slot


@dataclasses.dataclass(frozen=True)
class Settings:
    out: Path
    trials: int = 2
    private_trials: int = 1
    timeout: float = 300.0
    model: str = "tiny"


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/relay"))
    parser.add_argument("--trials", type=int, default=Settings.trials)
    parser.add_argument("--private-trials", type=int, default=Settings.private_trials)
    parser.add_argument("--timeout", type=float, default=Settings.timeout)
    arguments = parser.parse_args(argv)
    return Settings(arguments.out, arguments.trials, arguments.private_trials, arguments.timeout)


def relayed_line(peer: Process) -> str | None:
    return next((line for line in peer.log().splitlines() if line.startswith("reachability: relayed (")), None)


def trial(settings: Settings, model: str, internet: str, workdir: Path) -> dict:
    """One fresh lab; seconds until the NATed peer is relayed (None: not within the timeout)."""
    netlab.INTERNET = internet
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[Process] = []
    seconds = None
    with netlab.NetLab(homes=("home1",)) as lab:
        try:
            initial_peers = start_bootstrap(lab, workdir, "relay-bench", processes, relay=True)
            for index, name in enumerate(("public", "home1")):
                flags = {
                    **PEER_SETTINGS,
                    "min_group_size": 2,
                    "dataset": str(DATA / ("trec_question_type", "sms_spam")[index] / "train.csv"),
                    "model": model,
                    "run_id": "relay-bench",
                    "initial_peers": initial_peers,
                    "host_maddrs": [f"/ip4/{lab.hosts[name].address}/tcp/0"],
                    "output_dir": str(workdir / name),
                    "use_relay": "on",
                }
                processes.append(Process(name, lab.hosts[name].command(cli("join", *as_flags(flags))), workdir))
            started, home = time.monotonic(), processes[-1]
            while time.monotonic() - started < settings.timeout and home.process.poll() is None:
                if relayed_line(home) is not None:
                    seconds = time.monotonic() - started
                    break
                time.sleep(1.0)
        finally:
            for process in reversed(processes):
                process.kill()
    history = read_history(workdir / "home1")
    return {
        "internet": f"{internet}.0/24",
        "seconds_to_relayed": seconds,
        "relayed_line": relayed_line(processes[-1]) if len(processes) == 3 else None,
        "mode_line": next((line for line in processes[-1].log().splitlines() if line.startswith("reachability:")), ""),
        "rounds_fused": sum(1 for row in history if row["outcome"] == "fused"),
        "rounds": len(history),
    }


def report(results: dict) -> str:
    lines = report_header("Relay reservations for a peer behind NAT, on the network lab", results)
    lines += section(
        "What ran",
        "Per trial a fresh lab: a bootstrap with `--relay` and a public peer on the lab's internet, a peer "
        "behind a NAT router with `--use-relay on` (tiny model, rounds of 1 local step). Seconds from the "
        f"NATed peer's start to its `reachability: relayed` line, at most {results['timeout']:.0f} s.",
    )
    lines += table_header("lab internet", "trial", "relayed after s", "rounds fused (NATed peer)")
    for index, row in enumerate(results["trials"]):
        seconds = "never" if row["seconds_to_relayed"] is None else f"{row['seconds_to_relayed']:.0f}"
        lines.append(table_row(row["internet"], index + 1, seconds, f"{row['rounds_fused']} of {row['rounds']}"))
    shown = [row["relayed_line"] for row in results["trials"] if row["relayed_line"]]
    lines += section("A relayed line", f"`{shown[0]}`" if shown else "None came.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    settings = parse(argv)
    from common import benchmark_model

    started = time.monotonic()
    workdir = Path("/tmp") / f"relay-bench-{int(time.time())}"
    model, _ = benchmark_model(settings.model, workdir)
    plan = [netlab.INTERNET] * settings.trials + [PRIVATE_INTERNET] * settings.private_trials
    trials = []
    for index, internet in enumerate(plan):
        log(f"trial {index + 1}/{len(plan)}: lab internet {internet}.0/24")
        trials.append(trial(settings, model, internet, workdir / f"trial{index}"))
        log(f"  relayed after {trials[-1]['seconds_to_relayed']} s; {trials[-1]['rounds_fused']} rounds fused")
    results = {
        **provenance("sudo python3 benchmarks/relay_reservation.py"),
        "wall_seconds": time.monotonic() - started,
        "timeout": settings.timeout,
        "trials": trials,
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json(settings.out / "relay.json", results)
    (settings.out / "relay.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
