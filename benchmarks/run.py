"""The project's benchmarks, each a ratio against its baseline measured in the same run.

    python3 benchmarks/run.py            # all of it (see the results file for the wall time)
    python3 benchmarks/run.py --quick    # tiny model only

Writes ``benchmarks/results/latest.json`` and ``latest.md`` (and ``scaling.png``), with the exact
command and wall time in both. Every compared pair runs the same work in the same run, in
alternating order (trial t: ours first when t is even), over ``--trials`` measured trials after
one untimed warm-up trial; min/median/max of each arm and of the per-trial ratio are reported.

- ``fusion_vs_raw``: one fusion round of ours (all-or-nothing, verdicts, validation) against a
  bare hivemind ``DecentralizedAverager.step()`` on the same tensors, group and DHT. Both arms
  have the same averager settings (timeouts, declare-state period) and neither re-declares its
  state inside the timed region (hivemind's per-tensor ``_state_updated.set()`` is the one line
  the baseline drops, as ours does). Two figures per trial, both measured: *all-reduce* (from the
  moment the peer's group is assembled, read from hivemind's step control, to the result) and
  *call to result* (from calling step/fuse with hivemind's default schedule, now +
  matchmaking_time, to the result: matchmaking included);
- ``bytes_vs_butterfly``: bytes on the wire per peer per round, read from the loopback counters
  of a network namespace the benchmark creates for its peers (headers, framing, matchmaking and
  DHT traffic included), against the butterfly minimum 2(N-1)/N * S with S the fp32 body; beside
  it the serialized tensor payload only, counted where parts are serialized;
- ``train_vs_plain``: local samples/s of our trainer against a minimal PyTorch loop on exactly
  the same batches (asserted by a hash of every batch's token ids and labels), both building
  them with the same ``collate`` inside the timer, after the same warm-up round;
- scaling: round time, fusion share and peak memory per peer for N = 2, 3, 4 and two model sizes;
  and the accuracy after fusion with fp16 against fp32 on the same seeds (one run each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder the tests use
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402
from hivemind.utils.asyncio import as_aiter, azip  # noqa: E402
from wire import NetNamespace, loopback_tx_bytes  # noqa: E402

from coldfusion_p2p.config import DataConfig, FusionConfig, TrainingConfig, as_flags  # noqa: E402
from coldfusion_p2p.contributor.data import load_task_data  # noqa: E402
from coldfusion_p2p.contributor.model import (  # noqa: E402
    body_parameters,
    forward_input_names,
    load_classifier,
    load_tokenizer,
    resolve_model_name,
)
from coldfusion_p2p.contributor.trainer import LocalTrainer, collate  # noqa: E402

from tiny_models import build_tiny_model  # noqa: E402

DATA = ROOT / "peers" / "data"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
BARRIER_SECONDS = 300.0  # every wait between the fusion workers is bounded by this


def spread(values) -> dict | None:
    """min/median/max (and how many) of a list of numbers; None when there are none."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def order_of(trial: int, first: str, second: str) -> tuple[str, str]:
    """Which arm runs first in ``trial``: alternating, so neither always gets the warmer machine."""
    return (first, second) if trial % 2 == 0 else (second, first)


# ----------------------------------------------------------------------------- training
def _batch_digest(log: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for input_ids, labels in log:
        digest.update(str(tuple(input_ids.shape)).encode())
        digest.update(input_ids.contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def bench_training(label: str, model_name: str, steps: int, trials: int, batch_size: int = 32) -> dict:
    """Our LocalTrainer against a minimal loop on the same model init, batches and optimizer settings.

    Both arms: one untimed warm-up round (round 1's batches), then ``trials`` timed rounds (round
    t + 2's batches), in alternating order; each round is ``steps`` AdamW steps with a fresh
    optimizer (as ours does every round), batches cut by the same ``collate`` inside the timer,
    the stream's batch indices computed before the timer for both. A forward pre-hook on both
    models records every batch it is fed; their hashes must be identical.
    """
    data = load_task_data(DataConfig(dataset=str(DATA / "tweet_sentiment" / "train.csv")))
    tokenizer = load_tokenizer(model_name)
    config = TrainingConfig(local_steps=steps, batch_size=batch_size, lr=2e-4)
    ours_model = load_classifier(model_name, data.label_names, seed=0)
    plain_model = load_classifier(model_name, data.label_names, seed=0)
    trainer = LocalTrainer(ours_model, tokenizer, data.train, data.validation, config, max_length=64)
    encoded, input_names = trainer.train_data, forward_input_names(plain_model)
    fed: dict[str, list] = {"ours": [], "plain": []}
    for arm, model in (("ours", ours_model), ("plain", plain_model)):
        model.register_forward_pre_hook(
            lambda _module, _args, kwargs, log=fed[arm]: log.append((kwargs["input_ids"], kwargs["labels"])),
            with_kwargs=True,
        )

    def prepare(round_number: int) -> list:  # the stream's indices (cached), outside both timers
        first = (round_number - 1) * steps
        return [trainer.batch(first + step) for step in range(steps)]

    def plain_round(round_number: int) -> float:
        chosen = prepare(round_number)
        torch.manual_seed(config.seed * 1_000_003 + round_number)  # dropout, as ours
        optimizer = torch.optim.AdamW(plain_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        plain_model.train()
        started = time.perf_counter()
        for indices in chosen:
            plain_model(**collate(encoded, indices, input_names)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - started
        plain_model.eval()
        return steps * batch_size / seconds

    def ours_round(round_number: int) -> float:
        prepare(round_number)
        return trainer.train_round(round_number).samples_per_second

    arms = {"ours": ours_round, "plain": plain_round}
    for arm in ("ours", "plain"):  # the same warm-up: one whole round of the same batches each
        arms[arm](1)
    samples: dict[str, list[float]] = {"ours": [], "plain": []}
    orders = []
    for trial in range(trials):
        order = order_of(trial, "ours", "plain")
        orders.append(order[0])
        for arm in order:
            samples[arm].append(arms[arm](trial + 2))
    digests = {arm: _batch_digest(log) for arm, log in fed.items()}
    if digests["ours"] != digests["plain"] or len(fed["ours"]) != len(fed["plain"]):
        raise AssertionError(f"the two loops were fed different batches: {digests}")
    ratios = [ours / plain for ours, plain in zip(samples["ours"], samples["plain"], strict=True)]
    return {
        "model": label,
        "steps_per_trial": steps,
        "batch_size": batch_size,
        "trials": trials,
        "first_arm_per_trial": orders,
        "batches_fed_each": len(fed["ours"]),
        "batches_sha256": digests["ours"],
        "ours_samples_per_second": spread(samples["ours"]),
        "plain_samples_per_second": spread(samples["plain"]),
        "ratio": spread(ratios),
        "per_trial": {"ours": samples["ours"], "plain": samples["plain"], "ratio": ratios},
    }


# ----------------------------------------------------------------------------- fusion
class BareAverager(DecentralizedAverager):
    """hivemind 1.1.12's averager, its in-place all-reduce copied unchanged but for one line.

    hivemind sets ``_state_updated`` after every averaged tensor, which wakes its declare-state
    loop into a DHT store each time, inside the all-reduce; ours (``FusedBodyAverager``) drops that
    call. So that the timed region holds the same state-sharing work in both arms, this baseline
    drops it too; both re-declare every ``declare_state_period`` seconds (set equal to ours).
    """

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = AllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                # (hivemind: self._state_updated.set() here)
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class StageWatch:
    """Records when a hivemind step's group is assembled (its stage turns RUNNING_ALLREDUCE).

    The step control's stage lives in shared memory; a thread polls it every 2 ms (the same
    thread, at the same rate, in both arms) until the all-reduce began or the step ended.
    """

    def __init__(self):
        self.began: float | None = None
        self._thread: threading.Thread | None = None

    def watch(self, control) -> None:
        def poll():
            deadline = time.monotonic() + 600.0
            while time.monotonic() < deadline:
                if control.began_allreduce:
                    self.began = get_dht_time()
                    return
                if control.done():
                    return
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def _fusion_worker(index, shapes, n_peers, compression, trials, settings, namespace, maddrs_queue, initial, barrier):
    if namespace is not None:  # before any socket or child process: all of them inherit it
        NetNamespace(namespace).enter()
    torch.set_num_threads(1)
    from hivemind import DHT

    from coldfusion_p2p.swarm.fusion import BodyFusion
    from coldfusion_p2p.swarm.hivemind_adapter import COMPRESSIONS, CountingCompression, count_reducer_bytes
    from coldfusion_p2p.swarm.records import RecordBoard, RunKeys, swarm_validators

    keys = RunKeys.from_run_id(f"bench-{n_peers}-{compression}-{len(shapes)}")
    peers = [] if index == 0 else list(initial)
    dht = DHT(start=True, host_maddrs=[LOOPBACK], initial_peers=peers, record_validators=swarm_validators(keys))
    if index == 0:
        for _ in range(n_peers - 1):
            maddrs_queue.put([str(address) for address in dht.get_visible_maddrs()])
    matchmaking, request = settings["matchmaking_time"], settings["request_timeout"]
    config = FusionConfig(
        matchmaking_time=matchmaking,
        request_timeout=request,
        allreduce_timeout=120.0,
        next_chunk_timeout=30.0,
        compression=compression,
    )
    shared_start = torch.Generator().manual_seed(0)  # every peer starts from the same body
    body = [torch.randn(shape, generator=shared_start) for shape in shapes]
    generator = torch.Generator().manual_seed(index + 1)  # ... and makes its own updates
    fusion = BodyFusion(dht, body, prefix=keys.averager_prefix("bench"), config=config, board=RecordBoard(dht, keys))
    ours_averager = fusion.averager
    raw_bytes = mp.Value("Q", 0)
    count_reducer_bytes(raw_bytes)  # before the baseline's averager process forks
    raw = BareAverager(
        [tensor.clone() for tensor in body],
        dht,
        prefix=keys.prefix + "_raw",
        start=True,
        min_group_size=2,
        target_group_size=None,
        min_matchmaking_time=matchmaking,
        request_timeout=request,
        allreduce_timeout=config.allreduce_timeout,
        next_chunk_timeout=config.next_chunk_timeout,
        sender_timeout=config.next_chunk_timeout,
        reducer_timeout=2 * config.next_chunk_timeout,
        declare_state_period=ours_averager.declare_state_period,  # the same as ours
        compression=CountingCompression(COMPRESSIONS[compression](), raw_bytes),
        shutdown_timeout=3,
    )
    watch = StageWatch()
    ours_step = ours_averager.step

    def watched_step(*args, **kwargs):  # fuse() calls step(wait=False): watch its control
        control = ours_step(*args, **kwargs)
        watch.watch(control)
        return control

    ours_averager.step = watched_step
    step_timeout = matchmaking + 2 * request  # = what fuse() gives its step with this schedule
    rows = []
    for trial in range(trials + 1):  # trial 0: warm-up, both arms, dropped by the summary
        for mode in order_of(trial, "ours", "raw"):
            with torch.no_grad():  # a fresh "training" update each round, outside the timer
                if mode == "ours":
                    for tensor in body:
                        tensor.add_(torch.randn(tensor.shape, generator=generator) * 1e-3)
                else:
                    with raw.get_tensors() as tensors:
                        for tensor in tensors:
                            tensor.add_(torch.randn(tensor.shape, generator=generator) * 1e-3)
            barrier.wait(timeout=BARRIER_SECONDS)
            tx_before = loopback_tx_bytes() if index == 0 and namespace is not None else None
            barrier.wait(timeout=BARRIER_SECONDS)
            watch.began = None
            called = get_dht_time()
            scheduled = called + matchmaking  # hivemind's default schedule, in both arms
            ok, payload = True, 0
            if mode == "ours":
                result = fusion.fuse(
                    body, round_number=trial + 1, scheduled_time=scheduled, weight=1.0, info={"round": trial + 1}
                )
                ok = True if result.fused else result.reason
                payload = result.bytes_sent
            else:
                before = raw_bytes.value
                try:
                    control = raw.step(scheduled_time=scheduled, timeout=step_timeout, allow_retries=False, wait=False)
                    watch.watch(control)
                    if control.result(timeout=step_timeout + config.allreduce_timeout + 5.0) is None:
                        ok = "no group"
                except Exception as error:  # hivemind raises several types: all mean "this round failed"
                    ok = f"{type(error).__name__}: {error}"[:200]
                payload = raw_bytes.value - before
            ended = get_dht_time()
            watch.join()
            began = watch.began
            barrier.wait(timeout=BARRIER_SECONDS)  # every peer is done: the window closes
            tx_after = loopback_tx_bytes() if tx_before is not None else None
            rows.append(
                {
                    "trial": trial,
                    "mode": mode,
                    "ok": ok,
                    "call_to_result": ended - called,
                    "allreduce": None if began is None else ended - began,
                    "payload_bytes": payload,
                    "wire_bytes_all_peers": None if tx_before is None else tx_after - tx_before,
                }
            )
            if mode == "ours" and ok is True:  # as the peer does after a fused round: share it
                fusion.publish_fused(trial + 1, body, {"group_size": result.group_size})
    idle = None
    barrier.wait(timeout=BARRIER_SECONDS)
    if index == 0 and namespace is not None:  # background traffic of the idle swarm (DHT upkeep, declares)
        tx_before, started = loopback_tx_bytes(), time.monotonic()
        time.sleep(settings["idle_seconds"])
        idle = (loopback_tx_bytes() - tx_before) / (time.monotonic() - started)
    barrier.wait(timeout=BARRIER_SECONDS)
    raw.shutdown()
    fusion.shutdown()
    dht.shutdown()
    return rows, idle


def _fusion_process(index, results, *args):
    barrier = args[-1]
    try:
        rows, idle = _fusion_worker(index, *args)
        results.put({"index": index, "rows": rows, "idle_bytes_per_second": idle})
    except BaseException as error:
        barrier.abort()  # the others stop waiting for this one now, not after BARRIER_SECONDS
        results.put({"index": index, "error": f"{type(error).__name__}: {error}"})
        raise


def bench_fusion(shapes: list[tuple[int, ...]], n_peers: int, compression: str, trials: int, settings: dict) -> dict:
    context = mp.get_context("fork")  # hivemind forks its own processes inside the workers too
    queue, results = context.Queue(), context.Queue()
    barrier = context.Barrier(n_peers)
    name = f"cfbench-{os.getpid()}-{n_peers}-{compression}"
    namespace, wire_note = None, "measured in network namespace " + name
    try:
        namespace = NetNamespace(name).__enter__()
    except Exception as error:  # not root, no iproute2: the payload count remains, wire bytes are not measured
        wire_note = f"not measured: no network namespace ({type(error).__name__}: {error})"
    workers, leftovers = [], []
    try:
        common = (shapes, n_peers, compression, trials, settings, namespace and namespace.name)
        first = context.Process(target=_fusion_process, args=(0, results, *common, queue, [], barrier))
        first.start()
        workers.append(first)
        for index in range(1, n_peers):
            initial = queue.get(timeout=120)
            worker = context.Process(target=_fusion_process, args=(index, results, *common, queue, initial, barrier))
            worker.start()
            workers.append(worker)
        collected = sorted((results.get(timeout=1800) for _ in workers), key=lambda peer: peer["index"])
        errors = [peer["error"] for peer in collected if "error" in peer]
        if errors:
            raise RuntimeError(f"fusion benchmark N={n_peers} {compression} failed: {errors}")
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
        if namespace is not None:
            leftovers = namespace.close()
    return summarize_fusion(collected, shapes, n_peers, compression, trials, wire_note, leftovers)


def summarize_fusion(collected, shapes, n_peers, compression, trials, wire_note, leftovers) -> dict:
    size_bytes = sum(torch.Size(shape).numel() for shape in shapes) * 4
    butterfly = 2 * (n_peers - 1) / n_peers * size_bytes
    per: dict[str, dict[str, list]] = {mode: {} for mode in ("ours", "raw")}
    failures: dict[str, list[str]] = {"ours": [], "raw": []}
    for trial in range(1, trials + 1):  # trial 0 is the warm-up
        for mode in ("ours", "raw"):
            rows = [next(r for r in peer["rows"] if r["trial"] == trial and r["mode"] == mode) for peer in collected]
            ok = all(row["ok"] is True for row in rows)
            failures[mode] += [f"trial {trial}: {row['ok']}" for row in rows if row["ok"] is not True]
            wire = rows[0]["wire_bytes_all_peers"]
            values = {  # per trial: the slowest peer sets the round time
                "allreduce": max(r["allreduce"] for r in rows) if ok else None,
                "call_to_result": max(r["call_to_result"] for r in rows) if ok else None,
                "wire_per_peer": wire / n_peers if ok and wire is not None else None,
                "payload_per_peer": statistics.mean(r["payload_bytes"] for r in rows) if ok else None,
            }
            for key, value in values.items():
                per[mode].setdefault(key, []).append(value)

    def ratios(key):  # paired: ours / raw within the same trial, where both arms fused on every peer
        pairs = zip(per["ours"][key], per["raw"][key], strict=True)
        return [o / r if o is not None and r is not None else None for o, r in pairs]

    def over_butterfly(mode, key):
        return [None if value is None else value / butterfly for value in per[mode][key]]

    def measured(values):
        return [value for value in values if value is not None]

    return {
        "peers": n_peers,
        "compression": compression,
        "body_bytes": size_bytes,
        "trials": trials,
        "first_arm_per_trial": [order_of(trial, "ours", "raw")[0] for trial in range(1, trials + 1)],
        "all_fused": not failures["ours"],
        "failures": failures,
        "ours_allreduce_seconds": spread(per["ours"]["allreduce"]),
        "raw_allreduce_seconds": spread(per["raw"]["allreduce"]),
        "ratio_allreduce": spread(ratios("allreduce")),
        "ours_call_to_result_seconds": spread(per["ours"]["call_to_result"]),
        "raw_call_to_result_seconds": spread(per["raw"]["call_to_result"]),
        "ratio_call_to_result": spread(ratios("call_to_result")),
        "wire_bytes": wire_note,
        "ours_wire_bytes_per_peer": spread(per["ours"]["wire_per_peer"]),
        "raw_wire_bytes_per_peer": spread(per["raw"]["wire_per_peer"]),
        "ours_payload_bytes_per_peer": spread(per["ours"]["payload_per_peer"]),
        "raw_payload_bytes_per_peer": spread(per["raw"]["payload_per_peer"]),
        "butterfly_minimum": butterfly,
        "ours_wire_vs_butterfly": spread(over_butterfly("ours", "wire_per_peer")),
        "raw_wire_vs_butterfly": spread(over_butterfly("raw", "wire_per_peer")),
        "ours_payload_vs_butterfly": spread(over_butterfly("ours", "payload_per_peer")),
        "idle_wire_bytes_per_second_per_peer": (
            None if collected[0]["idle_bytes_per_second"] is None else collected[0]["idle_bytes_per_second"] / n_peers
        ),
        "processes_left_in_namespace": leftovers,
        "per_trial": per,
        "per_trial_ratios": {
            "allreduce": measured(ratios("allreduce")),
            "call_to_result": measured(ratios("call_to_result")),
            "wire": measured(over_butterfly("ours", "wire_per_peer")),
            "payload": measured(over_butterfly("ours", "payload_per_peer")),
        },
    }


# ----------------------------------------------------------------------------- swarms
def run_swarm(model: str, n_peers: int, workdir: Path, **settings) -> list[dict]:
    """N real peer processes on loopback for a few rounds; returns every peer's round history."""
    from hivemind import DHT

    from coldfusion_p2p.contributor.checkpoints import read_history
    from coldfusion_p2p.swarm.records import RunKeys, swarm_validators

    run_id = f"bench-swarm-{workdir.name}"
    entry = DHT(start=True, host_maddrs=[LOOPBACK], record_validators=swarm_validators(RunKeys.from_run_id(run_id)))
    datasets = ["trec_question_type", "tweet_sentiment", "rotten_tomatoes_snippets", "sms_spam"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = []
    try:
        for index in range(n_peers):
            flags = {
                "dataset": str(DATA / datasets[index] / "train.csv"),
                "model": model,
                "run_id": run_id,
                "initial_peers": [str(a) for a in entry.get_visible_maddrs()],
                "host_maddrs": [LOOPBACK],
                "output_dir": str(workdir / f"peer{index}"),
                "torch_threads": 1,
                "min_group_size": n_peers,
                "matchmaking_time": 2.0,
                "request_timeout": 1.0,
                "quiet": True,
                "keep_checkpoints": 1,
                "seed": 0,
                **settings,
            }
            workdir.mkdir(parents=True, exist_ok=True)
            with open(workdir / f"peer{index}.log", "w") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "coldfusion_p2p.cli", "join", *as_flags(flags)],
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for process in processes:
            process.wait(timeout=1800)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        entry.shutdown()
    rows = [row for index in range(n_peers) for row in read_history(workdir / f"peer{index}")]
    if not rows:
        tail = (workdir / "peer0.log").read_text()[-2000:]
        raise RuntimeError(f"the {n_peers}-peer swarm in {workdir} completed no round; peer0 said:\n{tail}")
    return rows


def swarm_summary(rows: list[dict], n_peers: int, model: str) -> dict:
    rounds = [row for row in rows if row["round"] >= 2] or rows  # round 1 includes start-up skew
    round_seconds = [row["train_seconds"] + row["wait_seconds"] + row["fusion_seconds"] for row in rounds]
    return {
        "model": model,
        "peers": n_peers,
        "rounds": max(row["round"] for row in rows),
        "all_fused": all(row["outcome"] == "fused" and row["group_size"] == n_peers for row in rows),
        "round_seconds": statistics.mean(round_seconds),
        "fusion_seconds": statistics.mean(row["fusion_seconds"] for row in rounds),
        "fusion_share": statistics.mean(row["fusion_seconds"] for row in rounds) / statistics.mean(round_seconds),
        "peak_rss_mb": max(row.get("peak_rss_mb", 0.0) for row in rows),
        "accuracy_after": statistics.mean(
            row["accuracy_after"] for row in rows if row["round"] == max(r["round"] for r in rows)
        ),
    }


# ----------------------------------------------------------------------------- report
def fmt(value: dict | None, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    """``median (min-max)`` of a spread, or ``-`` when nothing was measured."""
    if value is None:
        return "-"
    low, mid, high = (value[key] / scale for key in ("min", "median", "max"))
    return f"{mid:.{digits}f}{suffix} ({low:.{digits}f}-{high:.{digits}f})"


def headline(rows: list[dict], key: str) -> dict | None:
    """The spread of a per-trial series pooled over several configurations (e.g. N = 2-4)."""
    return spread(value for row in rows for value in row["per_trial_ratios"][key])


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    h = results["headline"]
    fusion_peers = "/".join(str(row["peers"]) for row in results["fusion"] if row["compression"] == "none")
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min. "
        f"Load while running (1-minute load average at start/end): {results['load_average']}.",
        "",
        f"Every pair ran the same work in the same run, alternating which arm goes first, after one untimed "
        f"warm-up trial; values are **median (min-max)** over the measured trials ({results['settings']}).",
        "",
        "| figure | value: median (min-max) | goal |",
        "|---|---|---|",
        f"| fusion_vs_raw, all-reduce (group assembled -> result), fp32, N = {fusion_peers}, per-trial ratio "
        f"| {fmt(h['fusion_vs_raw'], suffix='x')} | <= 1.10x |",
        f"| fusion_vs_raw, call to result (matchmaking included), fp32, per-trial ratio "
        f"| {fmt(h['fusion_vs_raw_call_to_result'], suffix='x')} | - |",
        f"| bytes_vs_butterfly, wire bytes per peer / 2(N-1)/N*S, fp32 | {fmt(h['bytes_vs_butterfly'], suffix='x')} "
        "| - |",
        f"| bytes_vs_butterfly, wire, fp16 | {fmt(h['bytes_vs_butterfly_fp16'], suffix='x')} | - |",
        f"| (payload only: serialized tensor parts, fp32 / fp16) | {fmt(h['payload_vs_butterfly'], suffix='x')} / "
        f"{fmt(h['payload_vs_butterfly_fp16'], suffix='x')} | - |",
    ]
    for row in results["training"]:
        lines.append(
            f"| train_vs_plain, {row['model']}, per-trial ratio of samples/s | {fmt(row['ratio'], suffix='x')} "
            "| >= 0.95x |"
        )
    lines += [
        "",
        "## Fusion rounds",
        "",
        "Seconds per round (the slowest peer of each trial). *all-reduce*: from the moment the peer's group is "
        "assembled (hivemind's step stage turns RUNNING_ALLREDUCE) to the result; ours includes its "
        "validation and verdict exchange. *call to result*: from calling fuse()/step() with hivemind's "
        f"default schedule (now + matchmaking_time = {results['settings']['matchmaking_time']} s, the same in "
        "both arms) to the result: matchmaking included. Both arms: same tensors, DHT, timeouts and "
        "declare-state period; neither re-declares state inside the round. *raw* is hivemind 1.1.12's "
        "`DecentralizedAverager.step()`.",
        "",
        "| body MB | N | compr. | ours all-reduce s | raw all-reduce s | ratio | ours call->result s "
        "| raw call->result s | ratio | failed trials ours/raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["fusion"]:
        lines.append(
            f"| {row['body_bytes'] / 1e6:.1f} | {row['peers']} | {row['compression']} | "
            f"{fmt(row['ours_allreduce_seconds'])} | {fmt(row['raw_allreduce_seconds'])} | "
            f"{fmt(row['ratio_allreduce'])} | {fmt(row['ours_call_to_result_seconds'])} | "
            f"{fmt(row['raw_call_to_result_seconds'])} | {fmt(row['ratio_call_to_result'])} | "
            f"{len(row['failures']['ours'])}/{len(row['failures']['raw'])} |"
        )
    lines += [
        "",
        "## Bytes per peer per round",
        "",
        "*Wire*: the loopback `tx_bytes` of a network namespace holding only this swarm (all its peers' "
        "processes), over the window from just before the round to every peer having its result, divided "
        "by N: TCP/IP headers, libp2p framing, matchmaking, DHT stores and ACKs included. *Payload*: the "
        "serialized tensor parts alone (what the README's earlier figure counted). Butterfly minimum: "
        "2(N-1)/N * S, S = the fp32 body. Idle: the swarm's background traffic with no round running.",
        "",
        "| N | compr. | butterfly MB | ours wire MB | ours wire / butterfly | raw wire MB | ours payload MB "
        "| ours payload / butterfly | idle KB/s per peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["fusion"]:
        idle = row["idle_wire_bytes_per_second_per_peer"]
        lines.append(
            f"| {row['peers']} | {row['compression']} | {row['butterfly_minimum'] / 1e6:.1f} | "
            f"{fmt(row['ours_wire_bytes_per_peer'], 1e6, 1)} | {fmt(row['ours_wire_vs_butterfly'], digits=3)} | "
            f"{fmt(row['raw_wire_bytes_per_peer'], 1e6, 1)} | {fmt(row['ours_payload_bytes_per_peer'], 1e6, 1)} | "
            f"{fmt(row['ours_payload_vs_butterfly'], digits=3)} | {'-' if idle is None else f'{idle / 1e3:.1f}'} |"
        )
    lines += [
        "",
        "## Training",
        "",
        "Both loops: the same model init, the same batches in the same order (sha256 of every batch's token "
        "ids and labels below, asserted equal), cut by the same `collate` inside the timer, a fresh AdamW "
        "per round with the same settings, the same warm-up round.",
        "",
        "| model | steps x batch per trial | ours samples/s | plain loop samples/s | ratio | batches sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["training"]:
        lines.append(
            f"| {row['model']} | {row['steps_per_trial']} x {row['batch_size']} | "
            f"{fmt(row['ours_samples_per_second'], digits=1)} | {fmt(row['plain_samples_per_second'], digits=1)} | "
            f"{fmt(row['ratio'])} | `{row['batches_sha256'][:16]}` |"
        )
    if results.get("scaling"):
        lines += [
            "",
            "## Scaling (real peer processes on loopback; one run each, means of rounds >= 2, no spread)",
            "",
            "| model | peers | round s | fusion s | fusion share | peak RSS MB per peer | all fused |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["scaling"]:
            lines.append(
                f"| {row['model']} | {row['peers']} | {row['round_seconds']:.1f} | {row['fusion_seconds']:.1f} | "
                f"{100 * row['fusion_share']:.0f}% | {row['peak_rss_mb']:.0f} | {row['all_fused']} |"
            )
    if results.get("compression_accuracy"):
        accuracy = results["compression_accuracy"]
        lines += [
            "",
            f"Accuracy after fusion (mean of peers, same seeds, one run each): fp32 {100 * accuracy['fp32']:.1f}%, "
            f"fp16 {100 * accuracy['fp16']:.1f}% (difference {100 * accuracy['difference']:+.1f} points; "
            "goal within 0.5).",
        ]
    if results.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]]]
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    if results.get("scaling"):
        plot_scaling(results["scaling"], out / "scaling.png")


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, N = 2 and 3, no scaling swarms")
    parser.add_argument("--trials", type=int, default=5, help="measured trials per pair (after one warm-up)")
    parser.add_argument("--peers", type=int, nargs="+", default=None, help="fusion group sizes (default 2 3 4)")
    parser.add_argument("--tiny-steps", type=int, default=200, help="training steps per trial, tiny model")
    parser.add_argument("--minilm-steps", type=int, default=12, help="training steps per trial, MiniLM")
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--request-timeout", type=float, default=0.5)
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling and accuracy swarms")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    arguments = parser.parse_args()
    if arguments.trials < 1:
        parser.error("--trials must be at least 1")
    wall_started = time.monotonic()
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="coldfusion-bench-"))
    tiny = str(build_tiny_model(workdir / "tiny", "bert"))
    models = {"tiny": tiny} if arguments.quick else {"tiny": tiny, "minilm": resolve_model_name(None)}
    peers = arguments.peers or ([2, 3] if arguments.quick else [2, 3, 4])
    settings = {
        "trials": arguments.trials,
        "matchmaking_time": arguments.matchmaking_time,
        "request_timeout": arguments.request_timeout,
        "idle_seconds": 3.0,
    }
    results: dict = {
        "command": "python3 benchmarks/run.py" + "".join(f" {argument}" for argument in sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": settings,
        "notes": [],
    }
    if arguments.trials < 5:
        results["notes"].append(f"only {arguments.trials} measured trials per pair (--trials): fewer than the 5 asked")

    if (arguments.tiny_steps, arguments.minilm_steps) != (200, 12):
        results["notes"].append(
            f"training trials shortened to {arguments.tiny_steps} (tiny) / {arguments.minilm_steps} (MiniLM) "
            "steps (defaults 200 / 12) to shorten the run on the loaded machine"
        )
    print("training vs a plain loop ...", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    steps = {"tiny": arguments.tiny_steps, "minilm": arguments.minilm_steps}
    results["training"] = [bench_training(name, model, steps[name], arguments.trials) for name, model in models.items()]

    print("fusion vs raw hivemind, bytes on the wire vs butterfly ...", flush=True)
    body_model = load_classifier(models["minilm" if not arguments.quick else "tiny"], ["a", "b"], seed=0)
    shapes = [tuple(parameter.shape) for parameter in body_parameters(body_model)]
    del body_model
    results["fusion"] = []
    for n_peers in peers:
        for compression in ("none", "fp16"):
            print(f"  N = {n_peers}, {compression}", flush=True)
            results["fusion"].append(bench_fusion(shapes, n_peers, compression, arguments.trials, settings))
    by_compression = {c: [r for r in results["fusion"] if r["compression"] == c] for c in ("none", "fp16")}
    results["headline"] = {
        "fusion_vs_raw": headline(by_compression["none"], "allreduce"),
        "fusion_vs_raw_call_to_result": headline(by_compression["none"], "call_to_result"),
        "bytes_vs_butterfly": headline(by_compression["none"], "wire"),
        "bytes_vs_butterfly_fp16": headline(by_compression["fp16"], "wire"),
        "payload_vs_butterfly": headline(by_compression["none"], "payload"),
        "payload_vs_butterfly_fp16": headline(by_compression["fp16"], "payload"),
        "train_vs_plain": {row["model"]: row["ratio"] for row in results["training"]},
    }

    results["scaling"] = []
    if not arguments.no_scaling and not arguments.quick:
        print("scaling with real peers ...", flush=True)
        for name, model in models.items():
            swarm_steps = {"tiny": dict(local_steps=20, batch_size=16), "minilm": dict(local_steps=5, batch_size=16)}
            for n_peers in (2, 3, 4):
                rows = run_swarm(model, n_peers, workdir / f"{name}-{n_peers}", rounds=2, **swarm_steps[name])
                results["scaling"].append(swarm_summary(rows, n_peers, name))
        accuracy_model = models.get("minilm", tiny)
        fp = {}
        for compression in ("none", "fp16"):
            rows = run_swarm(
                accuracy_model,
                2,
                workdir / f"accuracy-{compression}",
                rounds=2,
                local_steps=10,
                batch_size=16,
                compression=compression,
            )
            fp[compression] = swarm_summary(rows, 2, "accuracy")["accuracy_after"]
        results["compression_accuracy"] = {
            "fp32": fp["none"],
            "fp16": fp["fp16"],
            "difference": fp["fp16"] - fp["none"],
        }
    results["wall_seconds"] = time.monotonic() - wall_started
    results["load_average"] = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
    write_report(results, Path(arguments.out))
    print((Path(arguments.out) / "latest.md").read_text())


if __name__ == "__main__":
    main()
