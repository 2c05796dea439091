"""The peer daemon: finetune locally, fuse bodies with the swarm, checkpoint, repeat.

``Peer.run()`` reads top to bottom as the ColD Fusion loop::

    join the swarm; catch up with its newest fused base
    for each round r:
        finetune local_steps from the fused body      (trainer.py, no networking)
        evaluate                                      -> accuracy before fusion
        agree on a fusion time and fuse the bodies    (policy.py decides, fusion.py does)
        evaluate                                      -> accuracy after fusion
        checkpoint atomically                         (checkpoints.py)

The peer's data and head never leave this process; only body tensors go to the all-reduce and
only the record in :mod:`coldfusion_p2p.records` goes to the DHT.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT
from hivemind.utils import get_dht_time

from coldfusion_p2p import __version__, policy
from coldfusion_p2p.auth import InviteGate
from coldfusion_p2p.checkpoints import (
    append_history,
    apply_body_state,
    latest_checkpoint,
    load_body_state,
    load_fusion_state,
    load_head,
    save_checkpoint,
)
from coldfusion_p2p.config import PeerConfig
from coldfusion_p2p.console import PeerConsole
from coldfusion_p2p.data import TaskData
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.faults import FAULTS
from coldfusion_p2p.fusion import BodyFusion, FusionResult, finite_or_nan
from coldfusion_p2p.learner import build_learner
from coldfusion_p2p.model import (
    body_fingerprint,
    body_state_names,
    copy_into,
    head_state,
    load_head_state,
    model_fingerprint,
)
from coldfusion_p2p.network import check_network_config, network_moderation, shut_down, start_dht
from coldfusion_p2p.process_safety import install as install_fork_hooks
from coldfusion_p2p.records import PeerRecord, RecordBoard, RunKeys
from coldfusion_p2p.rules import FusionRule

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
PRE_FUSION_FILE = "pre_fusion.safetensors"  # written with --save-local-body
OUTCOME_REASONS = {"alone": "no other peer in the swarm", "missed": "the swarm fused this round without us"}


@dataclass
class RoundReport:
    """What one round did; saved in the checkpoint's round.json and shown on the console."""

    round: int
    outcome: str  # fused | alone | failed | synced
    group_size: int
    peer_ids: list[str]
    train_loss: float | None
    accuracy_before: float | None
    accuracy_after: float | None  # after fusion and the head re-fit (the head this peer goes on with)
    train_seconds: float
    wait_seconds: float
    fusion_seconds: float
    samples_per_second: float
    reason: str = ""
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_sent: int = 0  # serialized bytes this peer sent in the all-reduce
    peak_rss_mb: float = 0.0  # peak resident memory of this peer's main process so far
    accuracy_after_old_head: float | None = None  # after fusion, before the head re-fit
    majority_rate: float | None = None  # validation accuracy of always answering the most common label


@dataclass
class _Progress:
    """The mutable state behind this peer's DHT record (guarded by ``Peer._lock``)."""

    status: str = "starting"
    round: int = 1
    fused_round: int = 0
    step: int = 0
    train_loss: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    samples_per_second: float = 0.0
    last_group_size: int = 0
    last_fusion_seconds: float = 0.0
    fuse_at: float | None = None
    fingerprint: str = ""
    last_outcome: str = ""
    last_reason: str = ""


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while hivemind starts its processes, then deliver them.

    hivemind shares tensors through torch's shared-memory manager while it starts; a signal that
    interrupts that call left the peer hanging for good (seen in the soak test). Deferred, the
    signal is handled a moment later by the usual stop handlers. The processes hivemind forks
    meanwhile would inherit the blocked signals: :mod:`coldfusion_p2p.process_safety` unblocks them
    in each child (and makes the children die with this process).
    """
    install_fork_hooks()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class Peer:
    """One volunteer in a ColD Fusion swarm.

    >>> peer = Peer(build_config({"dataset": "reviews.csv", "initial_peers": [...], "rounds": 5}))
    >>> try:
    ...     reports = peer.run()
    ... finally:
    ...     peer.shutdown()
    """

    def __init__(self, config: PeerConfig, stop_event: threading.Event | None = None):
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.keys = RunKeys.from_run_id(config.network.run_id)
        self.console = PeerConsole(quiet=config.logging.quiet, log_format=config.logging.log_format)
        self._lock = threading.Lock()
        self._progress = _Progress()
        self.dht: DHT | None = None
        self.fusion: BodyFusion | None = None
        self.board: RecordBoard | None = None
        self._publisher: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self.reports: list[RoundReport] = []
        self._swarm_fused_round = 0  # the newest round another peer fused, as last seen by the publisher
        self.moderation = None

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        config = self.config
        check_network_config(config.network)  # a typo in an address should not wait for model loading
        self.moderation = network_moderation(config.network)  # ... nor a bad invite
        if config.training.torch_threads:
            torch.set_num_threads(config.training.torch_threads)
        learner = build_learner(config)  # as the simulator builds its contributors: the same rows, head, batches
        self.data: TaskData = learner.data
        self.model_name, self.tokenizer, self.model = learner.model_name, learner.tokenizer, learner.model
        self.body, self.trainer = learner.body, learner.trainer
        self.model_fingerprint = model_fingerprint(self.model)  # of --model itself, before any resume
        self.rule = FusionRule.from_config(config.fusion)
        # the anchor pulls toward --model's own body, whatever a resume or a download brings later
        self._original_body = [tensor.detach().clone() for tensor in self.body] if self.rule.needs_original else None
        self._resumed_state: list[torch.Tensor] | None = None  # the fusion rule's state from --resume
        self._resume_local_checkpoint()
        with signals_deferred():
            self.dht = start_dht(config.network, self.keys, moderation=self.moderation)
        self.board = RecordBoard(self.dht, self.keys)
        with signals_deferred():
            self.fusion = self._start_fusion()
        self.fusion.publish_fused(self._progress.fused_round, self.body, self._snapshot_metadata())
        self.console.joined(self.fusion.peer_id, self.dht.get_visible_maddrs(), self.data, self.keys.run_id)
        self._check_compatible()  # before publishing anything: a stranger must not disturb the swarm
        self._publisher = threading.Thread(target=self._publish_periodically, name="record-publisher", daemon=True)
        self._publisher.start()
        # apart from the publisher: a slow DHT read must never delay our record past its expiration
        self._watcher = threading.Thread(target=self._watch_swarm, name="swarm-watcher", daemon=True)
        self._watcher.start()

    def _start_fusion(self) -> BodyFusion:
        config = self.config
        return BodyFusion(
            self.dht,
            self.body,
            prefix=self.keys.averager_prefix(self.model_fingerprint),
            config=config.fusion,
            board=self.board,
            gate=None if self.moderation is None else InviteGate(self.dht, self.keys.records_key, self.moderation),
            should_stop=self.stop_event.is_set,
            rule=self.rule,
            original=self._original_body,
            state=self._resumed_state,
        )

    def _check_compatible(self) -> None:
        """A newcomer with another model gets a clear error instead of silently forming its own swarm."""
        everyone_else = policy.others(self.board.fetch(), self.board.subkey)
        theirs = policy.incompatible_swarm(everyone_else, self.model_fingerprint)
        if theirs is not None:
            raise UserError(
                f"this swarm (run {self.keys.run_id!r}) fuses a different model (fingerprint {theirs}, "
                f"yours {self.model_fingerprint}: another architecture, shapes or starting weights)",
                "pass the --model the swarm started from, or another --run-id",
            )

    def _resume_local_checkpoint(self) -> None:
        """With ``--resume``, start from our checkpoint; without it, refuse to overwrite one."""
        checkpoint = latest_checkpoint(self.config.run.output_dir)
        if checkpoint is None:
            return
        if not self.config.run.resume:
            raise UserError(
                f"{self.config.run.output_dir} already holds a checkpoint (round {checkpoint.round})",
                "pass --resume to continue from it, or choose another --output-dir",
            )
        head, label_names = load_head(checkpoint.path)
        if label_names != self.data.label_names:
            raise UserError(
                f"the dataset's labels {self.data.label_names} differ from the checkpoint's {label_names}",
                "use the dataset the checkpoint was trained on, or a fresh --output-dir",
            )
        if self.rule.has_state:  # before touching the model: a refused resume leaves everything as it was
            shapes = [tensor.shape for tensor in self.body]
            self._resumed_state = load_fusion_state(checkpoint.path, body_state_names(self.model), shapes)
        apply_body_state(self.model, load_body_state(checkpoint.path))
        load_head_state(self.model, head)
        group_size = int((checkpoint.metadata.get("report") or {}).get("group_size", 0))
        # announce the group size too: a peer that missed the round downloads only a base fused in a group
        self._update(fused_round=checkpoint.round, round=checkpoint.round + 1, last_group_size=group_size)
        self.console.info(f"resumed from {checkpoint.path} (round {checkpoint.round})")

    # ---------------------------------------------------------------- the loop
    def run(self) -> list[RoundReport]:
        """Run rounds until ``--rounds`` is reached or a stop is requested; returns the round reports."""
        if self.dht is None:
            self.setup()
        self.catch_up(reason="joining")
        while not self._should_stop():
            report = self.run_round(self._progress.fused_round + 1)
            if report is None:  # stopped mid-round: the last checkpoint stays as it was
                break
            self.reports.append(report)
            self.console.round_summary(report)
        self.wait_for_archivers()
        self._update(status="stopped", fuse_at=None)
        self._publish()
        return self.reports

    def wait_for_archivers(self) -> None:
        """Before leaving, keep serving our last fused base until archivers have stored it (bounded)."""
        deadline = time.monotonic() + self.config.fusion.state_download_timeout
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if not policy.archivers_behind(self.board.fetch().values(), self._progress.fused_round):
                return
            self.stop_event.wait(POLL_SECONDS)

    def _should_stop(self) -> bool:
        return self.stop_event.is_set() or policy.rounds_done(self._progress.fused_round, self.config.run.rounds)

    def _behind_swarm(self, round_number: int) -> bool:
        """Stop training early when asked to, or when the swarm already fused this round without us
        (e.g. we were frozen): the round is lost anyway, and the sooner we catch up the sooner we
        are back in the swarm's current round instead of chasing it one stale round after another."""
        return self.stop_event.is_set() or self._swarm_fused_round >= round_number

    def run_round(self, round_number: int) -> RoundReport | None:
        """Train, evaluate, fuse (or not), evaluate, checkpoint; None when stopped mid-round."""
        self._update(status="training", round=round_number, step=0, fuse_at=None)
        with self.console.training(round_number, self.config.training.local_steps) as on_step:
            stats = self.trainer.train_round(
                round_number, on_step=self._on_step(on_step), should_stop=lambda: self._behind_swarm(round_number)
            )
        if self.stop_event.is_set():
            return None
        before = self.trainer.evaluate()
        self._update(
            train_loss=finite_or_nan(stats.loss),
            accuracy_before=before.accuracy,
            samples_per_second=stats.samples_per_second,
        )
        pre_fusion = self._pre_fusion_audit() if self.config.run.save_local_body else None

        waited = time.perf_counter()
        outcome, result = self.fuse_round(round_number)
        if outcome == "stop":
            return None
        if outcome in ("failed", "missed") and self.catch_up(f"round {round_number} {outcome}", round_number):
            outcome = "synced"
        fused = result is not None and result.fused
        new_body = outcome in ("fused", "synced")
        after_old_head = self.trainer.evaluate().accuracy if new_body else None
        if new_body and outcome != "synced":  # a synced round was re-fitted when it was downloaded
            self.trainer.refit_head(round_number)
        report = RoundReport(
            round=round_number,
            outcome=outcome,
            group_size=result.group_size if fused else 1,
            peer_ids=list(result.peer_ids) if fused else [self.fusion.peer_id],
            train_loss=finite_or_nan(stats.loss),
            accuracy_before=before.accuracy,
            accuracy_after=self.trainer.evaluate().accuracy if new_body else before.accuracy,
            accuracy_after_old_head=after_old_head,
            majority_rate=self.trainer.majority_rate(),
            train_seconds=stats.seconds,
            wait_seconds=time.perf_counter() - waited - (result.seconds if result is not None else 0.0),
            fusion_seconds=result.seconds if result is not None else 0.0,
            samples_per_second=stats.samples_per_second,
            reason=result.reason if result is not None else OUTCOME_REASONS.get(outcome, ""),
            members=result.gathered if fused else {},
            bytes_sent=result.bytes_sent if result is not None else 0,
            peak_rss_mb=peak_rss_mb(),
        )
        if outcome != "synced":  # a synced round already checkpointed the downloaded base
            self._complete_round(round_number, report, pre_fusion)
        return report

    def fuse_round(self, round_number: int) -> tuple[str, FusionResult | None]:
        """Wait for the round's fusion window, then all-reduce: ``(outcome, result)``.

        Outcomes: ``fused``, ``failed`` or ``rejected`` (kept own body; rejected: the average failed
        validation), ``alone``, ``missed`` (the swarm fused without us), ``stop``.
        """
        with self.console.fusing(round_number) as set_stage:
            decision, scheduled_time = self.wait_for_fusion_window(round_number)
            if decision != "fuse":
                return decision, None
            set_stage("all-reducing the bodies")
            self._update(status="fusing")
            FAULTS.poison_update(self.body, self.fusion.averager.last_fused_body())  # tests only
            result = self.fusion.fuse(
                self.body,
                round_number=round_number,
                scheduled_time=scheduled_time,
                weight=policy.fusion_weight(self.config.fusion.weighting, len(self.data.train)),
                info={
                    "round": round_number,
                    "dataset": self.data.name,
                    "examples": len(self.data.train),
                    "update_bound": policy.adam_update_bound(
                        self.config.training.lr,
                        self.config.training.local_steps,
                        sum(tensor.numel() for tensor in self.body),
                    ),
                },
            )
        return ("fused" if result.fused else "rejected" if result.rejected else "failed"), result

    def wait_for_fusion_window(self, round_number: int) -> tuple[str, float]:
        """Publish readiness, then wait for the round's fusion time (see :mod:`policy`).

        Returns ``("fuse", time)``, ``("alone", 0)``, ``("missed", 0)`` or ``("stop", 0)``.
        Bounded: the earliest proposal is at most ``fusion_window`` away.
        """
        fusion_config = self.config.fusion
        proposal = get_dht_time() + fusion_config.fusion_window
        self._update(status="ready", fuse_at=proposal)
        self._publish()
        while not self.stop_event.is_set():
            records = self.board.fetch()
            others = policy.others(records, self.board.subkey, self.model_fingerprint)
            if policy.missed_round(round_number, others):
                return "missed", 0.0
            everyone = [*others, self._record()]
            scheduled = policy.fusion_time(everyone, round_number)
            now = get_dht_time()
            if not policy.has_partners(others, round_number):
                if fusion_config.min_group_size <= 1 or now >= scheduled:
                    return "alone", 0.0
            elif now >= scheduled - fusion_config.matchmaking_time:
                return "fuse", scheduled
            elif policy.everyone_ready(everyone, round_number, fusion_config.min_group_size):
                proposal = now + fusion_config.matchmaking_time  # the whole swarm is here: close the window
                self._update(fuse_at=proposal)
                self._publish()
                return "fuse", min(scheduled, proposal)
            self.stop_event.wait(POLL_SECONDS)
        return "stop", 0.0

    def catch_up(self, reason: str, min_round: int | None = None) -> bool:
        """Download the swarm's newest fused base if it is ahead of ours; bounded in time.

        ``min_round`` is set right after a missed or failed fusion of that round: then wait (bounded)
        for the others to finish it, and download only a base they really fused in a group.
        """
        deadline = time.monotonic() + self.config.fusion.state_download_timeout
        if min_round is not None:  # no longer "fusing": the others must not wait for us while we wait for them
            self._update(status="downloading", fuse_at=None)
            self._publish()
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            others = policy.others(self.board.fetch(), self.board.subkey, self.model_fingerprint)
            if min_round is None:
                target = policy.swarm_fused_round(others)
                if target <= self._progress.fused_round:
                    return False
            else:
                if policy.still_fusing(others, min_round):
                    self.stop_event.wait(POLL_SECONDS)
                    continue
                target = policy.fused_without_us(others, min_round)
                if target is None:
                    return False
            self._update(status="downloading", fuse_at=None)
            self._publish()
            state = self.fusion.download_fused(target, self.body, timeout=max(1.0, deadline - time.monotonic()))
            if state is None:
                self.stop_event.wait(POLL_SECONDS)
                continue
            copy_into(self.body, state.tensors)
            self.fusion.state = state.state  # the fusion rule's state (outer momentum) travels with the base
            self.trainer.refit_head(state.round)  # our old head does not fit the downloaded base
            report = RoundReport(
                round=state.round,
                outcome="synced",
                group_size=int(state.source.get("group_size", 0)),
                peer_ids=list(state.source.get("peer_ids", [])),
                train_loss=None,
                accuracy_before=None,
                accuracy_after=None,
                train_seconds=0.0,
                wait_seconds=0.0,
                fusion_seconds=0.0,
                samples_per_second=0.0,
                reason=f"downloaded the swarm's fused base ({reason})",
            )
            self._complete_round(state.round, report, None)
            self.console.info(f"caught up with the swarm: fused base of round {state.round} ({reason})")
            return True
        return False

    def _pre_fusion_audit(self) -> dict[str, torch.Tensor]:
        """This round's body and head before fusion, saved with ``--save-local-body`` for audits."""
        body = {
            f"body.{name}": tensor.detach().clone()
            for name, tensor in zip(body_state_names(self.model), self.body, strict=True)
        }
        head = {f"head.{name}": tensor for name, tensor in head_state(self.model).items()}
        return {**body, **head}

    def _complete_round(
        self, round_number: int, report: RoundReport, pre_fusion: dict[str, torch.Tensor] | None
    ) -> None:
        """Adopt ``self.body`` as the fused base of ``round_number``: share it, checkpoint it, announce it."""
        fingerprint = body_fingerprint(self.body)
        metadata = {
            "group_size": report.group_size,
            "peer_ids": report.peer_ids,
            "members": report.members,
            "fingerprint": fingerprint,
        }
        self.fusion.publish_fused(round_number, self.body, metadata)
        extra = None if pre_fusion is None else {PRE_FUSION_FILE: pre_fusion}
        names = body_state_names(self.model)
        fusion_state = dict(zip(names, self.fusion.state, strict=True)) if self.fusion.state else None
        save_checkpoint(
            self.config.run.output_dir,
            round_number=round_number,
            model=self.model,
            tokenizer=self.tokenizer,
            head=head_state(self.model),
            label_names=self.data.label_names,
            metadata={
                "peer_id": self.fusion.peer_id,
                "dataset": self.data.name,
                "examples": len(self.data.train),
                "report": report.__dict__,
                "fingerprint": fingerprint,
                "model": self.model_name,
                "config": self.config.to_dict(),
                "version": __version__,
                "time": time.time(),
            },
            keep=self.config.run.keep_checkpoints,
            extra_files=extra,
            fusion_state=fusion_state,
        )
        append_history(
            self.config.run.output_dir, {"peer_id": self.fusion.peer_id, "dataset": self.data.name, **report.__dict__}
        )
        self._update(
            status="idle",
            fused_round=round_number,
            round=round_number + 1,
            accuracy_after=report.accuracy_after,
            last_group_size=report.group_size,
            last_fusion_seconds=report.fusion_seconds,
            fuse_at=None,
            fingerprint=fingerprint,
            last_outcome=report.outcome,
            last_reason=report.reason[:200],
        )
        self._publish()

    # ---------------------------------------------------------------- records
    def _on_step(self, console_callback):
        def on_step(step: int, loss: float) -> None:
            self._update(step=step, train_loss=finite_or_nan(loss))
            console_callback(step, loss)

        return on_step

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._progress, name, value)

    def _record(self) -> PeerRecord:
        with self._lock:
            progress = self._progress
            return PeerRecord(
                peer_id=self.fusion.peer_id if self.fusion is not None else "",
                dataset_name=self.data.name[:128],
                num_examples=len(self.data.train),
                status=progress.status,
                round=progress.round,
                fused_round=progress.fused_round,
                step=progress.step,
                total_steps=self.config.training.local_steps,
                train_loss=progress.train_loss,
                accuracy_before=progress.accuracy_before,
                accuracy_after=progress.accuracy_after,
                samples_per_second=float(progress.samples_per_second),
                last_group_size=progress.last_group_size,
                last_fusion_seconds=float(progress.last_fusion_seconds),
                fuse_at=progress.fuse_at,
                last_outcome=progress.last_outcome,
                last_reason=progress.last_reason,
                body_fingerprint=progress.fingerprint,
                model_fingerprint=self.model_fingerprint,
                version=__version__,
                invite=self.moderation.invite.encode() if self.moderation is not None else "",
                time=get_dht_time(),
            )

    def _publish(self) -> None:
        try:
            self.board.publish(self._record(), ttl=self._record_ttl())
        except Exception as error:  # a DHT hiccup must not kill a training peer; the next refresh retries
            logger.debug("publishing the record failed: %r", error)

    def _record_ttl(self) -> float:
        return max(3 * self.config.network.record_period, 3.0)

    def _publish_periodically(self) -> None:
        while not self.stop_event.wait(self.config.network.record_period):
            self._publish()

    def _watch_swarm(self) -> None:
        """Keep ``_swarm_fused_round`` fresh, so that training notices when the swarm left us behind."""
        while not self.stop_event.wait(self.config.network.record_period):
            try:
                others = policy.others(self.board.fetch(), self.board.subkey, self.model_fingerprint)
            except Exception as error:  # like publishing: a DHT hiccup only delays the news
                logger.debug("fetching the records failed: %r", error)
                continue
            self._swarm_fused_round = policy.swarm_fused_round(others)

    def _snapshot_metadata(self) -> dict[str, Any]:
        return {"group_size": 0, "peer_ids": [], "fingerprint": body_fingerprint(self.body)}

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Leave the swarm: stop publishing, then shut the averager and the DHT down."""
        self.stop_event.set()
        for thread in (self._publisher, self._watcher):
            if thread is not None:
                thread.join(timeout=5)
        if self.board is not None:
            self._update(status="stopped", fuse_at=None)
            self._publish()
        shut_down(self.fusion, self.dht)
