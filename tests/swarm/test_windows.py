"""A round's fusion windows (swarm/windows.py), on scripted record reads: failed reads, second looks."""

from __future__ import annotations

import threading
import time

from hivemind.utils import get_dht_time

from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.swarm.presence import Identity, Presence, record_ttl
from coldfusion_p2p.swarm.records import PeerRecord
from coldfusion_p2p.swarm.windows import FusionWindow, wait_for_fusion_window, wait_for_second_look


class FlakyBoard:
    """Stands in for RecordBoard: serves the scripted partner records, one list per read (the last
    repeats); an empty list is a read that failed (RecordBoard.fetch returns no records then)."""

    subkey = b"own"

    def __init__(self, reads):
        self.reads, self.published = list(reads), []

    def fetch(self):
        partners = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        return {f"partner{index}".encode(): record for index, record in enumerate(partners)}

    def publish(self, record, ttl):
        self.published.append(record)


def partner(status: str, fuse_at: float | None = None) -> PeerRecord:
    return PeerRecord(
        peer_id="QmPartner", dataset_name="d", num_examples=10, status=status, round=1, fused_round=0,
        step=0, total_steps=1, fuse_at=fuse_at, time=get_dht_time(),
    )  # fmt: skip


def window_after_reads(reads, fusion_window: float = 0.3) -> tuple[FusionWindow, float]:
    identity = Identity(dataset_name="d", num_examples=10, total_steps=1, model_fingerprint="")
    presence = Presence(identity, record_period=0.5, stop_event=threading.Event())  # records live 3 s
    presence.board, presence.reducer_seen = FlakyBoard(reads), True
    config = FusionConfig(fusion_window=fusion_window, min_group_size=2, matchmaking_time=0.2)
    started = time.monotonic()
    window = wait_for_fusion_window(presence, 1, config)
    return window, time.monotonic() - started


def test_a_failed_read_of_the_records_at_the_windows_time_does_not_send_the_peer_alone():
    """The partner trains, then the reads fail (empty) past the window's time, then it shows up ready:
    no record can vanish before it expires, so the peer waits for it instead of fusing alone."""
    reads = [[partner("training")], *[[]] * 8, [partner("ready", fuse_at=get_dht_time() + 0.5)]]
    window, _ = window_after_reads(reads)
    assert window.decision == "fuse", window


def test_a_partner_gone_for_longer_than_its_record_lives_leaves_the_peer_alone():
    window, seconds = window_after_reads([[partner("training")], []])
    assert window.decision == "alone" and seconds >= 2 * record_ttl(0.5), (window, seconds)
    window, seconds = window_after_reads([[]])
    assert window.decision == "alone" and seconds < 2.0, "nobody seen ever: alone at the window's time"


def test_a_second_look_waits_out_a_partners_first_attempt_then_fuses_at_once_with_it():
    """The partner's first all-reduce still runs (it learns of the loss later); once it looks again
    too, the second window closes at once, however far its proposal (fusion_window) lies. Two
    failed reads meanwhile do not end it alone."""
    first = partner("fusing", fuse_at=get_dht_time() - 5.0)
    second = partner("ready", fuse_at=get_dht_time() + 60.0).copy(update={"attempt": 1})
    identity = Identity(dataset_name="d", num_examples=10, total_steps=1, model_fingerprint="")
    presence = Presence(identity, record_period=0.5, stop_event=threading.Event())
    presence.board = FlakyBoard([[first]] * 3 + [[]] * 2 + [[first]] * 2 + [[second]])  # [] a failed read
    config = FusionConfig(fusion_window=60.0, min_group_size=3, matchmaking_time=0.2)
    started = time.monotonic()
    window = wait_for_second_look(presence, 1, config)
    assert window.decision == "fuse" and window.group_size == 2, window
    assert 0.8 <= time.monotonic() - started < 5.0, "waited for the first attempt, not for the window"
    assert window.time <= get_dht_time() + 0.2, "at once, not at the partner's first proposal"
    assert presence.board.published[0].attempt == 1, "the others tell our second look from a first one"
