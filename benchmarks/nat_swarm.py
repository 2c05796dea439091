"""One run of ``benchmarks/nat_fusion.py``: a fresh network lab, its bootstrap and three peers, what they report.

The lab (``tests/netlab.py``): a bootstrap and a public peer on the "internet" bridge, two peers
behind masquerading home routers whose links are shaped to the run's rate. ``run_once`` starts real
``coldfusion-peer join`` processes there, waits for them, reads their round reports, logs and the
routers' shaper counters, and lists every failure (it never raises one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from common import DATA, cli, peer_environment, round_failures, run_record
from netlab import NetLab

from coldfusion_p2p.config import as_flags

PEERS = ("public", "home1", "home2")  # host names of the lab; the first is on the public side
DATASETS = {"public": "trec_question_type", "home1": "tweet_sentiment", "home2": "sms_spam"}
GROUP_SIZE = len(PEERS)
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


def lab_peer_environment() -> dict[str, str]:
    """The peers' environment: one thread each (two cores shared by three peers), nothing downloaded."""
    environment = peer_environment(
        MKL_NUM_THREADS="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    environment.pop("HIVEMIND_MEMORY_SHARING_STRATEGY", None)
    return environment


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
                argv, stdout=output, stderr=subprocess.STDOUT, env=lab_peer_environment(), start_new_session=True
            )

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """Its whole process group (the peer's p2pd and averager processes too), if it is still running."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


def wait_for_peers_file(bootstrap: Process, path: Path, address: str) -> list[str]:
    """The bootstrap's addresses on the lab's internet, once it has written them (its exit is an error)."""
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


def start_bootstrap(lab: NetLab, workdir: Path, run_id: str, processes: list[Process], **flags) -> list[str]:
    """The run's bootstrap on the lab's internet (appended to ``processes`` at once), with ``flags``
    (``relay=True``, say); its addresses."""
    host = lab.hosts["bootstrap"]
    peers_file = workdir / "bootstrap.peers"
    bootstrap_flags = {"peers_file": str(peers_file), "host_maddrs": [f"/ip4/{host.address}/tcp/0"], **flags}
    processes.append(
        Process(
            "bootstrap",
            host.command(cli("bootstrap", *as_flags({**bootstrap_flags, "run_id": run_id}))),
            workdir,
        )
    )
    return wait_for_peers_file(processes[0], peers_file, host.address)


def _wait_for_peers(peers: list[Process], failures: list[str]) -> None:
    """Wait for the peers to finish all their rounds, within RUN_TIMEOUT; a timeout or a bad exit is a failure."""
    deadline = time.monotonic() + RUN_TIMEOUT
    for peer in peers:
        try:
            code = peer.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failures.append(f"{peer.name}: did not finish within {RUN_TIMEOUT:.0f}s")
            break
        if code != 0:
            failures.append(f"{peer.name}: exited with {code}: {peer.log()[-600:]!r}")


def _run_in_lab(lab: NetLab, run: dict, processes: list[Process], failures: list[str]) -> dict:
    """Bootstrap, the three peers, their end; returns each home link's bytes up and down over the run.

    ``run``: model, compression, rounds, workdir, run_id, extra. Every process started is appended to
    ``processes`` at once, so that the caller kills it also when this raises."""
    workdir = run["workdir"]
    initial_peers = start_bootstrap(lab, workdir, run["run_id"], processes)
    before = link_counters(lab)
    for name in PEERS:
        flags = {
            **PEER_SETTINGS,
            "dataset": str(DATA / DATASETS[name] / "train.csv"),
            "dataset_name": DATASETS[name],
            "model": run["model"],
            "run_id": run["run_id"],
            "initial_peers": initial_peers,
            "host_maddrs": [f"/ip4/{lab.hosts[name].address}/tcp/0"],
            "output_dir": str(workdir / name),
            "rounds": run["rounds"],
            "compression": run["compression"],
            **(run["extra"] or {}),
        }
        processes.append(Process(name, lab.hosts[name].command(cli("join", *as_flags(flags))), workdir))
    _wait_for_peers(processes[1:], failures)
    after = link_counters(lab)
    return {home: {way: after[home][way] - before[home][way] for way in ("upload", "download")} for home in after}


def _read_peers(peers: list[Process], workdir: Path) -> tuple[dict, dict, dict]:
    """Each peer's round history, its reachability line and the exception lines in its log."""
    from coldfusion_p2p.contributor.checkpoints import read_history

    history: dict[str, list[dict]] = {}
    modes: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    for peer in peers:
        history[peer.name] = read_history(workdir / peer.name)
        text = peer.log().splitlines()
        lines = [line for line in text if line.startswith("reachability: ")]
        modes[peer.name] = lines[0] if lines else ""
        errors[peer.name] = [line[:300] for line in text if ERROR_LINE.match(line)]
    return history, modes, errors


def _peer_failures(history: dict, modes: dict, rounds: int) -> list[str]:
    """A peer in the wrong reachability mode, and every round not fused in a group of 3."""
    failures = []
    for name in PEERS:
        expected = "reachability: public (" if name == "public" else "reachability: client ("
        if name in modes and not modes[name].startswith(expected):
            failures.append(f"{name}: expected '{expected}...', its log says {modes[name]!r}")
        failures += round_failures(name, history.get(name, []), rounds, GROUP_SIZE)
    return failures


def run_once(
    model: str,
    compression: str,
    rate_mbit: float,
    rounds: int,
    workdir: Path,
    label: str,
    extra: dict | None = None,
    upload_mbit: float | None = None,
) -> dict:
    """One swarm on a fresh lab; every peer's round reports, failures listed (never raised)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"nat-bench-{label}"
    started = time.monotonic()
    failures: list[str] = []
    processes: list[Process] = []
    wire = None
    run = {
        "model": model,
        "compression": compression,
        "rounds": rounds,
        "workdir": workdir,
        "run_id": run_id,
        "extra": extra,
    }
    try:
        with NetLab(homes=PEERS[1:], home_rate_mbit=rate_mbit, home_upload_mbit=upload_mbit) as lab:
            try:
                wire = _run_in_lab(lab, run, processes, failures)
            finally:
                for process in reversed(processes):
                    process.kill()
    except Exception as error:  # a lab or bootstrap failure is this run's failure, reported, not hidden
        failures.append(f"{type(error).__name__}: {str(error)[:600]}")
    history, modes, errors = _read_peers(processes[1:], workdir)
    failures += _peer_failures(history, modes, rounds)
    return run_record(
        label,
        compression,
        started,
        failures,
        reachability=modes,
        errors_in_logs=errors,  # exception lines the peers logged (e.g. from the averager's threads)
        link_bytes=wire,
        rounds={
            name: [
                {key: row.get(key) for key in ("round", "outcome", "group_size", "fusion_seconds", "bytes_sent")}
                for row in history.get(name, [])
            ]
            for name in PEERS
        },
    )
