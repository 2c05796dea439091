"""Fusion time through home NAT on slow links, against the bandwidth lower bound at that rate.

    sudo python3 benchmarks/nat_fusion.py                      # none/fp16/int8, 2 repeats, 20 Mbit/s
    sudo python3 benchmarks/nat_fusion.py --repeats 3 --compressions none int8 --rate-mbit 10

Why: on loopback (``benchmarks/run.py``) the all-reduce is CPU-bound and every peer reaches every
other. Volunteers sit behind home routers on links of tens of Mbit/s: there the bytes decide, and
peers behind NAT fuse in hivemind's client mode (they send all their parts to the public peer, which
reduces everything and sends the average back). This measures what a round's fusion costs there.

Each *run* is a fresh network lab (``tests/netlab.py``): a bootstrap and a public peer on the
"internet" bridge, two peers behind masquerading home routers whose links are shaped to
``--rate-mbit`` both ways; real ``coldfusion-peer join`` processes on the bundled all-MiniLM-L6-v2,
one local step per round (we time fusion, not training), no head re-fit, ``min_group_size=3``,
generous timeouts. Every compression runs ``--repeats`` times, the order alternating between
repeats (none,fp16,int8 then int8,fp16,none) so no compression always gets the warmer machine.

Figures, per compression, pooled over repeats and rounds (median and min-max):

- ``fusion_seconds`` of each peer from its round report (entering fusion to the fused result:
  matchmaking, all-reduce, verdict exchange), and the round's time (the slowest peer's);
- the butterfly lower bound ``2(N-1)/N * S / rate`` (N = 3) with S the body in fp32, and the same
  bound with S the exact payload of that compression (the body split and compressed part by part as
  hivemind's all-reduce does it); the topology's own bound ``S / rate`` (client mode: each home
  link carries its whole payload up and the whole average down, full duplex) is reported beside;
- ``bytes_sent`` per peer from the reports, and each home link's bytes up and down over the whole
  run, read from the tbf counters of its router (TCP/IP, libp2p, DHT and matchmaking included).

A round that did not fuse in a group of 3 is a failure: it is listed, left out of the medians,
and makes the benchmark exit with status 1 after writing the results. Needs root (network
namespaces, tc, iptables); exits with a one-line error when the lab is unavailable.

Writes ``docs/measurements/nat/nat_fusion.json`` (every number, the settings, the command, machine,
date), ``nat_fusion.md`` (the table) and ``nat_fusion.png`` (bars with spread, the bounds as lines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the network lab (and the tiny model builder for --model tiny)

from netlab import NetLab, lab_unavailable_reason  # noqa: E402
from run import DATA, fmt, spread  # noqa: E402  (also sets HF_HUB_OFFLINE)

PEERS = ("public", "home1", "home2")  # host names of the lab; the first is on the public side
DATASETS = {"public": "trec_question_type", "home1": "tweet_sentiment", "home2": "sms_spam"}
GROUP_SIZE = len(PEERS)
TCP_GOODPUT = 1448 / 1514  # payload share of a full TCP frame: what tbf lets through as data (netlab)
BOOTSTRAP_TIMEOUT = 90.0  # seconds for the bootstrap to write its peers file
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")  # the last line of a logged traceback
RUN_TIMEOUT = 900.0  # seconds for one run's peers to finish all their rounds
PEER_SETTINGS = {  # every peer, every run; the run adds dataset, model, addresses and compression
    "local_steps": 1,  # we time fusion, not training
    "batch_size": 16,
    "max_eval_examples": 64,
    "refit_steps": 0,  # the head re-fit is not part of fusion
    "min_group_size": GROUP_SIZE,
    "matchmaking_time": 5.0,  # the defaults: what users run
    "request_timeout": 3.0,
    "fusion_window": 180.0,  # closed early once all 3 are ready: only a slow start waits
    "allreduce_timeout": 300.0,
    "next_chunk_timeout": 60.0,
    "state_download_timeout": 300.0,
    "torch_threads": 1,
    "keep_checkpoints": 1,
    "quiet": False,  # the log keeps the reachability line, checked below
    "seed": 0,
}


def peer_environment() -> dict[str, str]:
    """The peers' environment: one thread each (two cores shared by three peers), nothing downloaded."""
    environment = dict(os.environ)
    environment.pop("HIVEMIND_MEMORY_SHARING_STRATEGY", None)
    environment.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return environment


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "coldfusion_p2p.cli", *arguments]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- sizes
def body_shapes(model: str) -> list[tuple[int, ...]]:
    """Shapes of the body tensors the peers fuse (the classifier without its head)."""
    from coldfusion_p2p.contributor.model import body_parameters, load_classifier

    classifier = load_classifier(model, ["a", "b"], seed=0)
    return [tuple(parameter.shape) for parameter in body_parameters(classifier)]


def payload_bytes(shapes: list[tuple[int, ...]], compression: str) -> int:
    """Bytes of one whole body as hivemind's all-reduce serializes it with ``compression``.

    The body is split into parts of ``DEFAULT_PART_SIZE_BYTES`` after compression, each part
    compressed on its own (an int8 part carries its own 256-entry codebook), exactly as
    ``TensorPartContainer`` does; summed ``ByteSize()`` of the serialized parts (the values do not
    change the sizes of these codecs)."""
    import torch
    from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
    from hivemind.compression import CompressionInfo

    from coldfusion_p2p.swarm.hivemind_adapter import COMPRESSIONS

    codec = COMPRESSIONS[compression]()
    generator = torch.Generator().manual_seed(0)
    total = 0
    for key, shape in enumerate(shapes):
        tensor = torch.randn(shape, generator=generator) * 0.05
        info = CompressionInfo.from_tensor(tensor, key=key)
        part_values = int(DEFAULT_PART_SIZE_BYTES / (tensor.element_size() * codec.estimate_compression_ratio(info)))
        for index, part in enumerate(tensor.view(-1).split(part_values)):
            total += codec.compress(part, info.get_part(index, part_values)).ByteSize()
    return total


def bounds(body_bytes: int, payloads: dict[str, int], rate_mbit: float) -> dict:
    """Seconds that no fusion at ``rate_mbit`` can beat, per compression."""
    rate = rate_mbit * 1e6 / 8  # bytes per second
    factor = 2 * (GROUP_SIZE - 1) / GROUP_SIZE
    return {
        "butterfly_fp32_seconds": factor * body_bytes / rate,
        "butterfly_payload_seconds": {c: factor * size / rate for c, size in payloads.items()},
        "client_mode_payload_seconds": {c: size / rate for c, size in payloads.items()},
        "client_mode_payload_tcp_seconds": {c: size / (rate * TCP_GOODPUT) for c, size in payloads.items()},
        # hivemind sends a client its results only once it has sent everything (should_delay_results):
        # up, then down, one after the other
        "hivemind_client_floor_seconds": {c: 2 * size / rate for c, size in payloads.items()},
        "hivemind_client_floor_tcp_seconds": {c: 2 * size / (rate * TCP_GOODPUT) for c, size in payloads.items()},
    }


# ----------------------------------------------------------------------------- one run
def link_counters(lab: NetLab) -> dict[str, dict[str, int]]:
    """Bytes each home router's shapers have sent: ``upload`` (WAN egress), ``download`` (LAN egress)."""
    counters = {}
    for home in PEERS[1:]:
        router = lab.routers[home]
        addresses = json.loads(
            subprocess.run(
                ["ip", "-j", "-n", router.namespace, "addr", "show"], capture_output=True, text=True, timeout=20
            ).stdout
        )
        wan = {link["ifname"] for link in addresses for a in link.get("addr_info", []) if a["local"] == router.address}
        qdiscs = json.loads(
            subprocess.run(
                ["tc", "-s", "-j", "-n", router.namespace, "qdisc", "show"], capture_output=True, text=True, timeout=20
            ).stdout
        )
        shaped = [q for q in qdiscs if q.get("kind") == "tbf"]
        counters[home] = {
            "upload": sum(q["bytes"] for q in shaped if q["dev"] in wan),
            "download": sum(q["bytes"] for q in shaped if q["dev"] not in wan),
        }
    return counters


class Process:
    """A CLI child process in a lab host's namespace, its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name, self.log_path = name, workdir / f"{name}.log"
        with open(self.log_path, "w") as output:
            self.process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, env=peer_environment(), start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


def wait_for_peers_file(bootstrap: Process, path: Path, address: str) -> list[str]:
    deadline = time.monotonic() + BOOTSTRAP_TIMEOUT
    while time.monotonic() < deadline:
        if bootstrap.process.poll() is not None:
            raise RuntimeError(f"the bootstrap exited with {bootstrap.process.returncode}:\n{bootstrap.log()[-2000:]}")
        if path.exists() and path.read_text().strip():
            peers = [peer for peer in path.read_text().split() if peer.startswith(f"/ip4/{address}/")]
            if peers:
                return peers
        time.sleep(0.2)
    raise RuntimeError(f"the bootstrap wrote no peers file within {BOOTSTRAP_TIMEOUT:.0f}s:\n{bootstrap.log()[-2000:]}")


def run_once(
    model: str, compression: str, rate_mbit: float, rounds: int, workdir: Path, label: str, extra: dict | None = None
) -> dict:
    """One swarm on a fresh lab; every peer's round reports, failures listed (never raised)."""
    from coldfusion_p2p.config import as_flags
    from coldfusion_p2p.contributor.checkpoints import read_history

    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"nat-bench-{label}"
    started = time.monotonic()
    failures: list[str] = []
    processes: list[Process] = []
    history: dict[str, list[dict]] = {}
    modes: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    wire = None
    try:
        with NetLab(homes=PEERS[1:], home_rate_mbit=rate_mbit) as lab:
            try:
                host = lab.hosts["bootstrap"]
                peers_file = workdir / "bootstrap.peers"
                bootstrap_flags = {"peers_file": str(peers_file), "host_maddrs": [f"/ip4/{host.address}/tcp/0"]}
                processes.append(
                    Process(
                        "bootstrap",
                        host.command(cli("bootstrap", *as_flags({**bootstrap_flags, "run_id": run_id}))),
                        workdir,
                    )
                )
                initial_peers = wait_for_peers_file(processes[0], peers_file, host.address)
                before = link_counters(lab)
                for name in PEERS:
                    flags = {
                        **PEER_SETTINGS,
                        "dataset": str(DATA / DATASETS[name] / "train.csv"),
                        "dataset_name": DATASETS[name],
                        "model": model,
                        "run_id": run_id,
                        "initial_peers": initial_peers,
                        "host_maddrs": [f"/ip4/{lab.hosts[name].address}/tcp/0"],
                        "output_dir": str(workdir / name),
                        "rounds": rounds,
                        "compression": compression,
                        **(extra or {}),
                    }
                    processes.append(Process(name, lab.hosts[name].command(cli("join", *as_flags(flags))), workdir))
                deadline = time.monotonic() + RUN_TIMEOUT
                for peer in processes[1:]:
                    try:
                        code = peer.process.wait(timeout=max(1.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        failures.append(f"{peer.name}: did not finish within {RUN_TIMEOUT:.0f}s")
                        break
                    if code != 0:
                        failures.append(f"{peer.name}: exited with {code}: {peer.log()[-600:]!r}")
                after = link_counters(lab)
                wire = {
                    home: {way: after[home][way] - before[home][way] for way in ("upload", "download")}
                    for home in after
                }
            finally:
                for process in reversed(processes):
                    process.kill()
    except Exception as error:  # a lab or bootstrap failure is this run's failure, reported, not hidden
        failures.append(f"{type(error).__name__}: {str(error)[:600]}")
    for peer in processes[1:]:
        history[peer.name] = read_history(workdir / peer.name)
        text = peer.log().splitlines()
        lines = [line for line in text if line.startswith("reachability: ")]
        modes[peer.name] = lines[0] if lines else ""
        errors[peer.name] = [line[:300] for line in text if ERROR_LINE.match(line)]
    for name in PEERS:
        expected = "reachability: public (" if name == "public" else "reachability: client ("
        if name in modes and not modes[name].startswith(expected):
            failures.append(f"{name}: expected '{expected}...', its log says {modes[name]!r}")
        rows = {row["round"]: row for row in history.get(name, [])}
        for round_number in range(1, rounds + 1):
            row = rows.get(round_number)
            if row is None:
                failures.append(f"{name} round {round_number}: no report")
            elif row["outcome"] != "fused" or row["group_size"] != GROUP_SIZE:
                failures.append(
                    f"{name} round {round_number}: {row['outcome']} in a group of {row['group_size']} "
                    f"({row.get('reason', '')})"
                )
    return {
        "label": label,
        "compression": compression,
        "wall_seconds": time.monotonic() - started,
        "ok": not failures,
        "failures": failures,
        "reachability": modes,
        "errors_in_logs": errors,  # exception lines the peers logged (e.g. from the averager's threads)
        "link_bytes": wire,
        "rounds": {
            name: [
                {key: row.get(key) for key in ("round", "outcome", "group_size", "fusion_seconds", "bytes_sent")}
                for row in history.get(name, [])
            ]
            for name in PEERS
        },
    }


# ----------------------------------------------------------------------------- summary
def fused_rows(run: dict, name: str) -> list[dict]:
    return [row for row in run["rounds"].get(name, []) if row["outcome"] == "fused" and row["group_size"] == GROUP_SIZE]


def summarize(runs: list[dict], compressions: list[str], sizes: dict, rounds: int) -> list[dict]:
    """Per compression: each peer's fusion seconds and bytes, the round's time, ratios to the bounds."""
    rows = []
    for compression in compressions:
        mine = [run for run in runs if run["compression"] == compression]
        per_peer = {name: [row["fusion_seconds"] for run in mine for row in fused_rows(run, name)] for name in PEERS}
        sent = {name: [row["bytes_sent"] for run in mine for row in fused_rows(run, name)] for name in PEERS}
        round_times = []  # a round is as slow as its slowest peer; only rounds every peer fused
        for run in mine:
            for round_number in range(1, rounds + 1):
                times = [
                    row["fusion_seconds"]
                    for name in PEERS
                    for row in fused_rows(run, name)
                    if row["round"] == round_number
                ]
                if len(times) == GROUP_SIZE:
                    round_times.append(max(times))
        butterfly = sizes["bounds"]["butterfly_payload_seconds"][compression]
        client = sizes["bounds"]["client_mode_payload_seconds"][compression]
        floor = sizes["bounds"]["hivemind_client_floor_tcp_seconds"][compression]
        fp32 = sizes["bounds"]["butterfly_fp32_seconds"]
        links = {
            f"{home}_{way}": [run["link_bytes"][home][way] for run in mine if run["link_bytes"]]
            for home in PEERS[1:]
            for way in ("upload", "download")
        }
        rows.append(
            {
                "compression": compression,
                "runs": len(mine),
                "failed_runs": [run["label"] for run in mine if not run["ok"]],
                "rounds_fused": len(round_times),
                "rounds_run": len(mine) * rounds,
                "failures": [f"{run['label']}: {failure}" for run in mine for failure in run["failures"]],
                "payload_bytes": sizes["payload_bytes"][compression],
                "fusion_seconds": {name: spread(values) for name, values in per_peer.items()},
                "round_seconds": spread(round_times),
                "round_seconds_minus_matchmaking": spread(t - PEER_SETTINGS["matchmaking_time"] for t in round_times),
                "round_over_butterfly_fp32": spread(t / fp32 for t in round_times),
                "round_over_butterfly_payload": spread(t / butterfly for t in round_times),
                "round_over_client_mode_payload": spread(t / client for t in round_times),
                "round_over_hivemind_client_floor_tcp": spread(t / floor for t in round_times),
                "bytes_sent": {name: spread(values) for name, values in sent.items()},
                "link_bytes_per_run": {key: spread(values) for key, values in links.items()},
                "per_round_seconds": round_times,
            }
        )
    return rows


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "nat_fusion.json").write_text(json.dumps(results, indent=2) + "\n")
    settings, sizes = results["settings"], results["sizes"]
    b = sizes["bounds"]
    lines = [
        "# Fusion through home NAT on slow links",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
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
        "| compression | payload MB | butterfly bound s (payload) | hivemind client floor 2S/rate s (at TCP goodput) "
        "| round s (slowest peer) | round s - matchmaking | round / fp32 butterfly bound | round / payload butterfly "
        "bound | goal <= 1.3x payload bound | round / client floor (TCP) | rounds fused in 3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        c = row["compression"]
        ratio = row["round_over_butterfly_payload"]
        met = (
            "-"
            if ratio is None
            else ("met" if ratio["max"] <= 1.3 else "median met" if ratio["median"] <= 1.3 else "**not met**")
        )
        lines.append(
            f"| {c} | {row['payload_bytes'] / 1e6:.2f} | {b['butterfly_payload_seconds'][c]:.1f} | "
            f"{b['hivemind_client_floor_seconds'][c]:.1f} ({b['hivemind_client_floor_tcp_seconds'][c]:.1f}) | "
            f"{fmt(row['round_seconds'], digits=1)} | "
            f"{fmt(row['round_seconds_minus_matchmaking'], digits=1)} | "
            f"{fmt(row['round_over_butterfly_fp32'], suffix='x')} | "
            f"{fmt(row['round_over_butterfly_payload'], suffix='x')} | {met} | "
            f"{fmt(row['round_over_hivemind_client_floor_tcp'], suffix='x')} | "
            f"{row['rounds_fused']}/{row['rounds_run']} |"
        )
    lines += [
        "",
        "## Per peer: fusion seconds and bytes sent",
        "",
        "`fusion_seconds` and `bytes_sent` from each peer's round reports (fusion_seconds: entering fusion to the "
        "fused result, matchmaking and the verdict exchange included; bytes_sent: the serialized parts it sent). "
        "Link MB: bytes through each home router's shaper over a whole run (all rounds, start-up, DHT), up and down.",
        "",
        "| compression | "
        + " | ".join(f"{name} fusion s" for name in PEERS)
        + " | "
        + " | ".join(f"{name} sent MB" for name in PEERS)
        + " | home1 link up / down MB | home2 link up / down MB |",
        "|---|" + "---|" * (2 * len(PEERS) + 2),
    ]
    for row in results["summary"]:
        links = row["link_bytes_per_run"]
        lines.append(
            f"| {row['compression']} | "
            + " | ".join(fmt(row["fusion_seconds"][name], digits=1) for name in PEERS)
            + " | "
            + " | ".join(fmt(row["bytes_sent"][name], 1e6, 1) for name in PEERS)
            + " | "
            + " | ".join(
                f"{fmt(links[f'{home}_upload'], 1e6, 0)} / {fmt(links[f'{home}_download'], 1e6, 0)}"
                for home in PEERS[1:]
            )
            + " |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| run | compression | wall s | per-round seconds (public, home1, home2) | ok |",
        "|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        per_round = "; ".join(
            f"r{r}: "
            + ", ".join(
                next((f"{row['fusion_seconds']:.1f}" for row in run["rounds"].get(name, []) if row["round"] == r), "-")
                for name in PEERS
            )
            for r in range(1, settings["rounds"] + 1)
        )
        lines.append(
            f"| {run['label']} | {run['compression']} | {run['wall_seconds']:.0f} | {per_round} | {run['ok']} |"
        )
    failures = [failure for row in results["summary"] for failure in row["failures"]]
    lines += ["", "## Failures", ""] + (
        [f"- {failure}" for failure in failures] or ["None: every round of every run fused in a group of 3."]
    )
    logged = [
        f"- {run['label']} {name}: `{line}`"
        for run in results["runs"]
        for name, found in run.get("errors_in_logs", {}).items()
        for line in dict.fromkeys(found)
    ]
    lines += ["", "## Exceptions in the peers' logs", ""] + (logged or ["None."])
    if results.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]]]
    (out / "nat_fusion.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "nat_fusion.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds_ = results["sizes"]["bounds"]
    rows = results["summary"]
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    for index, row in enumerate(rows):
        value = row["round_seconds"]
        if value is not None:
            axis.bar(index, value["median"], width=0.6, color="#4c72b0", alpha=0.85)
            axis.bar(
                index,
                min(value["median"], PEER_SETTINGS["matchmaking_time"]),
                width=0.6,
                color="white",
                alpha=0.5,
                hatch="//",
                label="matchmaking wait (estimate)" if index == 0 else None,
            )
            axis.errorbar(
                index,
                value["median"],
                yerr=[[value["median"] - value["min"]], [value["max"] - value["median"]]],
                color="black",
                capsize=6,
            )
        c = row["compression"]
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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per compression, order alternating")
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="home link rate, each way")
    parser.add_argument("--compressions", nargs="+", default=["none", "fp16", "int8"], choices=["none", "fp16", "int8"])
    parser.add_argument("--rounds", type=int, default=2, help="fusion rounds per run")
    parser.add_argument(
        "--model", default=None, help="base model folder (default: the bundled MiniLM); 'tiny': a tiny BERT"
    )
    parser.add_argument(
        "--max-update-ratio",
        type=float,
        default=None,
        help="the peers' poisoning guard (default: theirs, 10); int8 at 1 local step trips it, see the notes",
    )
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "measurements" / "nat"))
    parser.add_argument("--work-dir", default=None, help="peers' output and logs (default: a fresh temp dir)")
    arguments = parser.parse_args()
    if arguments.repeats < 1 or arguments.rounds < 1 or arguments.rate_mbit <= 0:
        parser.error("--repeats and --rounds must be at least 1, --rate-mbit positive")
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    import torch

    from coldfusion_p2p.contributor.model import resolve_model_name

    wall_started = time.monotonic()
    workdir = Path(arguments.work_dir or tempfile.mkdtemp(prefix="coldfusion-nat-"))
    if arguments.model == "tiny":
        from tiny_models import build_tiny_model

        model, model_label = str(build_tiny_model(workdir / "tiny-model", "bert")), "a tiny BERT (smoke test)"
    else:
        model = resolve_model_name(arguments.model)
        model_label = "all-MiniLM-L6-v2 (bundled)" if arguments.model is None else Path(model).name
    log(f"work dir {workdir}; sizing the body of {model_label}")
    shapes = body_shapes(model)
    parameters = sum(torch.Size(shape).numel() for shape in shapes)
    payloads = {c: payload_bytes(shapes, c) for c in arguments.compressions}
    sizes = {
        "body_parameters": parameters,
        "body_bytes": parameters * 4,
        "payload_bytes": payloads,
        "bounds": bounds(parameters * 4, payloads, arguments.rate_mbit),
    }
    log("bounds: " + json.dumps({k: v for k, v in sizes["bounds"].items()}, default=str))
    extra = {} if arguments.max_update_ratio is None else {"max_update_ratio": arguments.max_update_ratio}
    runs, order = [], []
    for repeat in range(arguments.repeats):
        sequence = arguments.compressions if repeat % 2 == 0 else list(reversed(arguments.compressions))
        order.append(",".join(sequence))
        for compression in sequence:
            label = f"r{repeat + 1}-{compression}"
            log(f"run {label} ...")
            run = run_once(model, compression, arguments.rate_mbit, arguments.rounds, workdir / label, label, extra)
            runs.append(run)
            times = [
                f"{name} " + "/".join(f"{row['fusion_seconds']:.1f}" for row in run["rounds"][name]) for name in PEERS
            ]
            log(
                f"  {label}: {'ok' if run['ok'] else 'FAILED'} in {run['wall_seconds']:.0f}s; "
                f"fusion s: {', '.join(times)}"
            )
            for failure in run["failures"]:
                log(f"  failure: {failure}")
    summary = summarize(runs, arguments.compressions, sizes, arguments.rounds)
    results = {
        "command": "sudo python3 benchmarks/nat_fusion.py" + "".join(f" {argument}" for argument in sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            "repeats": arguments.repeats,
            "rate_mbit": arguments.rate_mbit,
            "compressions": arguments.compressions,
            "rounds": arguments.rounds,
            "model": model,
            "model_label": model_label,
            "group_size": GROUP_SIZE,
            "datasets": DATASETS,
            "peer_settings": {**PEER_SETTINGS, **extra},
            "tcp_goodput": TCP_GOODPUT,
        },
        "order": order,
        "sizes": sizes,
        "summary": summary,
        "runs": runs,
        "work_dir": str(workdir),
        "notes": [
            "fusion_seconds starts when a peer enters fusion, so it includes the wait for the group's scheduled "
            f"start (up to matchmaking_time = {PEER_SETTINGS['matchmaking_time']:g} s) that no bound counts; "
            "'round s - matchmaking' subtracts that much as an estimate of the all-reduce and verdict exchange",
            "only the homes' links are shaped; the public peer (like a server) and the bootstrap are not, so the "
            "public reducer is never the bottleneck",
            *(
                [
                    f"every peer ran with max_update_ratio = {arguments.max_update_ratio:g} (the poisoning guard; "
                    "default 10), so that a round's timing does not depend on the guard's verdict"
                ]
                if arguments.max_update_ratio is not None
                else []
            ),
        ],
        "wall_seconds": time.monotonic() - wall_started,
    }
    write_report(results, Path(arguments.output_dir))
    print((Path(arguments.output_dir) / "nat_fusion.md").read_text())
    failed = [run["label"] for run in runs if not run["ok"]]
    if failed:
        print(
            f"error: {len(failed)} run(s) did not fuse every round in a group of {GROUP_SIZE}: {failed}",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
