"""A peer's presence in the swarm: its record, kept fresh by one thread, and the swarm watched by another.

The round loop (:class:`~coldfusion_p2p.swarm.peer.Peer`) only states its progress
(:meth:`Presence.update`); this module turns that into a signed :class:`PeerRecord` on the DHT
every ``record_period`` seconds, so the monitor, the fusion window and late joiners always see
a live record, whatever the loop is busy with. Reading the swarm runs on a thread of its own: a
slow DHT read must never delay our record past its expiration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hivemind.utils import get_dht_time

from coldfusion_p2p import __version__
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.hivemind_adapter import reconnect_initial_peers
from coldfusion_p2p.swarm.records import PeerRecord, RecordBoard
from coldfusion_p2p.swarm.stages import stage_summary

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 5.0  # while nobody is in sight, ping the initial peers this often


@dataclass
class Progress:
    """The mutable state behind this peer's DHT record (guarded by ``Presence``'s lock)."""

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
    fuse_members: list[str] | None = None
    attempt: int = 0  # 1 while this peer looks again for a group of its round
    fingerprint: str = ""
    last_outcome: str = ""
    last_reason: str = ""
    last_stages: str = ""


@dataclass(frozen=True)
class Identity:
    """What a peer's record says about it that never changes while it runs."""

    dataset_name: str
    num_examples: int
    total_steps: int
    model_fingerprint: str
    invite: str = ""
    reachability: str = ""  # this node's mode (swarm.reachability), decided once when it joins
    device: str = ""  # where it trains and in what precision, e.g. "cuda:0 bf16"


def poll_seconds(record_period: float) -> float:
    """How often a waiting peer reads the swarm's records: a quarter of their refresh period, at most
    5 times a second. Every peer of a window reads every record each time, so the DHT's load grows
    with the swarm's size times this rate: 16 peers reading every 0.2 s kept 2 cores' DHTs so busy
    that reads timed out and windows never saw the whole swarm ready."""
    return max(0.2, record_period / 4)


def record_ttl(record_period: float) -> float:
    """How long our record outlives its last refresh: a few missed refreshes, never less than 3 s.

    A peer that stops (a crash, SIGSTOP, a cut link) disappears from everyone's view after this,
    and the others' fusion window then closes without waiting for it."""
    return max(3 * record_period, 3.0)


class Presence:
    """Publishes this peer's record periodically and tracks the newest round the others fused."""

    def __init__(self, identity: Identity, record_period: float, stop_event: threading.Event):
        self.identity, self.record_period, self.stop_event = identity, record_period, stop_event
        self.poll_seconds = poll_seconds(record_period)
        self.progress = Progress()
        self.others_seen: list[PeerRecord] = []  # the other compatible peers' records, as last seen
        self.reducer_seen = False  # ever seen a live peer that can reduce (not in client mode)?
        self.peer_id = ""
        self.board: RecordBoard | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.initial_peers: list[str] = []
        self._next_reconnect = 0.0

    def update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self.progress, name, value)

    def record(self) -> PeerRecord:
        with self._lock:
            progress, identity = self.progress, self.identity
            return PeerRecord(
                peer_id=self.peer_id,
                dataset_name=identity.dataset_name[:128],
                num_examples=identity.num_examples,
                status=progress.status,
                round=progress.round,
                fused_round=progress.fused_round,
                step=progress.step,
                total_steps=identity.total_steps,
                train_loss=progress.train_loss,
                accuracy_before=progress.accuracy_before,
                accuracy_after=progress.accuracy_after,
                samples_per_second=float(progress.samples_per_second),
                last_group_size=progress.last_group_size,
                last_fusion_seconds=float(progress.last_fusion_seconds),
                fuse_at=progress.fuse_at,
                fuse_members=progress.fuse_members,
                attempt=progress.attempt,
                last_outcome=progress.last_outcome,
                last_reason=progress.last_reason,
                last_stages=progress.last_stages,
                body_fingerprint=progress.fingerprint,
                model_fingerprint=identity.model_fingerprint,
                version=__version__,
                invite=identity.invite,
                reachability=identity.reachability,
                device=identity.device,
                time=get_dht_time(),
            )

    def announce(self, **changes: Any) -> None:
        """:meth:`update`, then publish at once (not at the next period): others act on it now."""
        self.update(**changes)
        self.publish()

    def announce_round(self, report: Any, fingerprint: str) -> None:
        """Announce a completed round (a RoundReport): its base is now the one we hold and serve."""
        self.announce(
            status="idle",
            fused_round=report.round,
            round=report.round + 1,
            accuracy_after=report.accuracy_after,
            last_group_size=report.group_size,
            last_fusion_seconds=report.fusion_seconds,
            fuse_at=None,
            fuse_members=None,
            attempt=0,
            fingerprint=fingerprint,
            last_outcome=report.outcome,
            last_reason=report.reason[:200],
            last_stages=stage_summary(report.stages),
        )

    def done(self, rounds: int | None) -> bool:
        """Stop the round loop: asked to, or the fused round reached ``--rounds``."""
        return self.stop_event.is_set() or policy.rounds_done(self.progress.fused_round, rounds)

    def behind(self, round_number: int) -> bool:
        """Stop training early when asked to, or when the swarm already fused this round without us
        (e.g. we were frozen): the round is lost anyway, and the sooner we catch up the sooner we
        are back in the swarm's current round instead of chasing it one stale round after another."""
        return self.stop_event.is_set() or policy.missed_round(round_number, self.others_seen)

    def publish(self) -> None:
        if self.board is None:
            return
        try:
            self.board.publish(self.record(), ttl=record_ttl(self.record_period))
        except Exception as error:  # a DHT hiccup must not kill a training peer; the next refresh retries
            logger.debug("publishing the record failed: %r", error)

    def start(self, board: RecordBoard, peer_id: str, initial_peers: Sequence[str] = ()) -> None:
        """Begin publishing (now, then every ``record_period``) and watching the swarm; whenever
        nobody else is in sight, the watcher checks that the DHT is not cut off for good."""
        self.board, self.peer_id, self.initial_peers = board, peer_id, list(initial_peers)
        for target, name in ((self._publish_periodically, "record-publisher"), (self._watch_swarm, "swarm-watcher")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop both threads (the stop event is set by the caller) and publish a last ``stopped`` record."""
        for thread in self._threads:
            thread.join(timeout=5)
        if self.board is not None:
            self.announce(status="stopped", fuse_at=None)

    def read_others(self) -> list[PeerRecord]:
        """The other compatible peers' records, read now (none when the read failed: see RecordBoard.fetch)."""
        return policy.others(self.board.fetch(), self.board.subkey, self.identity.model_fingerprint)

    def check_compatible(self, board: RecordBoard, run_id: str) -> None:
        """A newcomer with another model gets a clear error instead of silently forming its own swarm."""
        everyone_else = policy.others(board.fetch(), board.subkey)
        theirs = policy.incompatible_swarm(everyone_else, self.identity.model_fingerprint)
        if theirs is not None:
            raise UserError(
                f"this swarm (run {run_id!r}) fuses a different model (fingerprint {theirs}, "
                f"yours {self.identity.model_fingerprint}: another architecture, shapes or starting weights)",
                "pass the --model the swarm started from, or another --run-id",
            )

    # ------------------------------------------------------------ waiting on the swarm, through records
    def wait_for_archivers(self, timeout: float) -> None:
        """Return once every archiver holds our last fused round, or after ``timeout`` (or a stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if not policy.archivers_behind(self.board.fetch().values(), self.progress.fused_round):
                return
            self.stop_event.wait(self.poll_seconds)

    def round_to_download(self, min_round: int | None, deadline: float) -> int | None:
        """The fused round worth downloading now, or None (nothing newer; or a stop or the deadline).

        Plainly (``min_round`` None): the swarm's newest fused round, if it is ahead of ours. Right
        after a missed or failed fusion of ``min_round``: wait while others are still fusing it, then
        only a round they really fused in a group.
        """
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            others = policy.others(self.board.fetch(), self.board.subkey, self.identity.model_fingerprint)
            if min_round is None:
                target = policy.swarm_fused_round(others)
                return target if target > self.progress.fused_round else None
            if not policy.still_fusing(others, min_round):
                return policy.fused_without_us(others, min_round)
            self.stop_event.wait(self.poll_seconds)
        return None

    def _publish_periodically(self) -> None:
        while not self.stop_event.wait(self.record_period):
            self.publish()

    def _reconnect_now_and_then(self) -> None:
        if not self.initial_peers or time.monotonic() < self._next_reconnect:
            return
        self._next_reconnect = time.monotonic() + RECONNECT_SECONDS
        try:
            reconnect_initial_peers(self.board.dht, self.initial_peers)
        except Exception as error:  # a DHT shutting down; the next look tries again
            logger.debug("reconnecting to the initial peers failed: %r", error)

    def _watch_swarm(self) -> None:
        """Keep :attr:`others_seen` fresh, so that training notices when the swarm left us behind."""
        while not self.stop_event.wait(self.record_period):
            try:
                others = policy.others(self.board.fetch(), self.board.subkey, self.identity.model_fingerprint)
            except Exception as error:  # like publishing: a DHT hiccup only delays the news
                logger.debug("fetching the records failed: %r", error)
                others = []
            if not others:  # alone, or cut off: make sure the DHT still knows its way back
                self._reconnect_now_and_then()
                continue
            self.others_seen = others
            self.reducer_seen = self.reducer_seen or not policy.no_reducer([*others, self.record()])
