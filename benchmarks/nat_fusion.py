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

The pieces: ``nat_swarm.py`` (one run on a fresh lab), ``nat_report.py`` (the report), ``common.py``
(what the benchmark scripts share); this file sizes the body, computes the bounds, runs every
compression ``--repeats`` times and summarizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the network lab (and the tiny model builder for --model tiny)

import torch  # noqa: E402
from common import benchmark_model, exit_if_any_failed, log, provenance, spread  # noqa: E402  (sets HF_HUB_OFFLINE)
from nat_report import write_report  # noqa: E402
from nat_swarm import DATASETS, GROUP_SIZE, PEER_SETTINGS, PEERS, run_once  # noqa: E402
from netlab import lab_unavailable_reason  # noqa: E402

from coldfusion_p2p.contributor.model import body_parameters, load_classifier  # noqa: E402

TCP_GOODPUT = 1448 / 1514  # payload share of a full TCP frame: what tbf lets through as data (netlab)


# ----------------------------------------------------------------------------- sizes
def body_shapes(model: str) -> list[tuple[int, ...]]:
    """Shapes of the body tensors the peers fuse (the classifier without its head)."""
    classifier = load_classifier(model, ["a", "b"], seed=0)
    return [tuple(parameter.shape) for parameter in body_parameters(classifier)]


def payload_bytes(shapes: list[tuple[int, ...]], compression: str) -> int:
    """Bytes of one whole body as hivemind's all-reduce serializes it with ``compression``.

    The body is split into parts of ``DEFAULT_PART_SIZE_BYTES`` after compression, each part
    compressed on its own (an int8 part carries its own 256-entry codebook), exactly as
    ``TensorPartContainer`` does; summed ``ByteSize()`` of the serialized parts (the values do not
    change the sizes of these codecs)."""
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


# ----------------------------------------------------------------------------- summary
def fused_rows(run: dict, name: str) -> list[dict]:
    """The rounds of one peer in one run that fused in a full group: the only ones the medians count."""
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


def parse_arguments() -> argparse.Namespace:
    """The command line (see the module docstring); positive repeats, rounds and rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per compression, order alternating")
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="home link rate, each way")
    parser.add_argument(
        "--upload-mbit",
        type=float,
        default=None,
        help="an asymmetric home line: its upload rate (default: --rate-mbit)",
    )
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
    parser.add_argument(
        "--client-results",
        choices=["after_sending", "streamed"],
        default=None,
        help="the peers' --client-results (default: theirs, streamed)",
    )
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "measurements" / "nat"))
    parser.add_argument("--work-dir", default=None, help="peers' output and logs (default: a fresh temp dir)")
    arguments = parser.parse_args()
    if arguments.repeats < 1 or arguments.rounds < 1 or arguments.rate_mbit <= 0 or (arguments.upload_mbit or 1) <= 0:
        parser.error("--repeats and --rounds must be at least 1, --rate-mbit and --upload-mbit positive")
    return arguments


def measure_sizes(model: str, compressions: list[str], rate_mbit: float) -> dict:
    """The body's parameters and bytes, each compression's payload, and the bounds at ``rate_mbit``."""
    shapes = body_shapes(model)
    parameters = sum(torch.Size(shape).numel() for shape in shapes)
    payloads = {c: payload_bytes(shapes, c) for c in compressions}
    return {
        "body_parameters": parameters,
        "body_bytes": parameters * 4,
        "payload_bytes": payloads,
        "bounds": bounds(parameters * 4, payloads, rate_mbit),
    }


def run_all(model: str, arguments: argparse.Namespace, workdir: Path, extra: dict) -> tuple[list[dict], list[str]]:
    """Every compression ``--repeats`` times, the order reversed every other repeat; the runs and the orders."""
    runs, order = [], []
    for repeat in range(arguments.repeats):
        sequence = arguments.compressions if repeat % 2 == 0 else list(reversed(arguments.compressions))
        order.append(",".join(sequence))
        for compression in sequence:
            label = f"r{repeat + 1}-{compression}"
            log(f"run {label} ...")
            run = run_once(
                model,
                compression,
                arguments.rate_mbit,
                arguments.rounds,
                workdir / label,
                label,
                extra,
                upload_mbit=arguments.upload_mbit,
            )
            runs.append(run)
            log_run(label, run)
    return runs, order


def log_run(label: str, run: dict) -> None:
    """A run's outcome, its peers' fusion seconds per round and its failures, as soon as it ends."""
    times = [f"{name} " + "/".join(f"{row['fusion_seconds']:.1f}" for row in run["rounds"][name]) for name in PEERS]
    log(f"  {label}: {'ok' if run['ok'] else 'FAILED'} in {run['wall_seconds']:.0f}s; fusion s: {', '.join(times)}")
    for failure in run["failures"]:
        log(f"  failure: {failure}")


def run_settings(arguments: argparse.Namespace, model: str, model_label: str, extra: dict) -> dict:
    """What every run shared: the command line's settings and every peer's."""
    return {
        "repeats": arguments.repeats,
        "rate_mbit": arguments.rate_mbit,
        "upload_mbit": arguments.upload_mbit,
        "compressions": arguments.compressions,
        "rounds": arguments.rounds,
        "model": model,
        "model_label": model_label,
        "group_size": GROUP_SIZE,
        "datasets": DATASETS,
        "peer_settings": {**PEER_SETTINGS, **extra},
        "tcp_goodput": TCP_GOODPUT,
    }


def run_notes(arguments: argparse.Namespace) -> list[str]:
    """What a reader of the figures must know: what fusion_seconds includes, which links are shaped, the guard."""
    asymmetric = getattr(arguments, "upload_mbit", None)
    return [
        *(
            [
                f"asymmetric home lines: uploads shaped to {asymmetric:g} Mbit/s, downloads to "
                f"{arguments.rate_mbit:g}: the bounds in the table assume {arguments.rate_mbit:g} both ways; a "
                f"client's real floor is its payload / {asymmetric:g} Mbit/s"
            ]
            if asymmetric
            else []
        ),
        "fusion_seconds runs from entering fusion to the fused result: hivemind's matchmaking, the all-reduce "
        "and the verdict exchange. The whole swarm is ready, so the group starts once all 3 joined, without "
        f"waiting out matchmaking_time = {PEER_SETTINGS['matchmaking_time']:g} s (runs before 2026-12-02 18:00 "
        "waited it out)",
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
    ]


def main() -> None:
    """Check the lab, size the body, run everything, write the report; exit 1 if a run did not fuse every round."""
    arguments = parse_arguments()
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    wall_started = time.monotonic()
    workdir = Path(arguments.work_dir or tempfile.mkdtemp(prefix="coldfusion-nat-"))
    model, model_label = benchmark_model(arguments.model, workdir)
    log(f"work dir {workdir}; sizing the body of {model_label}")
    sizes = measure_sizes(model, arguments.compressions, arguments.rate_mbit)
    log("bounds: " + json.dumps({k: v for k, v in sizes["bounds"].items()}, default=str))
    extra = {} if arguments.max_update_ratio is None else {"max_update_ratio": arguments.max_update_ratio}
    if arguments.client_results is not None:
        extra["client_results"] = arguments.client_results
    runs, order = run_all(model, arguments, workdir, extra)
    summary = summarize(runs, arguments.compressions, sizes, arguments.rounds)
    results = {
        **provenance("sudo python3 benchmarks/nat_fusion.py", with_platform=True),
        "settings": run_settings(arguments, model, model_label, extra),
        "order": order,
        "sizes": sizes,
        "summary": summary,
        "runs": runs,
        "work_dir": str(workdir),
        "notes": run_notes(arguments),
        "wall_seconds": time.monotonic() - wall_started,
    }
    write_report(results, Path(arguments.output_dir))
    print((Path(arguments.output_dir) / "nat_fusion.md").read_text())
    exit_if_any_failed(runs, GROUP_SIZE)


if __name__ == "__main__":
    main()
