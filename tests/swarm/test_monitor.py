"""The monitor: swarm view logic, the rendered dashboard, and a real swarm seen through the CLI."""

from __future__ import annotations

import json
import subprocess
import time
from typing import get_args

import pytest
from rich.console import Console

from coldfusion_p2p.swarm.monitor import SwarmView, render
from coldfusion_p2p.swarm.records import PeerRecord, Status

from conftest import peer_command, peer_environment, wait_until


def record(peer_id: str, dataset: str, **changes) -> PeerRecord:
    values = dict(
        peer_id=peer_id,
        dataset_name=dataset,
        num_examples=100,
        status="training",
        round=3,
        fused_round=2,
        step=10,
        total_steps=40,
        train_loss=0.4,
        accuracy_before=0.6,
        accuracy_after=0.7,
        samples_per_second=20.0,
        last_group_size=3,
        last_fusion_seconds=1.2,
        body_fingerprint="abc123",
        version="0.1.0",
        time=time.time(),
    )
    values.update(changes)
    return PeerRecord(**values)


def test_view_marks_stale_peers_then_drops_them_and_raises_alerts():
    view = SwarmView("run", stale_after=10, drop_after=60)
    view.update([record("peerAAAAAAAA", "reviews"), record("peerBBBBBBBB", "tweets", time=time.time() - 30)])
    snapshot = view.snapshot()
    by_name = {row.dataset_name: row for row in snapshot.peers}
    assert not by_name["reviews"].stale and by_name["tweets"].stale
    assert snapshot.live_peers == 1 and snapshot.total_examples == 100
    assert any("went stale" in alert for alert in snapshot.alerts)

    view.update([record("peerCCCCCCCC", "news", time=time.time() - 120)])
    assert "news" not in {row.dataset_name for row in view.snapshot().peers}
    assert any("dropped" in alert for alert in view.snapshot().alerts)


def test_round_history_and_failed_fusion_alerts():
    view = SwarmView("run")
    view.update(
        [
            record("p1AAAAAAAA", "a", fused_round=1, accuracy_before=0.5, accuracy_after=0.6, status="idle"),
            record("p2AAAAAAAA", "b", fused_round=1, accuracy_before=0.7, accuracy_after=0.8, status="idle"),
        ]
    )
    view.update(
        [record("p1AAAAAAAA", "a", fused_round=2, last_outcome="failed", last_reason="timeout", time=time.time() + 1)]
    )
    snapshot = view.snapshot()
    first = next(summary for summary in snapshot.history if summary.round == 1)
    assert (
        first.peers == 2 and first.accuracy_before == pytest.approx(0.6) and first.accuracy_after == pytest.approx(0.7)
    )
    assert snapshot.swarm_round == 2
    assert any("fusion failed" in alert and "timeout" in alert for alert in snapshot.alerts)


def test_dashboard_renders_every_panel():
    view = SwarmView("demo-run", stale_after=10)
    view.update(
        [
            record("peerAAAAAAAA", "reviews", fused_round=1, status="idle"),
            record("peerBBBBBBBB", "tweets", fused_round=1, time=time.time() - 20),
            record("peerCCCCCCCC", "spam", fused_round=1, status="idle", last_group_size=7, last_stages="4✓ 3✗"),
        ]
    )
    console = Console(record=True, width=180)
    console.print(render(view.snapshot()))
    text = console.export_text()
    for expected in (
        "ColD Fusion swarm",
        "demo-run",
        "Peers",
        "Round history",
        "Alerts",
        "reviews",
        "tweets",
        "STALE",
        "went stale",
        "abc123",
        "70.0%",
        "stages",
        "4✓ 3✗",
    ):
        assert expected in text, expected


@pytest.mark.swarm
def test_monitor_once_json_lists_a_real_swarm(local_swarm, tiny_model_dir, tiny_datasets):
    settings = dict(rounds=50, local_steps=200, fusion_window=5.0)
    peers = [
        local_swarm.start_peer(
            f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, dataset_name=f"label-{i}", **settings
        )
        for i in (0, 1)
    ]
    wait_until(lambda: all(1 in peer.rounds_written() for peer in peers), timeout=120, message="round 1")
    result = subprocess.run(
        peer_command(
            "monitor",
            "--once",
            "--json",
            "--run-id",
            local_swarm.run_id,
            "--settle",
            "2",
            "--initial-peers",
            *local_swarm.initial_peers,
        ),
        capture_output=True,
        text=True,
        env=peer_environment(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["live_peers"] == 2 and snapshot["swarm_round"] >= 1
    rows = {row["dataset_name"]: row for row in snapshot["peers"]}
    assert set(rows) == {"label-0", "label-1"}
    for row in rows.values():
        # a live peer past its start: under load one may be catching up after a missed fusion
        assert row["status"] in set(get_args(Status)) - {"starting", "stopped", "archiving"}
        assert row["fused_round"] >= 1 and row["round"] == row["fused_round"] + 1
        assert row["total_steps"] == 200

    text = subprocess.run(
        peer_command(
            "monitor",
            "--once",
            "--run-id",
            local_swarm.run_id,
            "--settle",
            "1",
            "--initial-peers",
            *local_swarm.initial_peers,
        ),
        capture_output=True,
        text=True,
        env={**peer_environment(), "COLUMNS": "200"},
        timeout=120,
    )
    assert text.returncode == 0 and "label-0" in text.stdout and "Round history" in text.stdout
