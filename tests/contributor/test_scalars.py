"""--report-to tensorboard: scalars written with TensorBoard's own writer, read back by its own reader."""

from __future__ import annotations

from types import SimpleNamespace

from coldfusion_p2p.contributor.scalars import ScalarLog

from conftest import read_scalars


def test_steps_and_rounds_land_in_event_files_on_their_axes(tmp_path):
    log = ScalarLog("tensorboard", tmp_path, steps_per_round=3)
    for round_number in (1, 2):
        for step in (1, 2, 3):
            log.step(round_number, step, loss=1.0 / (round_number * step))
        report = SimpleNamespace(round=round_number, accuracy_before=0.5 + round_number / 10, accuracy_after=None)
        log.round(report)
    log.close()
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert abs(scalars["train/loss"][4][1] - 0.25) < 1e-6  # round 2, step 2
    assert [(step, round(value, 6)) for step, value in scalars["round/accuracy_before_fusion"]] == [(1, 0.6), (2, 0.7)]
    assert "round/accuracy_after_fusion" not in scalars  # None is left out, not written as 0


def test_reporting_off_writes_nothing(tmp_path):
    log = ScalarLog("none", tmp_path / "tb", steps_per_round=3)
    log.step(1, 1, 0.5)
    log.round(SimpleNamespace(round=1, accuracy_before=0.5))
    log.close()
    assert not (tmp_path / "tb").exists()
