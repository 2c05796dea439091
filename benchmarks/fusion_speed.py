"""``fusion_vs_raw`` and ``bytes_vs_butterfly`` (``benchmarks/run.py``): one fusion round of ours against bare hivemind.

Each of N worker processes holds one DHT and both arms on it: our ``BodyFusion`` (all-or-nothing,
verdicts, validation) and ``BareAverager``, hivemind's ``DecentralizedAverager`` with the same
settings. Every trial runs both arms in alternating order, between barriers, so that all peers
start a round together and the loopback counters of the benchmark's network namespace (``wire.py``)
bracket exactly one round. ``bench_fusion`` starts the workers and ``summarize_fusion`` turns their
rows into spreads and per-trial ratios.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from common import LOOPBACK, order_of, spread
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip
from wire import NetNamespace, loopback_tx_bytes

from coldfusion_p2p.config import FusionConfig

BARRIER_SECONDS = 300.0  # every wait between the fusion workers is bounded by this


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


@dataclass
class _FusionArms:
    """One fusion worker's DHT and both arms on it, with what a trial needs to time them."""

    dht: Any
    fusion: Any  # ours: a BodyFusion, its averager's steps reported to ``watch``
    raw: BareAverager  # the baseline, on the same DHT, holding its own copy of the body
    raw_bytes: Any  # a shared counter: the serialized payload the baseline sent
    body: list[torch.Tensor]  # our body, fused in place
    generator: torch.Generator  # this peer's "training" updates
    watch: StageWatch  # when the running step's group was assembled
    config: FusionConfig
    matchmaking: float  # seconds from calling a step to its scheduled start (hivemind's default)
    step_timeout: float  # what fuse() gives its step with this schedule; the baseline gets the same


def _bare_averager(
    tensors, dht, prefix: str, config: FusionConfig, *, matchmaking, request, declare_state_period, compression
) -> BareAverager:
    """The baseline arm: hivemind's averager with the same timeouts and declare-state period as ours."""
    return BareAverager(
        tensors,
        dht,
        prefix=prefix,
        start=True,
        min_group_size=2,
        target_group_size=None,
        min_matchmaking_time=matchmaking,
        request_timeout=request,
        allreduce_timeout=config.allreduce_timeout,
        next_chunk_timeout=config.next_chunk_timeout,
        sender_timeout=config.next_chunk_timeout,
        reducer_timeout=2 * config.next_chunk_timeout,
        declare_state_period=declare_state_period,  # the same as ours
        compression=compression,
        shutdown_timeout=3,
    )


def _watch_steps(averager, watch: StageWatch) -> None:
    """Report every step of ``averager`` to ``watch``: fuse() calls step(wait=False), so watch its control."""
    step = averager.step

    def watched_step(*args, **kwargs):
        control = step(*args, **kwargs)
        watch.watch(control)
        return control

    averager.step = watched_step


def _build_arms(index, shapes, n_peers, compression, settings, maddrs_queue, initial) -> _FusionArms:
    """This worker's DHT (peer 0 hands its addresses to the others) and both arms, from the same body.

    Imports hivemind and the swarm code only here: after the worker entered its network namespace
    and set its threads, before any socket or child process, all of which inherit both."""
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
    raw_bytes = mp.Value("Q", 0)
    count_reducer_bytes(raw_bytes)  # before the baseline's averager process forks
    raw = _bare_averager(
        [tensor.clone() for tensor in body],
        dht,
        keys.prefix + "_raw",
        config,
        matchmaking=matchmaking,
        request=request,
        declare_state_period=fusion.averager.declare_state_period,
        compression=CountingCompression(COMPRESSIONS[compression](), raw_bytes),
    )
    watch = StageWatch()
    _watch_steps(fusion.averager, watch)
    return _FusionArms(
        dht=dht,
        fusion=fusion,
        raw=raw,
        raw_bytes=raw_bytes,
        body=body,
        generator=generator,
        watch=watch,
        config=config,
        matchmaking=matchmaking,
        step_timeout=matchmaking + 2 * request,  # = what fuse() gives its step with this schedule
    )


def _add_update(arms: _FusionArms, mode: str) -> None:
    """A fresh "training" update of the arm about to fuse, so that no round averages equal tensors."""
    with torch.no_grad():  # outside the timer
        if mode == "ours":
            for tensor in arms.body:
                tensor.add_(torch.randn(tensor.shape, generator=arms.generator) * 1e-3)
        else:
            with arms.raw.get_tensors() as tensors:
                for tensor in tensors:
                    tensor.add_(torch.randn(tensor.shape, generator=arms.generator) * 1e-3)


def _fuse_ours(arms: _FusionArms, trial: int, scheduled: float):
    """Our round: (True or the reason it did not fuse, payload bytes sent, the fusion result)."""
    result = arms.fusion.fuse(
        arms.body, round_number=trial + 1, scheduled_time=scheduled, weight=1.0, info={"round": trial + 1}
    )
    ok = True if result.fused else result.reason
    return ok, result.bytes_sent, result


def _step_raw(arms: _FusionArms, scheduled: float):
    """The baseline's round: (True or why it failed, payload bytes sent); a failure is a result, not an error."""
    ok = True
    before = arms.raw_bytes.value
    try:
        control = arms.raw.step(scheduled_time=scheduled, timeout=arms.step_timeout, allow_retries=False, wait=False)
        arms.watch.watch(control)
        if control.result(timeout=arms.step_timeout + arms.config.allreduce_timeout + 5.0) is None:
            ok = "no group"
    except Exception as error:  # hivemind raises several types: all mean "this round failed"
        ok = f"{type(error).__name__}: {error}"[:200]
    return ok, arms.raw_bytes.value - before


def _run_trial(arms: _FusionArms, trial: int, mode: str, index: int, namespace, barrier) -> dict:
    """One round of one arm on this peer, between barriers so the wire window brackets every peer's round."""
    _add_update(arms, mode)
    barrier.wait(timeout=BARRIER_SECONDS)
    tx_before = loopback_tx_bytes() if index == 0 and namespace is not None else None
    barrier.wait(timeout=BARRIER_SECONDS)
    arms.watch.began = None
    called = get_dht_time()
    scheduled = called + arms.matchmaking  # hivemind's default schedule, in both arms
    result = None
    if mode == "ours":
        ok, payload, result = _fuse_ours(arms, trial, scheduled)
    else:
        ok, payload = _step_raw(arms, scheduled)
    ended = get_dht_time()
    arms.watch.join()
    began = arms.watch.began
    barrier.wait(timeout=BARRIER_SECONDS)  # every peer is done: the window closes
    tx_after = loopback_tx_bytes() if tx_before is not None else None
    row = {
        "trial": trial,
        "mode": mode,
        "ok": ok,
        "call_to_result": ended - called,
        "allreduce": None if began is None else ended - began,
        "payload_bytes": payload,
        "wire_bytes_all_peers": None if tx_before is None else tx_after - tx_before,
    }
    if mode == "ours" and ok is True:  # as the peer does after a fused round: share it
        arms.fusion.publish_fused(trial + 1, arms.body, {"group_size": result.group_size})
    return row


def _measure_idle(index: int, namespace, settings: dict, barrier) -> float | None:
    """Background traffic of the idle swarm (DHT upkeep, declares), bytes/s, read by peer 0 between barriers."""
    idle = None
    barrier.wait(timeout=BARRIER_SECONDS)
    if index == 0 and namespace is not None:
        tx_before, started = loopback_tx_bytes(), time.monotonic()
        time.sleep(settings["idle_seconds"])
        idle = (loopback_tx_bytes() - tx_before) / (time.monotonic() - started)
    barrier.wait(timeout=BARRIER_SECONDS)
    return idle


def _fusion_worker(index, shapes, n_peers, compression, trials, settings, namespace, maddrs_queue, initial, barrier):
    """One peer of the fusion benchmark, in its own process: its rows of every trial, and the idle traffic."""
    if namespace is not None:  # before any socket or child process: all of them inherit it
        NetNamespace(namespace).enter()
    torch.set_num_threads(1)
    arms = _build_arms(index, shapes, n_peers, compression, settings, maddrs_queue, initial)
    rows = []
    for trial in range(trials + 1):  # trial 0: warm-up, both arms, dropped by the summary
        for mode in order_of(trial, "ours", "raw"):
            rows.append(_run_trial(arms, trial, mode, index, namespace, barrier))
    idle = _measure_idle(index, namespace, settings, barrier)
    arms.raw.shutdown()
    arms.fusion.shutdown()
    arms.dht.shutdown()
    return rows, idle


def _fusion_process(index, results, *args):
    """A worker process's body: its rows (or its error) to ``results``; a failing worker releases the others."""
    barrier = args[-1]
    try:
        rows, idle = _fusion_worker(index, *args)
        results.put({"index": index, "rows": rows, "idle_bytes_per_second": idle})
    except BaseException as error:
        barrier.abort()  # the others stop waiting for this one now, not after BARRIER_SECONDS
        results.put({"index": index, "error": f"{type(error).__name__}: {error}"})
        raise


def bench_fusion(shapes: list[tuple[int, ...]], n_peers: int, compression: str, trials: int, settings: dict) -> dict:
    """N fork-started workers in a network namespace of their own (when one can be made), then their summary."""
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
    """Per trial the slowest peer's times and the wire bytes per peer, both arms; spreads and paired ratios."""
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


def headline(rows: list[dict], key: str) -> dict | None:
    """The spread of a per-trial series pooled over several configurations (e.g. N = 2-4)."""
    return spread(value for row in rows for value in row["per_trial_ratios"][key])
