"""A read-only view of a live swarm: who is in, on what data, how far, how well, and whether fusion works.

The monitor joins the DHT as a client (it never serves or slows the peers) and reads the peers'
signed records. :class:`SwarmView` turns successive reads into a :class:`Snapshot` (pure data:
peers, stale marks, round history, alerts); :func:`render` draws a snapshot with rich;
``Snapshot.to_dict`` is the ``--json`` output. Keeping state, data and drawing apart lets the
dashboard be tested on recorded snapshots.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from coldfusion_p2p.config import MonitorConfig
from coldfusion_p2p.swarm.network import start_dht
from coldfusion_p2p.swarm.records import ARCHIVER, PeerRecord, RecordBoard, RunKeys

STATUS_STYLES = {
    "training": "cyan",
    "ready": "yellow",
    "fusing": "magenta",
    "idle": "green",
    "downloading": "blue",
    "starting": "dim",
    "stopped": "dim",
    "archiving": "dim",
}
MAX_ALERTS = 8
MAX_HISTORY = 10
MODE_STYLES = {"public": "green", "relayed": "yellow", "client": "cyan"}


@dataclass
class PeerRow:
    peer_id: str
    dataset_name: str
    status: str
    round: int
    fused_round: int
    step: int
    total_steps: int
    num_examples: int
    train_loss: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    samples_per_second: float
    last_group_size: int
    last_fusion_seconds: float
    last_outcome: str
    last_stages: str  # bounded groups: the last round's stages (swarm.stages.stage_summary)
    fingerprint: str
    version: str
    reachability: str  # public / relayed / client (swarm.reachability); "" from older versions
    device: str  # e.g. "cuda:0 bf16"; "" from older versions
    age_seconds: float  # since the peer last published
    stale: bool


@dataclass
class RoundSummary:
    round: int
    group_size: int
    fusion_seconds: float
    accuracy_before: float | None  # mean over the peers that reported the round
    accuracy_after: float | None
    peers: int


@dataclass
class Snapshot:
    run_id: str
    time: float
    swarm_round: int
    fingerprint: str
    total_examples: int
    peers: list[PeerRow]
    archivers: list[PeerRow]
    history: list[RoundSummary]
    alerts: list[str]

    @property
    def live_peers(self) -> int:
        return sum(not peer.stale and peer.status != "stopped" for peer in self.peers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "live_peers": self.live_peers}


@dataclass
class _Seen:
    record: PeerRecord
    last_seen: float  # monotonic time of the last fresh publication
    stale_since: float | None = None


@dataclass
class SwarmView:
    """Accumulates records over time: marks peers stale, then drops them; builds history and alerts.

    >>> view = SwarmView("my-run", stale_after=10, drop_after=60)
    >>> view.update(board.fetch())   # every refresh
    >>> snapshot = view.snapshot()
    """

    run_id: str
    stale_after: float = 10.0  # a peer silent this long is marked stale
    drop_after: float = 60.0  # ... and dropped from the table after this long
    peers: dict[str, _Seen] = field(default_factory=dict)
    history: dict[int, dict[str, PeerRecord]] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)

    def update(self, records: dict[bytes, PeerRecord] | list[PeerRecord], now: float | None = None) -> None:
        now = time.time() if now is None else now
        monotonic = time.monotonic()
        fresh = list(records.values()) if isinstance(records, dict) else list(records)
        for record in fresh:
            previous = self.peers.get(record.peer_id)
            if previous is None or record.time > previous.record.time:
                self._note_changes(previous.record if previous else None, record)
                self.peers[record.peer_id] = _Seen(record, monotonic - max(0.0, now - record.time))
        for peer_id, seen in list(self.peers.items()):
            silent = monotonic - seen.last_seen
            if seen.record.status == "stopped":
                if silent > self.drop_after:
                    del self.peers[peer_id]
                continue
            if silent > self.stale_after and seen.stale_since is None:
                seen.stale_since = monotonic
                self._alert(f"peer {_short(peer_id)} ({seen.record.dataset_name}) went stale")
            elif silent <= self.stale_after:
                seen.stale_since = None
            if silent > self.drop_after:
                del self.peers[peer_id]
                self._alert(f"peer {_short(peer_id)} ({seen.record.dataset_name}) dropped after {silent:.0f}s")

    def _note_changes(self, previous: PeerRecord | None, record: PeerRecord) -> None:
        if record.status == ARCHIVER:
            return
        if record.fused_round > 0 and (previous is None or record.fused_round > previous.fused_round):
            self.history.setdefault(record.fused_round, {})[record.peer_id] = record
            if record.last_outcome in ("failed", "rejected"):
                verb = "fusion failed" if record.last_outcome == "failed" else "contribution rejected"
                reason = f": {record.last_reason}" if record.last_reason else ""
                self._alert(f"round {record.fused_round}: {verb} on {_short(record.peer_id)}{reason}")
        if previous is None:
            self._alert(f"peer {_short(record.peer_id)} joined with {record.dataset_name!r}")

    def _alert(self, message: str) -> None:
        self.alerts.append(f"{time.strftime('%H:%M:%S')} {message}")
        del self.alerts[:-MAX_ALERTS]

    def snapshot(self, now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        monotonic = time.monotonic()
        rows = [_row(seen, monotonic, self.stale_after) for seen in self.peers.values()]
        contributors = sorted((row for row in rows if row.status != ARCHIVER), key=lambda row: row.dataset_name)
        archivers = [row for row in rows if row.status == ARCHIVER]
        live = [row for row in contributors if not row.stale and row.status != "stopped"]
        swarm_round = max((row.fused_round for row in contributors), default=0)
        fingerprints = Counter(row.fingerprint for row in contributors if row.fused_round == swarm_round)
        return Snapshot(
            run_id=self.run_id,
            time=now,
            swarm_round=swarm_round,
            fingerprint=fingerprints.most_common(1)[0][0] if fingerprints else "",
            total_examples=sum(row.num_examples for row in live),
            peers=contributors,
            archivers=archivers,
            history=[summarize_round(r, list(self.history[r].values())) for r in sorted(self.history)][-MAX_HISTORY:],
            alerts=list(self.alerts),
        )


def summarize_round(round_number: int, records: list[PeerRecord]) -> RoundSummary:
    """One line of round history from the records peers published right after that round."""
    before = [r.accuracy_before for r in records if r.accuracy_before is not None]
    after = [r.accuracy_after for r in records if r.accuracy_after is not None]
    return RoundSummary(
        round=round_number,
        group_size=max((r.last_group_size for r in records), default=0),
        fusion_seconds=max((r.last_fusion_seconds for r in records), default=0.0),
        accuracy_before=sum(before) / len(before) if before else None,
        accuracy_after=sum(after) / len(after) if after else None,
        peers=len(records),
    )


def _row(seen: _Seen, monotonic: float, stale_after: float) -> PeerRow:
    record = seen.record
    age = monotonic - seen.last_seen
    return PeerRow(
        peer_id=record.peer_id,
        dataset_name=record.dataset_name,
        status=record.status,
        round=record.round,
        fused_round=record.fused_round,
        step=record.step,
        total_steps=record.total_steps,
        num_examples=record.num_examples,
        train_loss=record.train_loss,
        accuracy_before=record.accuracy_before,
        accuracy_after=record.accuracy_after,
        samples_per_second=record.samples_per_second,
        last_group_size=record.last_group_size,
        last_fusion_seconds=record.last_fusion_seconds,
        last_outcome=record.last_outcome,
        last_stages=record.last_stages,
        fingerprint=record.body_fingerprint,
        version=record.version,
        reachability=record.reachability,
        device=record.device,
        age_seconds=round(age, 1),
        stale=age > stale_after and record.status != "stopped",
    )


def _short(peer_id: str) -> str:
    return f"…{peer_id[-6:]}" if len(peer_id) > 8 else peer_id


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _header(snapshot: Snapshot) -> Text:
    return Text.assemble(
        ("run ", "dim"),
        (snapshot.run_id, "bold"),
        ("   swarm round ", "dim"),
        (str(snapshot.swarm_round), "bold"),
        ("   live peers ", "dim"),
        (str(snapshot.live_peers), "bold"),
        ("   fused body ", "dim"),
        (snapshot.fingerprint or "-", "bold"),
        ("   examples contributed ", "dim"),
        (f"{snapshot.total_examples:,}", "bold"),
        ("   archivers ", "dim"),
        (str(len(snapshot.archivers)), "bold"),
    )


def _peer_table(snapshot: Snapshot) -> Table:
    peers = Table(expand=True, box=None, header_style="bold")
    for column in (
        "peer",
        "dataset",
        "mode",
        "device",
        "status",
        "round",
        "progress",
        "loss",
        "acc before",
        "acc after",
        "samples/s",
        "group",
        "stages",
        "fusion s",
        "seen",
    ):
        peers.add_column(column, no_wrap=True)
    for row in snapshot.peers:
        style = "dim strike" if row.stale else STATUS_STYLES.get(row.status, "")
        status = "STALE" if row.stale else row.status
        bar = ProgressBar(
            total=max(row.total_steps, 1),
            completed=row.step
            if row.status == "training"
            else (row.total_steps if row.status in ("ready", "fusing", "idle") else 0),
            width=16,
        )
        peers.add_row(
            _short(row.peer_id),
            row.dataset_name,
            Text(row.reachability or "-", style=MODE_STYLES.get(row.reachability, "")),
            row.device or "-",
            Text(status, style=style),
            str(row.round),
            bar,
            "-" if row.train_loss is None else f"{row.train_loss:.3f}",
            _percent(row.accuracy_before),
            _percent(row.accuracy_after),
            f"{row.samples_per_second:.1f}",
            str(row.last_group_size),
            row.last_stages or "-",
            f"{row.last_fusion_seconds:.1f}",
            f"{row.age_seconds:.0f}s ago",
        )
    if not snapshot.peers:
        peers.add_row("-", "no peers yet", *[""] * 12)
    return peers


def _history_table(snapshot: Snapshot) -> Table:
    history = Table(expand=True, box=None, header_style="bold")
    for column in ("round", "group size", "fusion s", "mean acc before", "mean acc after", "reports"):
        history.add_column(column)
    for summary in reversed(snapshot.history):
        history.add_row(
            str(summary.round),
            str(summary.group_size),
            f"{summary.fusion_seconds:.1f}",
            _percent(summary.accuracy_before),
            _percent(summary.accuracy_after),
            str(summary.peers),
        )
    if not snapshot.history:
        history.add_row("-", "no fused round seen yet", "", "", "", "")
    return history


def render(snapshot: Snapshot) -> Group:
    """The dashboard: header, peer table, round history and alerts, from one snapshot."""
    alerts = Text(
        "\n".join(snapshot.alerts) if snapshot.alerts else "no alerts", style="yellow" if snapshot.alerts else "dim"
    )
    return Group(
        Panel(_header(snapshot), title="ColD Fusion swarm", border_style="blue"),
        Panel(_peer_table(snapshot), title="Peers"),
        Panel(_history_table(snapshot), title="Round history"),
        Panel(alerts, title="Alerts"),
    )


class _QuitKey:
    """Watches stdin for 'q' without blocking (only when stdin is a terminal)."""

    def __init__(self):
        self.pressed = threading.Event()
        self._restore = None

    def __enter__(self):
        if sys.stdin.isatty():
            import termios
            import tty

            fd = sys.stdin.fileno()
            old = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self._restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, old)
            threading.Thread(target=self._watch, args=(fd,), daemon=True).start()
        return self

    def _watch(self, fd: int) -> None:
        while not self.pressed.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready and os.read(fd, 1).lower() == b"q":
                self.pressed.set()

    def __exit__(self, *exc):
        self.pressed.set()
        if self._restore is not None:
            self._restore()


def run_dashboard(
    view: SwarmView,
    fetch,
    *,
    refresh: float = 1.0,
    stop_event: threading.Event | None = None,
    console: Console | None = None,
) -> None:
    """Full-screen live dashboard until q, Ctrl-C or ``stop_event``."""
    stop_event = stop_event or threading.Event()
    console = console or Console()
    live = Live(console=console, screen=console.is_terminal, auto_refresh=False)
    with contextlib.suppress(KeyboardInterrupt), _QuitKey() as quit_key, live:
        while not (stop_event.is_set() or quit_key.pressed.is_set()):
            view.update(fetch())
            live.update(render(view.snapshot()), refresh=True)
            stop_event.wait(refresh)


def monitor_swarm(config: MonitorConfig, console: Console | None = None, stop_event: threading.Event | None = None):
    """Join as a DHT client and show the swarm: a live dashboard, or one snapshot with ``once``."""
    keys = RunKeys.from_run_id(config.network.run_id)
    dht = start_dht(config.network, keys, client_mode=True)
    console = console or Console()
    try:
        board = RecordBoard(dht, keys)
        settings = config.monitor
        view = SwarmView(keys.run_id, stale_after=settings.stale_after, drop_after=settings.drop_after)
        if not settings.once:
            run_dashboard(view, board.fetch, refresh=settings.refresh, stop_event=stop_event, console=console)
            return None
        deadline = time.monotonic() + settings.settle
        while time.monotonic() < deadline:
            view.update(board.fetch())
            time.sleep(min(0.5, settings.settle))
        snapshot = view.snapshot()
        if settings.json:
            console.file.write(json.dumps(snapshot.to_dict(), indent=2, default=str) + "\n")
            console.file.flush()
        else:
            console.print(render(snapshot))
        return snapshot
    finally:
        dht.shutdown()
