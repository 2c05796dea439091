"""The evaluation protocol: held-out test splits, both methods, the summary, the report and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from coldfusion_p2p.cli import build_parser, main
from coldfusion_p2p.config import EvaluateConfig, TrainingConfig, build_config, field_help
from coldfusion_p2p.contributor.checkpoints import save_body_folder
from coldfusion_p2p.contributor.head_fit import FrozenBody
from coldfusion_p2p.contributor.model import body_parameters, load_classifier, load_tokenizer, split_body_head
from coldfusion_p2p.contributor.trainer import EvalStats, LocalTrainer, encode_split
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.evaluation import evaluate
from coldfusion_p2p.evaluation.bases import parse_base
from coldfusion_p2p.evaluation.evaluate import (
    RunOutcome,
    evaluate_bases,
    finetune_run,
    finetune_to_convergence,
    linear_probe_run,
    predict_correct,
    probe_model,
    summarize,
)
from coldfusion_p2p.evaluation.tasks import EvalTask, carve_validation, few_shot_split, load_eval_task

from conftest import assert_one_line_error, read_csv
from tiny_models import ARCHITECTURES, build_tiny_model, sentiment_rows, write_csv

FAST = dict(batch_size=16, max_length=16)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sentiment_task(tiny_dataset) -> EvalTask:
    return load_eval_task(str(tiny_dataset), seen=True, max_train_examples=1000, max_test_examples=500)


@pytest.fixture(scope="module")
def fused_base(tiny_model_dir, tmp_path_factory) -> Path:
    """A 'fused' base: the tiny model's body after finetuning on another sentiment dataset."""
    torch.set_num_threads(1)
    rows = sentiment_rows(120, seed=7, labels=("bad", "good"))
    task = load_eval_task(
        str(write_csv(tmp_path_factory.mktemp("swarm-data") / "swarm.csv", rows)),
        seen=True,
        max_train_examples=1000,
        max_test_examples=500,
    )
    model = load_classifier(str(tiny_model_dir), task.label_names, seed=0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = TrainingConfig(local_steps=60, lr=3e-3, batch_size=16)
    trainer = LocalTrainer(model, tokenizer, task.train, task.test, config, max_length=16)
    trainer.train_round(1)
    assert trainer.evaluate().accuracy >= 0.9
    folder = tmp_path_factory.mktemp("fused") / "round_00003"
    save_body_folder(model, tokenizer, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def test_carved_test_split_is_seeded_disjoint_and_complete(tmp_path):
    rows = [
        {"text": f"{row['text']} number{index}", "label": row["label"]} for index, row in enumerate(sentiment_rows(100))
    ]
    path = write_csv(tmp_path / "reviews.csv", rows)
    first = load_eval_task(str(path), seen=False, max_train_examples=1000, max_test_examples=1000)
    again = load_eval_task(str(path), seen=False, max_train_examples=1000, max_test_examples=1000)
    other_seed = load_eval_task(str(path), seen=False, max_train_examples=1000, max_test_examples=1000, split_seed=1)
    assert first == again and first.test != other_seed.test
    assert first.name == "reviews" and not first.seen and first.label_names == ["negative", "positive"]
    assert len(first.test) == 20 and len(first.train) == 80
    assert not set(first.train.texts) & set(first.test.texts)
    assert set(first.train.texts) | set(first.test.texts) == {row["text"] for row in rows}
    small = load_eval_task(str(path), seen=False, max_train_examples=30, max_test_examples=5, test_fraction=0.5)
    assert len(small.train) == 30 and len(small.test) == 5
    halves = load_eval_task(str(path), seen=False, max_train_examples=1000, max_test_examples=1000, test_fraction=0.5)
    assert set(small.train.texts) <= set(halves.train.texts) and set(small.test.texts) <= set(halves.test.texts)
    labels = {row["text"]: row["label"] for row in rows}
    assert all(
        small.label_names[label] == labels[text]
        for text, label in zip(small.test.texts, small.test.labels, strict=True)
    )


def test_folder_with_train_and_test_files_is_used_as_given(tmp_path):
    folder = tmp_path / "movies"
    train_rows = sentiment_rows(40, seed=1)
    test_rows = [{"text": "good film", "label": "positive"}, {"text": "bad film", "label": "negative"}] * 3
    write_csv(folder / "train.csv", train_rows)
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in test_rows))
    task = load_eval_task(str(folder), seen=True, max_train_examples=1000, max_test_examples=1000)
    assert task.name == "movies" and len(task.train) == 40
    assert sorted(task.train.texts) == sorted(row["text"] for row in train_rows)
    assert task.label_names == ["negative", "positive"] and task.test.text_pairs is None
    assert sorted(zip(task.test.texts, task.test.labels, strict=True)) == sorted(
        [("good film", 1), ("bad film", 0)] * 3
    )
    write_csv(folder / "test.csv", [*test_rows, {"text": "meh", "label": "neutral"}])
    (folder / "test.jsonl").unlink()
    with pytest.raises(UserError, match="neutral"):
        load_eval_task(str(folder), seen=True, max_train_examples=1000, max_test_examples=1000)
    (folder / "test.csv").unlink()
    with pytest.raises(UserError, match="no test file"):
        load_eval_task(str(folder), seen=True, max_train_examples=1000, max_test_examples=1000)


def test_base_specs(tiny_model_dir, tmp_path):
    assert parse_base(f"original={tiny_model_dir}").label == "original"
    assert parse_base(str(tiny_model_dir)).label == tiny_model_dir.name
    run = tmp_path / "run"
    (run / "latest").mkdir(parents=True)
    (run / "latest" / "config.json").write_text("{}")
    assert parse_base(f"fused={run}").path == str(run / "latest")
    with pytest.raises(UserError, match="does not exist"):
        parse_base(f"x={tmp_path / 'missing'}")


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------


def fixed_steps(base, task, steps, seed=0):
    return finetune_run(str(base), task, seed=seed, epochs=0, steps=steps, lr=3e-3, **FAST)


def test_finetuning_learns_and_the_fused_base_starts_better(tiny_model_dir, fused_base, sentiment_task):
    original = fixed_steps(tiny_model_dir, sentiment_task, 60)
    assert original.accuracy >= 0.8 and original.steps == 60 and len(original.correct) == len(sentiment_task.test)
    fused = fixed_steps(fused_base, sentiment_task, 10).accuracy
    early = fixed_steps(tiny_model_dir, sentiment_task, 10).accuracy
    assert fused >= 0.9 and fused > early


def test_convergent_finetuning_stops_early_and_keeps_the_best_state(tiny_model_dir, sentiment_task):
    model = load_classifier(str(tiny_model_dir), sentiment_task.label_names, seed=0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    fit, validation = carve_validation(sentiment_task.train, 0.25, seed=0)
    states = {}

    def snapshot(step, accuracy):
        states[step] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    epochs, per_epoch = 12, -(-len(fit) // 16)
    run = finetune_to_convergence(
        model, tokenizer, fit, validation, seed=0, lr=1e-2, epochs=epochs, patience=2, on_validation=snapshot, **FAST
    )
    steps, accuracies = [step for step, _ in run.history], [accuracy for _, accuracy in run.history]
    assert steps == [per_epoch * epoch for epoch in range(1, len(steps) + 1)]  # once per epoch
    assert run.steps == steps[-1] < epochs * per_epoch  # patience ran out before the last epoch
    best = steps.index(run.best_step)
    assert accuracies[best] == max(accuracies)  # ties go to the lower validation loss
    assert run.best_accuracy == max(accuracies) >= 0.9
    assert len(steps) == best + 1 + 2 and steps[best] != steps[-1]  # two validations without a better one
    for name, tensor in model.state_dict().items():  # the best state is back, not the last one
        assert torch.equal(tensor, states[run.best_step][name]), name
    assert any(not torch.equal(states[run.best_step][name], states[steps[-1]][name]) for name in states[steps[-1]])
    validated = predict_correct(model, encode_split(tokenizer, validation, FAST["max_length"]))
    assert validated.mean() == pytest.approx(run.best_accuracy)


def test_early_stopping_counts_patience_and_breaks_accuracy_ties_by_loss(monkeypatch, tiny_model_dir, sentiment_task):
    scripted = iter([(0.5, 0.70), (0.5, 0.60), (0.5, 0.65), (0.5, 0.66), (0.9, 0.1)])  # (accuracy, loss) per epoch
    monkeypatch.setattr(LocalTrainer, "evaluate", lambda self: EvalStats(*next(scripted), examples=1))
    model = load_classifier(str(tiny_model_dir), sentiment_task.label_names, seed=0)
    fit, validation = carve_validation(sentiment_task.train, 0.25, seed=0)
    run = finetune_to_convergence(
        model, load_tokenizer(str(tiny_model_dir)), fit, validation, seed=0, lr=1e-3, epochs=5, patience=2, **FAST
    )
    per_epoch = -(-len(fit) // 16)
    assert run.best_step == 2 * per_epoch  # the tie at 0.5 goes to the lower loss
    assert run.steps == 4 * per_epoch and len(run.history) == 4  # two validations without a better one: stop


def test_convergent_finetune_run_validates_on_the_train_split_only(tiny_model_dir, sentiment_task):
    run = finetune_run(str(tiny_model_dir), sentiment_task, seed=0, lr=1e-2, epochs=6, patience=3, eval_every=5, **FAST)
    assert [step % 5 for step, _ in run.history[:-1]] == [0] * (len(run.history) - 1)
    assert len(run.correct) == len(sentiment_task.test) and 0 < run.best_step <= run.steps
    assert run.validation_accuracy == max(accuracy for _, accuracy in run.history)
    fit, validation = carve_validation(sentiment_task.train, 0.15, seed=0)
    assert len(validation) == round(0.15 * len(sentiment_task.train)) and len(fit) + len(validation) == 128
    assert not set(validation.texts) & set(fit.texts) and set(fit.texts) | set(validation.texts) == set(
        sentiment_task.train.texts
    )
    assert carve_validation(sentiment_task.train, 0.15, seed=0) == (fit, validation)
    assert carve_validation(sentiment_task.train, 0.15, seed=1)[1] != validation


def test_few_shot_takes_k_per_class_seeded(tiny_model_dir, sentiment_task):
    shots = few_shot_split(sentiment_task.train, 5, seed=0)
    assert sorted(shots.labels) == [0] * 5 + [1] * 5
    assert set(shots.texts) <= set(sentiment_task.train.texts)
    assert few_shot_split(sentiment_task.train, 5, seed=0) == shots != few_shot_split(sentiment_task.train, 5, seed=1)
    assert len(few_shot_split(sentiment_task.train, 1000, seed=0)) == len(sentiment_task.train)  # all of a rare one
    run = evaluate.few_shot_run(str(tiny_model_dir), sentiment_task, seed=0, lr=3e-3, shots=8, steps=6, **FAST)
    assert run.steps == 6 and len(run.correct) == len(sentiment_task.test)


def test_linear_probe_learns_on_a_trained_body_and_leaves_it_unchanged(fused_base, sentiment_task):
    model = load_classifier(str(fused_base), sentiment_task.label_names, seed=0)
    body_before = [parameter.detach().clone() for parameter in body_parameters(model)]
    parameters = dict(model.named_parameters())
    head_before = {name: parameters[name].detach().clone() for name in split_body_head(model).head}
    tokenizer = load_tokenizer(str(fused_base))
    accuracy = probe_model(model, tokenizer, sentiment_task, seed=0, steps=30, lr=1e-2, **FAST).accuracy
    assert accuracy >= 0.9
    assert all(torch.equal(a, b) for a, b in zip(body_before, body_parameters(model), strict=True))
    assert any(not torch.equal(parameters[name], value) for name, value in head_before.items())


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_replayed_body_outputs_match_the_live_frozen_body(architecture, tmp_path, sentiment_task):
    folder = str(build_tiny_model(tmp_path / architecture, architecture))
    tokenizer = load_tokenizer(folder)
    heads = []
    for replay in (True, False):
        model = load_classifier(folder, sentiment_task.label_names, seed=0)
        if replay:
            feed = FrozenBody(model, tokenizer.pad_token_id).prepare(
                encode_split(tokenizer, sentiment_task.test, 16), [0, 3, 5]
            )
            assert feed.replays, f"{architecture} fell back to live forwards"
        probe_model(model, tokenizer, sentiment_task, seed=0, steps=5, lr=1e-2, replay=replay, **FAST)
        parameters = dict(model.named_parameters())
        heads.append([parameters[name].detach() for name in split_body_head(model).head])
    for replayed, live in zip(*heads, strict=True):
        torch.testing.assert_close(replayed, live, atol=1e-5, rtol=1e-4)


def test_same_seed_same_accuracy(tiny_model_dir, fused_base, sentiment_task):
    runs = [
        (
            fixed_steps(tiny_model_dir, sentiment_task, 8, seed=1).correct.tolist(),
            finetune_run(str(tiny_model_dir), sentiment_task, seed=1, lr=3e-3, epochs=2, **FAST).correct.tolist(),
            linear_probe_run(str(fused_base), sentiment_task, seed=1, steps=8, lr=1e-2, **FAST).correct.tolist(),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_evaluate_bases_records_the_majority_rate_and_flags_runs_at_it(monkeypatch, tiny_model_dir, tmp_path):
    folder = tmp_path / "skewed"
    write_csv(folder / "train.csv", sentiment_rows(40, seed=3))
    test_rows = [{"text": "good film", "label": "positive"}] * 6 + [{"text": "bad film", "label": "negative"}] * 2
    write_csv(folder / "test.csv", test_rows)

    def majority_guess(base, task, *, seed, **options):  # always the most common test label
        labels = np.asarray(task.test.labels)
        return RunOutcome(labels == np.bincount(labels).argmax(), steps=1, best_step=1)

    def all_right(base, task, *, seed, **options):
        return RunOutcome(np.ones(len(task.test), dtype=bool), steps=2, best_step=2)

    monkeypatch.setitem(evaluate.METHODS, "finetune", majority_guess)
    monkeypatch.setitem(evaluate.METHODS, "linear_probe", all_right)
    config = build_config(
        {"base": [f"one={tiny_model_dir}"], "unseen": [str(folder)], "seeds": 2, "report_dir": str(tmp_path / "r")},
        config_type=EvaluateConfig,
    )
    results = evaluate_bases(config, console=Console(file=io.StringIO()))
    assert len(results) == 4 and {result.majority_rate for result in results} == {0.75}
    assert {(r.method, r.accuracy, r.at_majority) for r in results} == {
        ("finetune", 0.75, True),
        ("linear_probe", 1.0, False),
    }
    assert {len(result.correct) for result in results} == {8}
    rows = {row["method"]: row for row in summarize(results)}
    assert rows["finetune"]["at_majority"] and rows["finetune"]["at_majority_runs"] == 2
    assert not rows["linear_probe"]["at_majority"] and rows["linear_probe"]["majority_rate"] == 0.75


# ---------------------------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------------------------


def test_config_defaults_validation_and_help():
    config = build_config({"base": ["bundled"], "unseen": ["x.csv"]}, config_type=EvaluateConfig)
    assert config.evaluation.methods == ["finetune", "linear_probe"] and config.evaluation.seeds == 1
    assert config.evaluation.finetune_epochs > 0 and config.evaluation.patience >= 1  # convergent by default
    few_shot = {"base": ["a"], "dataset": ["x"], "methods": ["finetune_few_shot"], "finetune_epochs": 0}
    assert build_config(few_shot, config_type=EvaluateConfig).evaluation.methods == ["finetune_few_shot"]
    for key, value, fragment in (
        ("finetune_epochs", -1, "--finetune-epochs"),
        ("patience", 0, "--patience"),
        ("validation_fraction", 1.0, "--validation-fraction"),
        ("bootstrap_resamples", 0, "--bootstrap-resamples"),
    ):
        with pytest.raises(UserError, match=fragment):
            build_config({"base": ["a"], "dataset": ["x"], key: value}, config_type=EvaluateConfig)
    with pytest.raises(UserError, match="--base"):
        build_config({"dataset": ["x.csv"]}, config_type=EvaluateConfig)
    with pytest.raises(UserError, match="linear_probe"):
        build_config({"base": ["a"], "dataset": ["x"], "methods": ["probe"]}, config_type=EvaluateConfig)
    with pytest.raises(UserError, match="--dataset"):
        build_config({"base": ["a"]}, config_type=EvaluateConfig)
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert "learning rate of full finetuning" in subcommands["evaluate"].format_help()
    assert "claims need 3 or more" in " ".join(subcommands["evaluate"].format_help().split())
    assert field_help("lr") == field_help("lr", TrainingConfig)
    assert field_help("lr").startswith("peak learning rate of a fresh AdamW each round")
    assert "fresh AdamW each round" in subcommands["join"].format_help()


def test_cli_compares_two_bases_end_to_end(capsys, tiny_model_dir, fused_base, tiny_dataset, tmp_path):
    unseen = write_csv(tmp_path / "unseen.csv", sentiment_rows(60, seed=11, labels=("0", "1")))
    report = tmp_path / "report"
    flags = ["--finetune-epochs", "3", "--probe-steps", "20", "--lr", "3e-3", "--probe-lr", "1e-2"]
    flags += ["--methods", "finetune", "linear_probe", "finetune_few_shot", "--few-shot-examples", "4"]
    flags += ["--few-shot-steps", "4", "--bootstrap-resamples", "500"]
    flags += ["--batch-size", "16", "--max-length", "16", "--torch-threads", "1", "--report-dir", str(report)]
    bases = ["--base", f"original={tiny_model_dir}", "--base", f"fused={fused_base}"]
    code = main(["evaluate", *bases, "--dataset", str(tiny_dataset), "--unseen", str(unseen), *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "original" in out and "fused" in out and "unseen" in out and str(report) in out
    assert "95% paired bootstrap CI" in out and "maj" in out
    rows = read_csv(report / "results.csv")
    assert len(rows) == 2 * 2 * 3  # datasets x bases x methods, one seed
    assert all(len(row["correct"]) == 12 for row in rows if row["dataset"] == "unseen")  # 20% of 60
    finetuned = [row for row in rows if row["method"] == "finetune"]
    assert all(0 < int(row["best_step"]) <= int(row["steps"]) <= 3 * 7 for row in finetuned)  # 3 epochs of 7 steps
    assert all(row["validation_accuracy"] for row in finetuned)
    summary = {(row["dataset"], row["method"], row["base_label"]): row for row in read_csv(report / "summary.csv")}
    probe = summary["sentiment", "linear_probe", "fused"]
    assert float(probe["delta_vs_first_base"]) > 0.2 and float(probe["ci_low"]) > 0 and probe["verdict"] == "better"
    assert float(probe["ci_low"]) <= float(probe["delta_vs_first_base"]) <= float(probe["ci_high"])
    assert float(probe["majority_rate"]) == pytest.approx(0.5, abs=0.2) and probe["at_majority"] in ("True", "False")
    assert summary["ALL unseen", "finetune_few_shot", "fused"]["verdict"] in (
        "better",
        "worse",
        "no detectable difference",
    )
    assert summary["sentiment", "finetune", "original"]["ci_low"] == ""  # the reference has no delta
    assert (report / "evaluation.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dataset", "x.csv"], "--base"),
        (["--base", "bundled"], "--dataset"),
        (["--base", "/nowhere/model", "--dataset", "x.csv"], "does not exist"),
        (["--base", "a=/nowhere", "--base", "a=/elsewhere", "--dataset", "x.csv", "--methods", "probe"], "methods"),
    ],
)
def test_cli_errors_are_one_line(capsys, flags, fragment):
    code = main(["evaluate", *flags])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_cli_rejects_duplicate_labels_and_missing_datasets(capsys, tiny_model_dir, tmp_path):
    code = main(["evaluate", "--base", f"a={tiny_model_dir}", "--base", f"a={tiny_model_dir}", "--dataset", "x.csv"])
    assert_one_line_error(code, capsys.readouterr().err, "LABEL=PATH")
    code = main(["evaluate", "--base", str(tiny_model_dir), "--unseen", str(tmp_path / "missing.csv")])
    assert_one_line_error(code, capsys.readouterr().err, "does not exist")


def test_runs_take_the_device_and_precision_flags(tiny_model_dir, sentiment_task, tiny_dataset):
    """--precision bf16 finetunes (to convergence and in a fixed budget) on the CPU; an absent GPU is an error."""
    converged = finetune_run(
        str(tiny_model_dir), sentiment_task, seed=0, lr=1e-2, epochs=2, device="cpu", precision="bf16", **FAST
    )
    fixed = finetune_run(
        str(tiny_model_dir), sentiment_task, seed=0, lr=3e-3, epochs=0, steps=4, device="cpu", precision="bf16", **FAST
    )
    for run in (converged, fixed):
        assert run.correct.dtype == bool and len(run.correct) == len(sentiment_task.test.labels) and run.steps > 0
    if not torch.cuda.is_available():
        flags = {"base": [str(tiny_model_dir)], "dataset": [str(tiny_dataset)], "device": "cuda"}
        settings = build_config(flags, config_type=EvaluateConfig)
        with pytest.raises(UserError, match="--device cuda was asked for"):
            evaluate.method_options(settings.evaluation)
