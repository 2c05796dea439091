"""The evaluation's summary and report: means, paired intervals, verdicts, majority flags, files."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from coldfusion_p2p.evaluation.report import EvalResult, card_table, results_table, summarize, write_report
from coldfusion_p2p.evaluation.statistics import decode_correct, encode_correct

from conftest import read_csv


def hand_made_results() -> list[EvalResult]:
    """Two bases, 100 test examples per dataset, the fused base right on a superset where it gains."""
    accuracies = {  # (dataset, seen, base) -> accuracy per seed
        ("a", True, "original"): [0.5, 0.7],
        ("a", True, "fused"): [0.8, 0.8],
        ("b", True, "original"): [0.6, 0.6],
        ("b", True, "fused"): [0.9, 0.7],
        ("c", False, "original"): [0.4, 0.6],
        ("c", False, "fused"): [0.5, 0.5],
    }
    return [
        EvalResult(
            f"/models/{base}",
            base,
            dataset,
            seen,
            "finetune",
            seed,
            accuracy,
            1.0,
            majority_rate=0.5,
            at_majority=accuracy <= 0.5,
            correct=encode_correct([index < round(100 * accuracy) for index in range(100)]),
        )
        for (dataset, seen, base), values in accuracies.items()
        for seed, accuracy in enumerate(values)
    ]


def test_summarize_means_stds_deltas_and_aggregates():
    rows = {(row["dataset"], row["base_label"]): row for row in summarize(hand_made_results())}
    assert len(rows) == 3 * 2 + 2 * 2
    a_original, a_fused = rows["a", "original"], rows["a", "fused"]
    assert a_original["mean"] == pytest.approx(0.6) and a_original["std"] == pytest.approx(0.1414213, abs=1e-6)
    assert a_original["n"] == 2 and a_original["delta_vs_first_base"] == 0.0
    assert a_fused["mean"] == pytest.approx(0.8) and a_fused["std"] == 0.0
    assert a_fused["delta_vs_first_base"] == pytest.approx(0.2)
    seen_fused, unseen_fused = rows["ALL seen", "fused"], rows["ALL unseen", "fused"]
    assert seen_fused["mean"] == pytest.approx(0.8) and seen_fused["datasets"] == 2 and seen_fused["aggregate"]
    assert seen_fused["std"] == pytest.approx(0.0707107, abs=1e-6)  # of the per-seed averages 0.85 and 0.75
    assert rows["ALL seen", "original"]["mean"] == pytest.approx(0.6)
    assert seen_fused["delta_vs_first_base"] == pytest.approx(0.2)
    assert unseen_fused["mean"] == pytest.approx(0.5) and unseen_fused["delta_vs_first_base"] == pytest.approx(0.0)
    assert not unseen_fused["seen"] and unseen_fused["datasets"] == 1


def test_summarize_gives_paired_intervals_verdicts_and_majority_flags():
    rows = {(row["dataset"], row["base_label"]): row for row in summarize(hand_made_results())}
    for key in (("a", "fused"), ("b", "fused"), ("ALL seen", "fused")):  # +0.3 and +0.1 by seed, paired
        assert 0 < rows[key]["ci_low"] < rows[key]["delta_vs_first_base"] < rows[key]["ci_high"], key
        assert rows[key]["verdict"] == "better"
    unseen = rows["c", "fused"]  # +0.1 with seed 0, -0.1 with seed 1
    assert unseen["ci_low"] < 0 < unseen["ci_high"] and unseen["verdict"] == "no detectable difference"
    assert rows["ALL unseen", "fused"]["ci_low"] == unseen["ci_low"]  # one dataset: the same resampling
    assert all(rows[key]["verdict"] is None and rows[key]["ci_low"] is None for key in rows if key[1] == "original")
    assert rows["a", "fused"]["ci_high"] - rows["a", "fused"]["ci_low"] > (
        rows["ALL seen", "fused"]["ci_high"] - rows["ALL seen", "fused"]["ci_low"]
    )
    assert rows["a", "original"]["majority_rate"] == 0.5 and rows["a", "original"]["examples"] == 100
    assert rows["a", "original"]["at_majority"] and rows["a", "original"]["at_majority_runs"] == 1
    assert not rows["a", "fused"]["at_majority"] and not rows["b", "original"]["at_majority"]
    assert (
        rows["ALL seen", "original"]["at_majority_runs"] == 1 and rows["ALL seen", "original"]["majority_rate"] == 0.5
    )
    assert rows["c", "fused"]["at_majority_runs"] == 2
    unpaired = [EvalResult(**{**vars(result), "correct": ""}) for result in hand_made_results()]
    row = next(r for r in summarize(unpaired) if (r["dataset"], r["base_label"]) == ("a", "fused"))
    assert row["delta_vs_first_base"] == pytest.approx(0.2) and row["ci_low"] is None and row["verdict"] is None


def test_summarize_pairs_runs_of_the_same_seed():
    accuracies = {"original": [0.4, 0.6], "fused": [0.5, 0.7]}  # +0.10 with either seed, each a superset

    def run(base, seed, accuracy):
        correct = encode_correct([index < round(100 * accuracy) for index in range(100)])
        return EvalResult(base, base, "d", False, "finetune", seed, accuracy, 1.0, 0.5, correct=correct)

    results = [run(base, seed, value) for base, values in accuracies.items() for seed, value in enumerate(values)]
    row = next(row for row in summarize(results) if row["base_label"] == "fused" and not row["aggregate"])
    assert row["delta_vs_first_base"] == pytest.approx(0.1) and row["verdict"] == "better"
    assert 0.03 < row["ci_low"] < 0.1 < row["ci_high"] < 0.17  # unpaired seeds (-0.1 and +0.3) would span 0


def test_results_table_separates_seen_and_unseen():
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(results_table(summarize(hand_made_results())))
    text = console.file.getvalue()
    for fragment in ("seen", "unseen", "ALL seen", "original", "fused", "60.0 ± 14.1 ≤maj 1/2", "95% paired"):
        assert fragment in text, (fragment, text)
    assert "80.0 ± 0.0 (+20.0 [+" in text and "50.0 ± 0.0 ≤maj (+0.0 [-" in text and "--seeds 3" in text
    assert text.index("ALL seen") < text.index("unseen")


def test_write_report_writes_every_file(tmp_path):
    results = hand_made_results()
    summary = summarize(results)
    paths = write_report(results, summary, tmp_path / "report", config={"seeds": 2})
    assert set(paths) == {"results", "summary", "json", "plot"}
    written = read_csv(paths["results"])
    assert len(written) == len(results) and decode_correct(written[0]["correct"]).sum() == 50
    assert {"majority_rate", "at_majority"} <= set(written[0])
    rows = read_csv(paths["summary"])
    assert len(rows) == len(summary)
    assert {"majority_rate", "at_majority", "delta_vs_first_base", "ci_low", "ci_high", "verdict"} <= set(rows[0])
    assert {row["verdict"] for row in rows} == {"", "better", "no detectable difference"}
    payload = json.loads(paths["json"].read_text())
    assert payload["config"] == {"seeds": 2} and len(payload["results"]) == len(results)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 5000


def test_card_table_lists_one_bases_rows_with_deltas_and_verdicts():
    table = card_table(summarize(hand_made_results()), "fused")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and all("| finetune |" in row for row in rows)  # a, b, c, ALL seen, ALL unseen
    a_row = next(row for row in rows if row.startswith("| a |"))
    assert "| seen | finetune | 80.0% | 50.0% | +20.0 [+" in a_row and a_row.endswith("| better |")
