"""Data loading: every format, column detection, stable labels and splits, and clear errors."""

from __future__ import annotations

import json
import logging
import time

import pytest

from coldfusion_p2p.config import DataConfig
from coldfusion_p2p.contributor import sources
from coldfusion_p2p.contributor.columns import canonical_label, order_labels
from coldfusion_p2p.contributor.data import TaskData, load_task_data, split_indices
from coldfusion_p2p.contributor.sources import looks_like_path
from coldfusion_p2p.errors import UserError

from data_fixtures import labelled_rows, save_dataset, save_dataset_dict, write_rows


def load(dataset, **settings) -> TaskData:
    return load_task_data(DataConfig(dataset=str(dataset), **settings))


def pairs_of(split, label_names):
    return {(text, label_names[label]) for text, label in zip(split.texts, split.labels, strict=True)}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_each_file_format_loads(tmp_path, suffix):
    rows = labelled_rows(20)
    task = load(write_rows(tmp_path / f"reviews{suffix}", rows))
    assert task.name == "reviews"
    assert (task.text_column, task.text_pair_column, task.label_column) == ("text", None, "label")
    assert task.label_names == ["negative", "positive"] and task.num_labels == 2
    assert (len(task.train), len(task.validation)) == (18, 2)
    assert task.train.text_pairs is None and task.validation.text_pairs is None
    seen = pairs_of(task.train, task.label_names) | pairs_of(task.validation, task.label_names)
    assert seen == {(row["text"], row["label"]) for row in rows}


def test_dataset_name_overrides_the_file_stem(tmp_path):
    task = load(write_rows(tmp_path / "private-export.csv", labelled_rows(10)), dataset_name="movie reviews")
    assert task.name == "movie reviews"


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in labelled_rows(10)))
    assert len(load(path).train) == 9


def test_save_to_disk_dataset(tmp_path):
    task = load(save_dataset(tmp_path / "my-reviews", labelled_rows(30)))
    assert task.name == "my-reviews"
    assert (len(task.train), len(task.validation)) == (27, 3)
    assert task.label_names == ["negative", "positive"]


def test_save_to_disk_dataset_dict_uses_its_validation_split_and_class_label_order(tmp_path):
    train, validation, test = labelled_rows(12), labelled_rows(4), labelled_rows(3)
    for row in validation:
        row["text"] = "validation " + row["text"]
    for row in test:
        row["text"] = "test " + row["text"]
    # ClassLabel order is the dataset's own (not alphabetical) and survives: label ids keep their meaning
    folder = save_dataset_dict(
        tmp_path / "dd", {"train": train, "validation": validation, "test": test}, class_names=["positive", "negative"]
    )
    task = load(folder)
    assert task.label_names == ["positive", "negative"]
    assert pairs_of(task.train, task.label_names) == {(row["text"], row["label"]) for row in train}
    assert pairs_of(task.validation, task.label_names) == {(row["text"], row["label"]) for row in validation}
    assert not any(text.startswith("test ") for text in task.train.texts + task.validation.texts)


def test_dataset_dict_without_validation_carves_it_from_train_and_never_uses_test(tmp_path):
    test = [{"text": f"test {index}", "label": "positive"} for index in range(5)]
    task = load(save_dataset_dict(tmp_path / "dd", {"train": labelled_rows(10), "test": test}))
    assert (len(task.train), len(task.validation)) == (9, 1)
    assert not any(text.startswith("test ") for text in task.train.texts + task.validation.texts)


def test_dataset_dict_with_dev_split(tmp_path):
    task = load(save_dataset_dict(tmp_path / "dd", {"train": labelled_rows(10), "dev": labelled_rows(3)}))
    assert (len(task.train), len(task.validation)) == (10, 3)


def test_pair_columns_are_detected(tmp_path):
    rows = [
        {
            "premise": f"premise {index}",
            "hypothesis": f"hypothesis {index}",
            "label": ["entailment", "neutral"][index % 2],
        }
        for index in range(10)
    ]
    task = load(write_rows(tmp_path / "nli.jsonl", rows))
    assert (task.text_column, task.text_pair_column, task.label_column) == ("premise", "hypothesis", "label")
    for split in (task.train, task.validation):
        assert split.text_pairs is not None
        for text, pair in zip(split.texts, split.text_pairs, strict=True):
            assert text.replace("premise", "hypothesis") == pair


def test_explicit_and_case_insensitive_columns(tmp_path):
    rows = [{"Utterance": f"say {index}", "Reply": f"reply {index}", "intent": f"i{index % 3}"} for index in range(12)]
    path = write_rows(tmp_path / "chat.csv", rows)
    task = load(path, text_column="utterance", text_pair_column="Reply", label_column="INTENT")
    assert (task.text_column, task.text_pair_column, task.label_column) == ("Utterance", "Reply", "intent")
    assert task.label_names == ["i0", "i1", "i2"]
    assert task.train.text_pairs is not None
    detected = load(write_rows(tmp_path / "auto.csv", [{"Text": "a", "Label": 0}, {"Text": "b", "Label": 1}]))
    assert (detected.text_column, detected.label_column) == ("Text", "Label")


def test_integer_labels_sort_numerically_and_map_to_themselves(tmp_path):
    rows = [{"text": f"row {index}", "label": index % 12} for index in range(48)]
    for suffix in (".csv", ".jsonl", ".parquet"):
        task = load(write_rows(tmp_path / f"ints{suffix}", rows))
        assert task.label_names == [str(index) for index in range(12)]
        by_text = {row["text"]: row["label"] for row in rows}
        for split in (task.train, task.validation):
            assert all(by_text[text] == label for text, label in zip(split.texts, split.labels, strict=True))


def test_string_and_bool_labels_are_sorted(tmp_path):
    rows = labelled_rows(9, labels=("sports", "business", "world"))
    assert load(write_rows(tmp_path / "news.csv", rows)).label_names == ["business", "sports", "world"]
    flags = labelled_rows(6, labels=(True, False))
    assert load(write_rows(tmp_path / "flags.jsonl", flags)).label_names == ["False", "True"]


def test_label_helpers():
    assert [canonical_label(value) for value in (1, 1.0, "1", " pos ", True, None, float("nan"), "")] == [
        "1",
        "1",
        "1",
        "pos",
        "True",
        None,
        None,
        None,
    ]
    with pytest.raises(ValueError):
        canonical_label(0.5)
    assert order_labels(["10", "2", "-1", "2"]) == ["-1", "2", "10"]
    assert order_labels(["b", "a", "10", "2"]) == ["10", "2", "a", "b"]
    assert order_labels(["pos"], class_names=["pos", "neg"]) == ["pos", "neg"]


def test_split_is_deterministic_and_seeded(tmp_path):
    path = write_rows(tmp_path / "data.csv", labelled_rows(100))
    first, again = load_task_data(DataConfig(dataset=str(path)), 0), load_task_data(DataConfig(dataset=str(path)), 0)
    assert first == again
    other = load_task_data(DataConfig(dataset=str(path)), split_seed=1)
    assert other.validation.texts != first.validation.texts
    assert len(first.validation) == 10
    assert not set(first.train.texts) & set(first.validation.texts)
    assert len(set(first.train.texts) | set(first.validation.texts)) == 100
    bigger = load_task_data(DataConfig(dataset=str(path), validation_fraction=0.25))
    assert (len(bigger.train), len(bigger.validation)) == (75, 25)


def test_split_indices_keep_at_least_one_row_on_each_side():
    assert split_indices(2, 0.1, 0)[0] and split_indices(2, 0.1, 0)[1]
    train, validation = split_indices(10, 0.99, 0)
    assert (len(train), len(validation)) == (1, 9)
    assert sorted(train + validation) == list(range(10))


def test_na_like_texts_stay_strings(tmp_path):
    rows = [{"text": text, "label": label} for text, label in [("NA", "a"), ("null", "b"), ("None", "a"), ("n/a", "b")]]
    for suffix in (".csv", ".tsv", ".jsonl"):
        task = load(write_rows(tmp_path / f"na{suffix}", rows))
        assert sorted(task.train.texts + task.validation.texts) == ["NA", "None", "n/a", "null"]


def test_rows_with_empty_text_are_dropped(tmp_path, caplog):
    rows = [*labelled_rows(10), {"text": "", "label": "positive"}, {"text": "   ", "label": "negative"}]
    with caplog.at_level(logging.WARNING, logger="coldfusion_p2p.contributor.columns"):
        task = load(write_rows(tmp_path / "gaps.csv", rows))
    assert len(task.train) + len(task.validation) == 10
    assert "dropped 2 of 12 rows" in caplog.text


def test_labels_only_in_validation_are_fine(tmp_path):
    train = labelled_rows(6)
    validation = [{"text": "rare", "label": "mixed"}, {"text": "common", "label": "positive"}]
    task = load(save_dataset_dict(tmp_path / "dd", {"train": train, "validation": validation}))
    assert task.label_names == ["mixed", "negative", "positive"]
    assert task.validation.labels == [0, 2]


# --- errors ---------------------------------------------------------------------------------


def test_missing_files_and_unknown_formats(tmp_path):
    with pytest.raises(UserError, match=r"dataset file .*absent\.csv does not exist; check the --dataset path"):
        load(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="does not exist"):
        load("./no/such/folder")
    sheet = tmp_path / "sheet.xlsx"
    sheet.write_bytes(b"PK")
    with pytest.raises(UserError, match=r"unsupported format '\.xlsx'.*\.csv/\.tsv/\.jsonl/\.json/\.parquet"):
        load(sheet)
    with pytest.raises(UserError, match="no dataset given"):
        load_task_data(DataConfig())
    plain = tmp_path / "plain-folder"
    plain.mkdir()
    with pytest.raises(UserError, match="not a dataset written by save_to_disk"):
        load(plain)


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(UserError, match=r"line 2 of .* is not valid JSON"):
        load(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="not a list of JSON objects"):
        load(scalar)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="could not read dataset file"):
        load(empty)


def test_missing_columns_list_the_available_ones(tmp_path):
    path = write_rows(tmp_path / "data.csv", [{"words": "a", "verdict": "x"}, {"words": "b", "verdict": "y"}])
    with pytest.raises(
        UserError, match=r"no text column found .*available columns: words, verdict; pass --text-column"
    ):
        load(path)
    with pytest.raises(
        UserError, match=r"no label column found .*available columns: words, verdict; pass --label-column"
    ):
        load(path, text_column="words")
    with pytest.raises(
        UserError,
        match=r"column 'txt' not found in file .*data\.csv; available columns: words, verdict; pass --text-column",
    ):
        load(path, text_column="txt", label_column="verdict")
    with pytest.raises(UserError, match=r"column 'lbl' not found .*; pass --label-column"):
        load(path, text_column="words", label_column="lbl")
    with pytest.raises(UserError, match=r"column 'other' not found .*; pass --text-pair-column"):
        load(path, text_column="words", label_column="verdict", text_pair_column="other")
    assert len(load(path, text_column="words", label_column="verdict").train) == 1


def test_missing_labels_are_counted(tmp_path):
    rows = [*labelled_rows(8), {"text": "no label", "label": ""}, {"text": "no label either", "label": ""}]
    with pytest.raises(UserError, match=r"2 of 10 rows of file .* have no label in column 'label'; fill in or remove"):
        load(write_rows(tmp_path / "holes.csv", rows))
    nulls = [*labelled_rows(4), {"text": "null label", "label": None}]
    with pytest.raises(UserError, match="1 of 5 rows"):
        load(write_rows(tmp_path / "holes.jsonl", nulls))


def test_nan_labels_are_missing_never_a_class(tmp_path):
    """A NaN label, whether a float or the text numpy and pandas write for it, is a missing label."""
    for suffix, nan in ((".csv", "NaN"), (".csv", "nan"), (".tsv", "<NA>"), (".jsonl", float("nan"))):
        rows = [*labelled_rows(8), {"text": "no label", "label": nan}]
        with pytest.raises(UserError, match=r"1 of 9 rows of file .* have no label in column 'label'; fill in"):
            load(write_rows(tmp_path / f"nan{suffix}", rows))
    assert canonical_label("Nan ") is None and canonical_label("nano") == "nano"


def test_bad_label_values(tmp_path):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}]
    with pytest.raises(UserError, match="not a class label"):
        load(write_rows(tmp_path / "scores.jsonl", rows))
    infinite = [*labelled_rows(4), {"text": "c", "label": float("inf")}]
    with pytest.raises(UserError, match="infinite, not a class"):
        load(write_rows(tmp_path / "inf.jsonl", infinite))


def test_too_few_classes_or_rows(tmp_path):
    with pytest.raises(UserError, match="only one class \\('positive'\\)"):
        load(write_rows(tmp_path / "one-class.csv", labelled_rows(5, labels=("positive",))))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(UserError, match="has no rows with text in column 'text'"):
        load(header_only)
    blank = write_rows(tmp_path / "blank.csv", [{"text": "", "label": "a"}, {"text": " ", "label": "b"}])
    with pytest.raises(UserError, match="has no rows with text"):
        load(blank)
    with pytest.raises(UserError, match="only 1 usable row"):
        load(write_rows(tmp_path / "single.csv", [{"text": "alone", "label": "a"}]))


def test_validation_split_must_have_the_same_columns(tmp_path):
    splits = {"train": labelled_rows(4), "validation": [{"sentence": "x", "label": "positive"}]}
    with pytest.raises(UserError, match=r"validation split of folder .* has no column\(s\) text"):
        load(save_dataset_dict(tmp_path / "dd", splits))


def test_looks_like_path():
    assert not looks_like_path("imdb") and not looks_like_path("stanfordnlp/imdb")
    assert looks_like_path("reviews.csv") and looks_like_path("data/private/reviews")
    assert looks_like_path("./reviews") and looks_like_path("/abs/reviews") and looks_like_path("~/reviews")


# --- Hub names ------------------------------------------------------------------------------


def _assert_flags_restored(before: tuple) -> None:
    import datasets.config
    import huggingface_hub.constants

    assert before == (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)


def _offline_flags() -> tuple:
    import datasets.config
    import huggingface_hub.constants

    return datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE


def test_hub_name_offline_is_a_fast_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before = _offline_flags()
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        load("nobody-here/no-such-dataset")
    assert time.monotonic() - start < 15
    message = str(caught.value)
    assert message.startswith(
        "dataset 'nobody-here/no-such-dataset' is not a local file or folder and could not be loaded "
        "from the Hugging Face Hub (offline mode is on"
    )
    assert message.endswith("pass a path to a .csv/.tsv/.jsonl/.json/.parquet file or a save_to_disk folder")
    assert "\n" not in message
    _assert_flags_restored(before)


def _online_environment(monkeypatch):
    """Pretend no offline flag is set anywhere (the flags are module globals read at import)."""
    import datasets.config
    import huggingface_hub.constants

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    _online_environment(monkeypatch)
    monkeypatch.setattr(sources, "_probe_hub", lambda name: "[Errno -2] Name or service not known")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"\(the Hub is unreachable: \[Errno -2\] Name or service not known; no cached"):
        load("nobody-here/no-such-dataset")
    assert time.monotonic() - start < 15
    _assert_flags_restored((False, False))


def test_invalid_hub_name_is_rejected_before_any_request(monkeypatch):
    _online_environment(monkeypatch)
    with pytest.raises(UserError, match="not a valid Hub dataset name"):
        load("not a dataset!")
