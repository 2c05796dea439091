"""What a peer shows its volunteer: progress bars while training, one line per round.

Three modes: rich text (default), ``quiet`` (warnings and errors only) and ``json`` (one object
per line on stdout, for log collectors). Library code reports through a PeerConsole, never print.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class PeerConsole:
    def __init__(self, quiet: bool = False, log_format: str = "text", console: Console | None = None):
        self.quiet, self.json = quiet, log_format == "json"
        self.console = console or Console(stderr=False, highlight=False, soft_wrap=True)

    def _emit(self, event: str, text: str, **fields: Any) -> None:
        if self.json:
            sys.stdout.write(json.dumps({"time": time.time(), "event": event, **fields}, default=str) + "\n")
            sys.stdout.flush()
        elif not self.quiet:
            self.console.print(text)

    def info(self, message: str) -> None:
        self._emit("info", message, message=message)

    def warning(self, message: str) -> None:
        if self.json:
            self._emit("warning", message, message=message)
        else:
            self.console.print(f"[yellow]warning:[/yellow] {message}")

    def joined(self, peer_id: str, maddrs, data, run_id: str, reachable: bool = True, device: str = "") -> None:
        """``reachable``: the addresses work from outside (public mode); else they are only local ones.
        ``device``: where it trains, e.g. ``cuda:0 in bf16``."""
        addresses = [str(address) for address in maddrs]
        label = "reachable at" if reachable else "listening at (not reachable from outside)"
        self._emit(
            "joined",
            f"joined run [bold]{run_id}[/bold] as {peer_id} with {data.name!r} "
            f"({len(data.train)} train / {len(data.validation)} validation examples, {data.num_labels} labels)"
            + (f"; trains on {device}" if device else "")
            + "\n"
            + "\n".join(f"  {label} {address}" for address in addresses),
            peer_id=peer_id,
            run_id=run_id,
            dataset=data.name,
            addresses=addresses,
            device=device,
        )

    def reachability(self, mode) -> None:
        """The one line saying how this node takes part (a :class:`~coldfusion_p2p.swarm.reachability.Mode`)."""
        self._emit("reachability", mode.line(), mode=mode.name, reason=mode.reason)

    def bootstrap_ready(self, peer_id: str, initial_peers: list[str], peers_file) -> None:
        loopback_only = all("/ip4/127." in address or "/ip6/::1/" in address for address in initial_peers)
        note = (
            "\n[yellow]only reachable from this machine[/yellow]: listen on /ip4/0.0.0.0 with --host-maddrs "
            "and announce your public address with --announce-maddrs"
            if loopback_only
            else ""
        )
        self._emit(
            "bootstrap",
            f"bootstrap node {peer_id} is up. Peers join with:\n"
            f"  --initial-peers {' '.join(initial_peers)}\n(also written to {peers_file}){note}",
            peer_id=peer_id,
            initial_peers=initial_peers,
            peers_file=str(peers_file),
        )

    @contextlib.contextmanager
    def training(self, round_number: int, total_steps: int) -> Iterator[Callable[[int, float], None]]:
        """A progress bar for one round's local steps; yields ``on_step(step, loss)``."""
        if self.quiet or self.json or not self.console.is_terminal:
            yield lambda step, loss: None
            return
        columns = (
            TextColumn(f"round {round_number} training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("train", total=total_steps, loss="-")
            yield lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.3f}")

    @contextlib.contextmanager
    def fusing(self, round_number: int) -> Iterator[Callable[[str], None]]:
        """A spinner while the peer waits for its group and all-reduces; yields ``set_stage(text)``."""
        if self.quiet or self.json or not self.console.is_terminal:
            yield lambda stage: None
            return
        with self.console.status(f"round {round_number}: waiting for the other peers") as status:
            yield lambda stage: status.update(f"round {round_number}: {stage}")

    def round_summary(self, report) -> None:
        before = _percent(report.accuracy_before)
        after = _percent(report.accuracy_after)
        loss = "-" if report.train_loss is None else f"{report.train_loss:.3f}"
        reason = f" ({report.reason})" if report.reason else ""
        self._emit(
            "round",
            f"round {report.round}: {report.outcome}{reason} | loss {loss} | accuracy {before} -> {after} | "
            f"group {report.group_size} | train {report.train_seconds:.1f}s wait {report.wait_seconds:.1f}s "
            f"fuse {report.fusion_seconds:.1f}s",
            **{key: value for key, value in report.__dict__.items() if key != "members"},
        )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
