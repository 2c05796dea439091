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
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
from coldfusion_p2p.contributor.scalars import ScalarLog
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm import policy, reachability, windows
from coldfusion_p2p.swarm.auth import InviteGate
from coldfusion_p2p.swarm.console import PeerConsole
from coldfusion_p2p.swarm.faults import FAULTS
from coldfusion_p2p.swarm.fusion import BodyFusion, FusionResult, finite_or_nan
from coldfusion_p2p.swarm.network import check_network_config, network_moderation, shut_down
from coldfusion_p2p.swarm.presence import Identity, Presence
from coldfusion_p2p.swarm.process_safety import install as install_fork_hooks
from coldfusion_p2p.swarm.records import RecordBoard, RunKeys
from coldfusion_p2p.swarm.round_store import (
    RoundOwner,
    RoundReport,
    pre_fusion_audit,
    resume_checkpoint,
    round_report,
    save_round,
)

logger = logging.getLogger(__name__)


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


def fusion_info(config: PeerConfig, data: TaskData, body: list[torch.Tensor], round_number: int) -> dict:
    """What a peer tells its group with its body: the others' verdicts and guard read it."""
    parameters = sum(tensor.numel() for tensor in body)
    return {
        "round": round_number,
        "dataset": data.name,
        "license": config.data.dataset_license,  # for the fused base's model card
        "examples": len(data.train),
        "update_bound": policy.adam_update_bound(config.training.lr, config.training.local_steps, parameters),
    }


def step_recorder(peer: Peer, round_number: int, console_callback):
    """What each training step reports: the peer's record, its scalars (--report-to) and the console."""

    def on_step(step: int, loss: float) -> None:
        peer.presence.update(step=step, train_loss=finite_or_nan(loss))
        peer.scalars.step(round_number, step, loss)
        console_callback(step, loss)

    return on_step


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
        self.scalars: ScalarLog | None = None  # --report-to, from setup() on

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
        self.presence = Presence(self._identity(""), config.network.record_period, self.stop_event)
        report_dir = config.logging.tensorboard_dir or str(Path(config.run.output_dir) / "tensorboard")
        self.scalars = ScalarLog(config.logging.report_to, report_dir, config.training.local_steps)
        self.rule = FusionRule.from_config(config.fusion)
        # --model's own body, whatever a resume or a download brings later: the anchor pulls toward it,
        # lossy compression sends the drift from it
        needs_original = self.rule.needs_original or policy.contribution_kind(config.fusion.compression) == "drift"
        self._original_body = [tensor.detach().clone() for tensor in self.body] if needs_original else None
        self._resumed_state: list[torch.Tensor] | None = None  # the fusion rule's state from --resume
        self._resume_local_checkpoint()
        with signals_deferred():
            self.dht, self.mode = reachability.join(config.network, self.keys, moderation=self.moderation)
        self.board = RecordBoard(self.dht, self.keys)
        gate = None if self.moderation is None else InviteGate(self.dht, self.keys.records_key, self.moderation)
        with signals_deferred():
            self.fusion = BodyFusion(
                self.dht,
                self.body,
                prefix=self.keys.averager_prefix(self.model_fingerprint),
                config=config.fusion,
                board=self.board,
                gate=gate,
                should_stop=self.stop_event.is_set,
                rule=self.rule,
                original=self._original_body,
                state=self._resumed_state,
                client_mode=self.mode.averager_client_mode,
            )
        alone = {"group_size": 0, "peer_ids": [], "fingerprint": body_fingerprint(self.body)}
        self.fusion.publish_fused(self.presence.progress.fused_round, self.body, alone)
        addresses, reachable = self.dht.get_visible_maddrs(), self.mode.name == "public"
        device = f"{self.trainer.device} in {config.training.precision}"
        self.console.joined(self.fusion.peer_id, addresses, self.data, self.keys.run_id, reachable, device)
        self._adopt_mode(self.mode)
        if self.mode.awaiting_relay:  # its slot comes minutes later: then the record and the console say so
            reachability.watch_relay(self.dht, self.stop_event, self._adopt_mode)
        self.presence.check_compatible(self.board, self.keys.run_id)  # before publishing: strangers stay out
        self.presence.start(self.board, self.fusion.peer_id, self.config.network.initial_peers)

    def _adopt_mode(self, mode: reachability.Mode) -> None:
        """Our mode, in our record (the monitor's column) and in the console's one line."""
        self.mode = mode
        self.presence.identity = self._identity(mode.name)
        self.console.reachability(mode)

    def _identity(self, mode: str) -> Identity:
        invite = self.moderation.invite.encode() if self.moderation is not None else ""
        steps = self.config.training.local_steps
        device = f"{self.trainer.device} {self.config.training.precision}"  # the record's, e.g. "cuda:0 bf16"
        return Identity(self.data.name, len(self.data.train), steps, self.model_fingerprint, invite, mode, device)

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
        while not self.presence.done(self.config.run.rounds):
            report = self.run_round(self.presence.progress.fused_round + 1)
            if report is None:  # stopped mid-round: the last checkpoint stays as it was
                break
            self.reports.append(report)
            self.console.round_summary(report)
            self.scalars.round(report)
        # before leaving, keep serving our last fused base until archivers have stored it (bounded)
        self.presence.wait_for_archivers(self.config.fusion.state_download_timeout)
        self.presence.announce(status="stopped", fuse_at=None)
        return self.reports

    def run_round(self, round_number: int) -> RoundReport | None:
        """Train, evaluate, fuse (or not), evaluate, checkpoint; None when stopped mid-round."""
        self.presence.update(status="training", round=round_number, step=0, fuse_at=None, attempt=0)
        with self.console.training(round_number, self.config.training.local_steps) as on_step:
            recorder, behind = step_recorder(self, round_number, on_step), lambda: self.presence.behind(round_number)
            stats = self.trainer.train_round(round_number, on_step=recorder, should_stop=behind)
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
        new_body = outcome in ("fused", "synced")
        after_old_head = self.trainer.evaluate().accuracy if new_body else None
        if new_body and outcome != "synced":  # a synced round was re-fitted when it was downloaded
            self.trainer.refit_head(round_number)
        after = self.trainer.evaluate() if new_body else before
        accuracy = {
            "before": before.accuracy,
            "after": after.accuracy,
            "after_old_head": after_old_head,
            "majority": self.trainer.majority_rate(),
            "loss_after": finite_or_nan(after.loss),
        }
        spent = time.perf_counter() - waited - (result.seconds if result is not None else 0.0)
        report = round_report(
            round_number,
            outcome,
            own_peer_id=self.fusion.peer_id,
            training=stats,
            accuracy=accuracy,
            result=result,
            wait_seconds=spent,
        )
        if outcome != "synced":  # a synced round already checkpointed the downloaded base
            self._complete_round(round_number, report, pre_fusion)
        return report

    def fuse_round(self, round_number: int) -> tuple[str, FusionResult | None]:
        """Wait for the round's fusion window, then all-reduce: ``(outcome, result)``.

        Outcomes: ``fused``, ``failed`` or ``rejected`` (kept own body; rejected: the average failed
        validation), ``alone``, ``missed`` (the swarm fused without us), ``stop``.

        A round our own transport lost (no group found, or an exception mid all-reduce: nobody applied
        it, see :attr:`FusionResult.retryable`), or that members refused for losing it so, is tried once
        more with the members that lost it too, through a second window of their own
        (:func:`windows.wait_for_second_look`): in CI two ready peers each missed the other's
        declaration on a DHT stalled by a frozen node, two int8 peers each timed out on the other's
        parts, and a NAT'd follower gave up on a leader that still counted it; each round was lost.
        """
        with self.console.fusing(round_number) as set_stage:
            window = windows.wait_for_fusion_window(self.presence, round_number, self.config.fusion)
            if window.decision != "fuse":
                return window.decision, None
            FAULTS.poison_update(self.body, self.fusion.averager.last_fused_body())  # tests only
            result = self._all_reduce(round_number, window, set_stage)
            if result.retryable and not self.stop_event.is_set():
                self.console.info(f"round {round_number}: fusion failed ({result.reason}); looking again")
                window = windows.wait_for_second_look(self.presence, round_number, self.config.fusion)
                if window.decision in ("missed", "stop"):
                    return window.decision, None
                if window.decision == "fuse":  # else nobody else looks again: the first attempt's failure stands
                    earlier = result.seconds
                    result = self._all_reduce(round_number, window, set_stage)
                    result = dataclasses.replace(result, seconds=result.seconds + earlier)
        return ("fused" if result.fused else "rejected" if result.rejected else "failed"), result

    def _all_reduce(
        self, round_number: int, window: windows.FusionWindow, set_stage: Callable[[str], None]
    ) -> FusionResult:
        set_stage("all-reducing the bodies")
        self.presence.update(status="fusing")
        return self.fusion.fuse(
            self.body,
            round_number=round_number,
            scheduled_time=window.time,
            group_size=window.group_size,
            members=window.members,
            weight=policy.fusion_weight(self.config.fusion.weighting, len(self.data.train)),
            info=fusion_info(self.config, self.data, self.body, round_number),
        )

    def catch_up(self, reason: str, min_round: int | None = None) -> bool:
        """Download the swarm's newest fused base if it is ahead of ours; bounded in time.

        ``min_round`` is set right after a missed or failed fusion of that round: then wait (bounded)
        for the others to finish it, and download only a base they really fused in a group.
        """
        deadline = time.monotonic() + self.config.fusion.state_download_timeout
        if min_round is not None:  # no longer "fusing": the others must not wait for us while we wait for them
            self.presence.announce(status="downloading", fuse_at=None)
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            target = self.presence.round_to_download(min_round, deadline)
            if target is None:
                return False
            self.presence.announce(status="downloading", fuse_at=None)
            state = self.fusion.download_fused(target, self.body, timeout=max(1.0, deadline - time.monotonic()))
            if state is None:
                self.stop_event.wait(self.presence.poll_seconds)
                continue
            copy_into(self.body, state.tensors)
            self.fusion.state = state.state  # the fusion rule's state (outer momentum) travels with the base
            self.trainer.refit_head(state.round)  # our old head does not fit the downloaded base
            why = f"downloaded the swarm's fused base ({reason})"
            report = round_report(
                state.round, "synced", own_peer_id=self.fusion.peer_id, source=state.source, reason=why
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
        self.presence.announce_round(report, fingerprint)

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Leave the swarm: stop publishing, then shut the averager and the DHT down."""
        self.stop_event.set()
        if self.presence is not None:
            self.presence.stop()
        if self.scalars is not None:
            self.scalars.close()
        shut_down(self.fusion, self.dht)
