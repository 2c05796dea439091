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
only the record in :mod:`coldfusion_p2p.swarm.records` goes to the DHT.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT

from coldfusion_p2p.config import PeerConfig
from coldfusion_p2p.contributor.data import TaskData
from coldfusion_p2p.contributor.learner import build_learner
from coldfusion_p2p.contributor.model import (
    body_fingerprint,
    copy_into,
    model_fingerprint,
)
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.auth import InviteGate
from coldfusion_p2p.swarm.console import PeerConsole
from coldfusion_p2p.swarm.faults import FAULTS
from coldfusion_p2p.swarm.fusion import BodyFusion, FusionResult, finite_or_nan
from coldfusion_p2p.swarm.network import check_network_config, network_moderation, shut_down, start_dht
from coldfusion_p2p.swarm.presence import Identity, Presence
from coldfusion_p2p.swarm.process_safety import install as install_fork_hooks
from coldfusion_p2p.swarm.records import RecordBoard, RunKeys
from coldfusion_p2p.swarm.round_store import (
    RoundOwner,
    RoundReport,
    pre_fusion_audit,
    resume_checkpoint,
    save_round,
)

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
OUTCOME_REASONS = {"alone": "no other peer in the swarm", "missed": "the swarm fused this round without us"}


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
    meanwhile would inherit the blocked signals: :mod:`coldfusion_p2p.swarm.process_safety` unblocks them
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
        self.presence: Presence | None = None  # our record on the DHT, from setup() on
        self.dht: DHT | None = None
        self.fusion: BodyFusion | None = None
        self.board: RecordBoard | None = None
        self.reports: list[RoundReport] = []
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
        identity = Identity(
            dataset_name=self.data.name,
            num_examples=len(self.data.train),
            total_steps=config.training.local_steps,
            model_fingerprint=self.model_fingerprint,
            invite=self.moderation.invite.encode() if self.moderation is not None else "",
        )
        self.presence = Presence(identity, config.network.record_period, self.stop_event)
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
        self.fusion.publish_fused(self.presence.progress.fused_round, self.body, self._snapshot_metadata())
        self.console.joined(self.fusion.peer_id, self.dht.get_visible_maddrs(), self.data, self.keys.run_id)
        self._check_compatible()  # before publishing anything: a stranger must not disturb the swarm
        self.presence.start(self.board, self.fusion.peer_id)

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
        resumed = resume_checkpoint(self.config.run, self.data.label_names, self.model, self.body, self.rule.has_state)
        if resumed is None:
            return
        self._resumed_state = resumed.fusion_state
        # announce the group size too: a peer that missed the round downloads only a base fused in a group
        self.presence.update(fused_round=resumed.round, round=resumed.round + 1, last_group_size=resumed.group_size)
        self.console.info(f"resumed from {resumed.path} (round {resumed.round})")

    # ---------------------------------------------------------------- the loop
    def run(self) -> list[RoundReport]:
        """Run rounds until ``--rounds`` is reached or a stop is requested; returns the round reports."""
        if self.dht is None:
            self.setup()
        self.catch_up(reason="joining")
        while not self._should_stop():
            report = self.run_round(self.presence.progress.fused_round + 1)
            if report is None:  # stopped mid-round: the last checkpoint stays as it was
                break
            self.reports.append(report)
            self.console.round_summary(report)
        self.wait_for_archivers()
        self.presence.update(status="stopped", fuse_at=None)
        self.presence.publish()
        return self.reports

    def wait_for_archivers(self) -> None:
        """Before leaving, keep serving our last fused base until archivers have stored it (bounded)."""
        self.presence.wait_for_archivers(self.config.fusion.state_download_timeout)

    def _should_stop(self) -> bool:
        return self.stop_event.is_set() or policy.rounds_done(
            self.presence.progress.fused_round, self.config.run.rounds
        )

    def _behind_swarm(self, round_number: int) -> bool:
        """Stop training early when asked to, or when the swarm already fused this round without us
        (e.g. we were frozen): the round is lost anyway, and the sooner we catch up the sooner we
        are back in the swarm's current round instead of chasing it one stale round after another."""
        return self.stop_event.is_set() or self.presence.swarm_fused_round >= round_number

    def run_round(self, round_number: int) -> RoundReport | None:
        """Train, evaluate, fuse (or not), evaluate, checkpoint; None when stopped mid-round."""
        self.presence.update(status="training", round=round_number, step=0, fuse_at=None)
        with self.console.training(round_number, self.config.training.local_steps) as on_step:
            stats = self.trainer.train_round(
                round_number, on_step=self._on_step(on_step), should_stop=lambda: self._behind_swarm(round_number)
            )
        if self.stop_event.is_set():
            return None
        before = self.trainer.evaluate()
        self.presence.update(
            train_loss=finite_or_nan(stats.loss),
            accuracy_before=before.accuracy,
            samples_per_second=stats.samples_per_second,
        )
        pre_fusion = pre_fusion_audit(self.model, self.body) if self.config.run.save_local_body else None

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
            self.presence.update(status="fusing")
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
        """See :meth:`Presence.wait_for_fusion_window`."""
        return self.presence.wait_for_fusion_window(round_number, self.config.fusion)

    def catch_up(self, reason: str, min_round: int | None = None) -> bool:
        """Download the swarm's newest fused base if it is ahead of ours; bounded in time.

        ``min_round`` is set right after a missed or failed fusion of that round: then wait (bounded)
        for the others to finish it, and download only a base they really fused in a group.
        """
        deadline = time.monotonic() + self.config.fusion.state_download_timeout
        if min_round is not None:  # no longer "fusing": the others must not wait for us while we wait for them
            self.presence.update(status="downloading", fuse_at=None)
            self.presence.publish()
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            target = self.presence.round_to_download(min_round, deadline)
            if target is None:
                return False
            self.presence.update(status="downloading", fuse_at=None)
            self.presence.publish()
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
        save_round(
            self.config,
            RoundOwner(self.fusion.peer_id, self.data, self.model_name, self.model, self.tokenizer, self.body),
            report,
            fusion_state=self.fusion.state,
            pre_fusion=pre_fusion,
            fingerprint=fingerprint,
        )
        self.presence.update(
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
        self.presence.publish()

    # ---------------------------------------------------------------- records
    def _on_step(self, console_callback):
        def on_step(step: int, loss: float) -> None:
            self.presence.update(step=step, train_loss=finite_or_nan(loss))
            console_callback(step, loss)

        return on_step

    def _snapshot_metadata(self) -> dict[str, Any]:
        return {"group_size": 0, "peer_ids": [], "fingerprint": body_fingerprint(self.body)}

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Leave the swarm: stop publishing, then shut the averager and the DHT down."""
        self.stop_event.set()
        if self.presence is not None:
            self.presence.stop()
        shut_down(self.fusion, self.dht)
