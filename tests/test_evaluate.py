"""The evaluation protocol: held-out test splits, both methods, the summary, the report and the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from coldfusion_p2p.checkpoints import save_body_folder
from coldfusion_p2p.cli import build_parser, main
from coldfusion_p2p.config import EvaluateConfig, TrainingConfig, build_config, field_help
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.evaluate import (
    EvalResult,
    EvalTask,
    finetune_accuracy,
    linear_probe_accuracy,
    load_eval_task,
    parse_base,
    probe_model,
    results_table,
    summarize,
    write_report,
)
from coldfusion_p2p.head_fit import FrozenBody
from coldfusion_p2p.model import body_parameters, load_classifier, load_tokenizer, split_body_head
from coldfusion_p2p.trainer import LocalTrainer, encode_split

from test_cli import assert_one_line_error
from tiny_models import ARCHITECTURES, build_tiny_model, sentiment_rows, write_csv

FAST = dict(batch_size=16, max_length=16)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


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
# The two methods
# ---------------------------------------------------------------------------------------------


def test_finetuning_learns_and_the_fused_base_starts_better(tiny_model_dir, fused_base, sentiment_task):
    original = finetune_accuracy(str(tiny_model_dir), sentiment_task, seed=0, steps=60, lr=3e-3, **FAST)
    assert original >= 0.8
    fused = finetune_accuracy(str(fused_base), sentiment_task, seed=0, steps=10, lr=3e-3, **FAST)
    early = finetune_accuracy(str(tiny_model_dir), sentiment_task, seed=0, steps=10, lr=3e-3, **FAST)
    assert fused >= 0.9 and fused > early


def test_linear_probe_learns_on_a_trained_body_and_leaves_it_unchanged(fused_base, sentiment_task):
    model = load_classifier(str(fused_base), sentiment_task.label_names, seed=0)
    body_before = [parameter.detach().clone() for parameter in body_parameters(model)]
    parameters = dict(model.named_parameters())
    head_before = {name: parameters[name].detach().clone() for name in split_body_head(model).head}
    tokenizer = load_tokenizer(str(fused_base))
    accuracy = probe_model(model, tokenizer, sentiment_task, seed=0, steps=30, lr=1e-2, **FAST)
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
            finetune_accuracy(str(tiny_model_dir), sentiment_task, seed=1, steps=8, lr=3e-3, **FAST),
            linear_probe_accuracy(str(fused_base), sentiment_task, seed=1, steps=8, lr=1e-2, **FAST),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------


def hand_made_results() -> list[EvalResult]:
    accuracies = {  # (dataset, seen, base) -> accuracy per seed
        ("a", True, "original"): [0.5, 0.7],
        ("a", True, "fused"): [0.8, 0.8],
        ("b", True, "original"): [0.6, 0.6],
        ("b", True, "fused"): [0.9, 0.7],
        ("c", False, "original"): [0.4, 0.6],
        ("c", False, "fused"): [0.5, 0.5],
    }
    return [
        EvalResult(f"/models/{base}", base, dataset, seen, "finetune", seed, accuracy, 1.0)
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


def test_results_table_separates_seen_and_unseen():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(results_table(summarize(hand_made_results())))
    text = console.file.getvalue()
    for fragment in ("seen", "unseen", "ALL seen", "original", "fused", "60.0 ± 14.1", "80.0 ± 0.0 (+20.0)"):
        assert fragment in text, (fragment, text)
    assert text.index("ALL seen") < text.index("unseen")


def test_write_report_writes_every_file(tmp_path):
    results = hand_made_results()
    summary = summarize(results)
    paths = write_report(results, summary, tmp_path / "report", config={"seeds": 2})
    assert set(paths) == {"results", "summary", "json", "plot"}
    assert len(read_csv(paths["results"])) == len(results)
    assert len(read_csv(paths["summary"])) == len(summary)
    payload = json.loads(paths["json"].read_text())
    assert payload["config"] == {"seeds": 2} and len(payload["results"]) == len(results)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 5000


# ---------------------------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------------------------


def test_config_defaults_validation_and_help():
    config = build_config({"base": ["bundled"], "unseen": ["x.csv"]}, config_type=EvaluateConfig)
    assert config.evaluation.methods == ["finetune", "linear_probe"] and config.evaluation.seeds == 1
    with pytest.raises(UserError, match="--base"):
        build_config({"dataset": ["x.csv"]}, config_type=EvaluateConfig)
    with pytest.raises(UserError, match="linear_probe"):
        build_config({"base": ["a"], "dataset": ["x"], "methods": ["probe"]}, config_type=EvaluateConfig)
    with pytest.raises(UserError, match="--dataset"):
        build_config({"base": ["a"]}, config_type=EvaluateConfig)
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert "learning rate of full finetuning" in subcommands["evaluate"].format_help()
    assert field_help("lr") == field_help("lr", TrainingConfig) == "peak learning rate of a fresh AdamW each round"
    assert "fresh AdamW each round" in subcommands["join"].format_help()


def test_cli_compares_two_bases_end_to_end(capsys, tiny_model_dir, fused_base, tiny_dataset, tmp_path):
    unseen = write_csv(tmp_path / "unseen.csv", sentiment_rows(60, seed=11, labels=("0", "1")))
    report = tmp_path / "report"
    flags = ["--finetune-steps", "10", "--probe-steps", "20", "--lr", "3e-3", "--probe-lr", "1e-2"]
    flags += ["--batch-size", "16", "--max-length", "16", "--torch-threads", "1", "--report-dir", str(report)]
    bases = ["--base", f"original={tiny_model_dir}", "--base", f"fused={fused_base}"]
    code = main(["evaluate", *bases, "--dataset", str(tiny_dataset), "--unseen", str(unseen), *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "original" in out and "fused" in out and "unseen" in out and str(report) in out
    rows = read_csv(report / "results.csv")
    assert len(rows) == 2 * 2 * 2  # datasets x bases x methods, one seed
    summary = {(row["dataset"], row["method"], row["base_label"]): row for row in read_csv(report / "summary.csv")}
    assert float(summary["sentiment", "linear_probe", "fused"]["delta_vs_first_base"]) > 0.2
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
