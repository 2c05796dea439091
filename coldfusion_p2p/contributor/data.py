"""Turn whatever the user passed as ``--dataset`` into validated train/validation text splits.

A peer's data is private and arrives in many shapes: a CSV exported from a spreadsheet, JSON
lines from a scraper, a parquet file, a folder written by ``datasets``' ``save_to_disk``, or a
Hugging Face Hub name. This module reads each of them, finds the text, optional text-pair and
label columns, drops rows without text, and maps labels to indices of a stable ``label_names``
list. It fails early with a one-line :class:`UserError` (problem and fix) rather than letting a
bad file surface as a tensor error minutes into the first round.

Two properties matter for the rest of the peer:

- ``label_names`` is the same on every start of the same file (sorted, integers numerically, or
  the dataset's own ``ClassLabel`` order), because the local head checkpoint is tied to it.
- When the source has no validation split one is carved from the training rows with a seeded
  permutation, so a restarted peer validates on exactly the rows it validated on before and
  never trains on them. Test splits are never used: they are for the final report, not for
  choosing between rounds.

Files are read with pandas (or the ``json`` module) rather than ``datasets.load_dataset`` so that
a private file is never copied into the shared ``datasets`` cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coldfusion_p2p.config import DataConfig
from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
TEXT_CANDIDATES = (
    "text",
    "sentence",
    "sentence1",
    "premise",
    "question",
    "content",
    "review",
    "document",
    "body",
    "tweet",
)
PAIR_CANDIDATES = ("text_pair", "sentence2", "hypothesis", "answer")
LABEL_CANDIDATES = ("label", "labels", "class", "category", "target", "sentiment")
VALIDATION_SPLITS = ("validation", "valid", "dev")
TEST_SPLITS = ("test",)
HUB_PROBE_TIMEOUT = 5.0  # seconds; one metadata request decides whether the Hub is reachable at all

SUPPORTED_SOURCES = "a path to a .csv/.tsv/.jsonl/.json/.parquet file or a save_to_disk folder"
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class TextSplit:
    """One split as plain lists: what the trainer tokenizes, in this order."""

    texts: list[str]
    text_pairs: list[str] | None  # None for single-sentence tasks
    labels: list[int]  # indices into TaskData.label_names

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    """A peer's task: its public name, both splits and the label vocabulary the head is built on."""

    name: str
    train: TextSplit
    validation: TextSplit
    label_names: list[str]
    text_column: str
    text_pair_column: str | None
    label_column: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class _Table:
    """A split whose columns are read only on demand (a saved dataset may hold large unused columns)."""

    columns: list[str]
    read: Callable[[str], list[Any]]
    class_names: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel names per column


@dataclass(frozen=True)
class _Source:
    name: str  # default public name
    description: str  # for error messages: "file x.csv", "folder x", "Hub dataset 'x'"
    train: _Table
    validation: _Table | None


@dataclass(frozen=True)
class _Rows:
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]  # canonical label strings, see canonical_label


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def load_task_data(config: DataConfig, split_seed: int = 0) -> TaskData:
    """Read ``config.dataset``, detect its columns and return validated, index-labelled splits.

    Raises UserError for anything the user can fix: a missing file, an unknown format, absent
    columns, missing labels, a single class, too few rows, or an unreachable Hub dataset.
    """
    if not config.dataset or not str(config.dataset).strip():
        raise UserError("no dataset given", f"pass --dataset with {SUPPORTED_SOURCES} or a Hugging Face Hub name")
    if not 0.0 < config.validation_fraction < 1.0:
        raise UserError("validation_fraction must be between 0 and 1", "pass e.g. --validation-fraction 0.1")
    source = _read_source(str(config.dataset))
    columns = source.train.columns
    text_column = find_column(columns, config.text_column, TEXT_CANDIDATES, "text", source.description)
    label_column = find_column(columns, config.label_column, LABEL_CANDIDATES, "label", source.description)
    if label_column == text_column:
        raise UserError(
            f"the text and label columns of {source.description} are both {text_column!r}",
            "pass different --text-column and --label-column",
        )
    pair_column = find_column(
        [column for column in columns if column not in (text_column, label_column)],
        config.text_pair_column,
        PAIR_CANDIDATES,
        "text pair",
        source.description,
        required=False,
        all_columns=columns,
    )
    used = [text_column, label_column] + ([pair_column] if pair_column else [])

    train_rows = _extract_rows(source.train, text_column, pair_column, label_column, source.description)
    validation_rows = None
    if source.validation is not None:
        missing = [column for column in used if column not in source.validation.columns]
        if missing:
            raise UserError(
                f"the validation split of {source.description} has no column(s) {', '.join(missing)}; "
                f"available columns: {', '.join(source.validation.columns)}",
                "give both splits the same columns",
            )
        validation_rows = _extract_rows(
            source.validation, text_column, pair_column, label_column, f"the validation split of {source.description}"
        )
        if not validation_rows.labels:
            logger.warning("the validation split of %s has no usable rows; carving one from train", source.description)
            validation_rows = None
    if not train_rows.labels:
        raise UserError(
            f"{source.description} has no rows with text in column {text_column!r}",
            "check the file, or pass the right --text-column",
        )
    if validation_rows is None:
        if len(train_rows.labels) < 2:
            raise UserError(
                f"{source.description} has only {len(train_rows.labels)} usable row; at least 2 are needed "
                "to carve a validation split",
                "add more rows",
            )
        train_indices, validation_indices = split_indices(
            len(train_rows.labels), config.validation_fraction, split_seed
        )
        train_rows, validation_rows = _take(train_rows, train_indices), _take(train_rows, validation_indices)

    all_labels = train_rows.labels + validation_rows.labels
    distinct = sorted(set(all_labels))
    if len(distinct) < 2:
        raise UserError(
            f"{source.description} has only one class ({distinct[0]!r}) in column {label_column!r}; "
            "classification needs at least two",
            "add examples of other classes, or pass the right --label-column",
        )
    label_names = order_labels(all_labels, source.train.class_names.get(label_column))
    index = {name: position for position, name in enumerate(label_names)}
    return TaskData(
        name=config.dataset_name or source.name,
        train=_to_split(train_rows, index),
        validation=_to_split(validation_rows, index),
        label_names=label_names,
        text_column=text_column,
        text_pair_column=pair_column,
        label_column=label_column,
    )


# ---------------------------------------------------------------------------------------------
# Pure helpers: columns, labels, splits
# ---------------------------------------------------------------------------------------------


def find_column(
    columns: Sequence[str],
    given: str | None,
    candidates: Sequence[str],
    role: str,
    where: str,
    required: bool = True,
    all_columns: Sequence[str] | None = None,
) -> str | None:
    """The column for ``role``: the given one (must exist) or the first candidate present.

    Matching is exact first, then case-insensitive, so ``Text`` works but a file holding both
    ``text`` and ``Text`` picks the exact one.
    """
    listing = ", ".join(all_columns if all_columns is not None else columns)
    flag = f"--{role.replace(' ', '-')}-column"
    if given is not None:
        match = _match(columns, given)
        if match is None:
            raise UserError(
                f"column {given!r} not found in {where}; available columns: {listing}",
                f"pass {flag} with one of them",
            )
        return match
    for candidate in candidates:
        match = _match(columns, candidate)
        if match is not None:
            return match
    if not required:
        return None
    raise UserError(
        f"no {role} column found in {where} (looked for {', '.join(candidates)}); available columns: {listing}",
        f"pass {flag} with one of them",
    )


def _match(columns: Sequence[str], name: str) -> str | None:
    if name in columns:
        return name
    folded = [column for column in columns if column.casefold() == name.casefold()]
    return folded[0] if folded else None


MISSING_LABEL_TEXTS = ("nan", "-nan", "<na>")  # a missing number written out as text


def canonical_label(value: Any) -> str | None:
    """A label as a string, or None when missing; raises ValueError for values that are not classes.

    Integers (and integral floats, which is what pandas makes of an integer column with a gap)
    become their decimal string, so ``1``, ``1.0`` and ``"1"`` are one class across formats.
    ``"nan"`` and ``"<NA>"`` (how numpy and pandas write a missing number as text) are missing,
    never a class of their own.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA:
        return None
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise ValueError(f"{value} is infinite, not a class")
        if value.is_integer():
            return str(int(value))
        raise ValueError(f"{value} is a fraction, not a class")
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in MISSING_LABEL_TEXTS else text or None
    raise ValueError(f"{type(value).__name__} value {str(value)[:40]!r} is not a class")


def order_labels(labels: Sequence[str], class_names: Sequence[str] | None = None) -> list[str]:
    """The label vocabulary, identical on every restart: a ClassLabel's own order, else sorted.

    Integer labels sort numerically so that labels 0..k-1 keep their own index. Names seen in
    the data but missing from ``class_names`` cannot happen for a consistent ClassLabel; they are
    appended sorted rather than dropped.
    """
    distinct = set(labels)
    if class_names is not None:
        return list(class_names) + sorted(distinct - set(class_names))
    if all(_INTEGER.fullmatch(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, validation) row indices: a seeded permutation, each part in file order.

    At least one row goes to each side. The same count, fraction and seed always give the same
    split, so a restarted peer never trains on rows it validated on before.
    """
    if count < 2:
        raise ValueError("need at least 2 rows to split")
    size = min(max(1, round(count * fraction)), count - 1)
    permutation = np.random.default_rng(seed).permutation(count)
    return sorted(permutation[size:].tolist()), sorted(permutation[:size].tolist())


def _take(rows: _Rows, indices: Sequence[int]) -> _Rows:
    return _Rows(
        texts=[rows.texts[i] for i in indices],
        pairs=None if rows.pairs is None else [rows.pairs[i] for i in indices],
        labels=[rows.labels[i] for i in indices],
    )


def _to_split(rows: _Rows, index: dict[str, int]) -> TextSplit:
    return TextSplit(texts=rows.texts, text_pairs=rows.pairs, labels=[index[label] for label in rows.labels])


def _text(value: Any) -> str | None:
    """Text as a string, or None when missing or blank (such rows are dropped, not trained on)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool | int | float):
        return str(value)
    raise ValueError(f"{type(value).__name__} values are not text")


def _extract_rows(table: _Table, text_column: str, pair_column: str | None, label_column: str, where: str) -> _Rows:
    """Read the used columns, drop rows without text and canonicalize labels (UserError on bad labels)."""
    raw_texts = table.read(text_column)
    raw_pairs = table.read(pair_column) if pair_column else None
    raw_labels = table.read(label_column)
    class_names = table.class_names.get(label_column)
    texts, pairs, labels, missing_labels, dropped = [], [], [], 0, 0
    for row, raw_label in enumerate(raw_labels):
        try:
            text = _text(raw_texts[row])
            pair = _text(raw_pairs[row]) if raw_pairs is not None else ""
        except ValueError as error:
            column = text_column if pair_column is None else f"{text_column}/{pair_column}"
            raise UserError(
                f"column {column!r} of {where} holds non-text values ({error})",
                "pass --text-column (and --text-pair-column) naming string columns",
            ) from None
        if text is None or pair is None:
            dropped += 1
            continue
        try:
            label = _class_name(raw_label, class_names) if class_names is not None else canonical_label(raw_label)
        except ValueError as error:
            raise UserError(
                f"column {label_column!r} of {where} holds a value that is not a class label (row {row + 1}: {error})",
                "labels must be strings or integers; pass the right --label-column",
            ) from None
        if label is None:
            missing_labels += 1
            continue
        texts.append(text)
        pairs.append(pair)
        labels.append(label)
    if missing_labels:
        raise UserError(
            f"{missing_labels} of {len(raw_labels)} rows of {where} have no label in column {label_column!r}",
            "fill in or remove those rows in the dataset",
        )
    if dropped:
        logger.warning("dropped %d of %d rows of %s with empty text", dropped, len(raw_labels), where)
    return _Rows(texts=texts, pairs=pairs if pair_column else None, labels=labels)


def _class_name(value: Any, names: Sequence[str]) -> str | None:
    """A ClassLabel integer as its name; -1 (the datasets convention for unlabelled) is missing."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value == -1:
        return None
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    raise ValueError(f"{value!r} is outside the ClassLabel's {len(names)} classes")


# ---------------------------------------------------------------------------------------------
# Sources: files, save_to_disk folders, Hub names
# ---------------------------------------------------------------------------------------------


def _read_source(dataset: str) -> _Source:
    """Dispatch on what ``dataset`` is: an existing file or folder, a path-like typo, or a Hub name."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path)
    if looks_like_path(dataset):
        raise UserError(f"dataset file {dataset} does not exist", "check the --dataset path")
    return _read_hub(dataset)


def looks_like_path(text: str) -> bool:
    """True for strings the user surely meant as a local path, so a typo is not sent to the Hub.

    Hub names are ``name`` or ``namespace/name``: one slash at most and no data-file extension.
    """
    if Path(text).suffix.lower() in FILE_FORMATS:
        return True
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text:
        return True
    return text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _read_file(path: Path) -> _Source:
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise UserError(
            f"dataset file {path} has an unsupported format {suffix or '(no extension)'!r}",
            f"pass {SUPPORTED_SOURCES}",
        )
    try:
        frame = _read_frame(path, suffix)
    except UserError:
        raise
    except Exception as error:  # pandas, pyarrow and json each raise their own parse errors
        raise UserError(
            f"could not read dataset file {path} ({_short(error)})", f"check that it is a valid {suffix[1:]} file"
        ) from None
    frame.columns = [str(column) for column in frame.columns]
    table = _Table(columns=list(frame.columns), read=lambda column: frame[column].tolist())
    return _Source(name=path.stem, description=f"file {path}", train=table, validation=None)


def _read_frame(path: Path, suffix: str) -> pd.DataFrame:
    """Read every cell as written: "NA", "null" or "None" in a text column stay strings."""
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(
            path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, na_values=[""]
        )
    if suffix == ".parquet":
        return pd.read_parquet(path)
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _json_lines(text, path)  # many .json files are really JSON lines
    else:
        data = _json_lines(text, path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"dataset file {path} is not a list of JSON objects", "write one object per row")
    return pd.DataFrame.from_records(data) if data else pd.DataFrame()


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"line {number} of {path} is not valid JSON ({error.msg})", "fix or remove it") from None
    return rows


def _read_folder(path: Path) -> _Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError for plain folders, arrow errors for damaged ones
        raise UserError(
            f"folder {path} is not a dataset written by save_to_disk ({_short(error)})",
            f"pass {SUPPORTED_SOURCES}",
        ) from None
    return _source_from_datasets(loaded, name=path.name, description=f"folder {path}")


def _source_from_datasets(loaded: Any, name: str, description: str) -> _Source:
    """Pick train and validation from a Dataset or DatasetDict; test splits are deliberately ignored."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return _Source(name=name, description=description, train=_dataset_table(loaded), validation=None)
    splits = list(loaded)
    if not splits:
        raise UserError(f"{description} holds no splits", f"pass {SUPPORTED_SOURCES}")
    train_split = pick_train_split(splits)
    validation_split = next((s for s in VALIDATION_SPLITS if s in splits and s != train_split), None)
    if train_split != "train":
        logger.warning("%s has no 'train' split; training on split %r", description, train_split)
    ignored = [s for s in splits if s not in (train_split, validation_split)]
    if ignored:
        logger.info("ignoring split(s) %s of %s", ", ".join(ignored), description)
    return _Source(
        name=name,
        description=description,
        train=_dataset_table(loaded[train_split]),
        validation=_dataset_table(loaded[validation_split]) if validation_split else None,
    )


def pick_train_split(splits: Sequence[str]) -> str:
    """``train``, else the first split that is neither validation nor test, else the first split."""
    if "train" in splits:
        return "train"
    others = [s for s in splits if s not in VALIDATION_SPLITS + TEST_SPLITS]
    return others[0] if others else splits[0]


def _dataset_table(dataset: Any) -> _Table:
    from datasets import ClassLabel

    class_names = {name: list(f.names) for name, f in dataset.features.items() if isinstance(f, ClassLabel)}
    return _Table(
        columns=list(dataset.column_names), read=lambda column: list(dataset[column]), class_names=class_names
    )


def _read_hub(name: str) -> _Source:
    """``datasets.load_dataset(name)``, failing within seconds when offline or the Hub is unreachable.

    ``datasets`` retries an unreachable Hub for about half a minute, so one short metadata request
    goes first; when it fails, the load runs in offline mode, which still finds a cached copy.
    """
    import datasets

    offline = hub_offline()
    unreachable = None if offline else _probe_hub(name)
    try:
        with _forced_offline(offline or unreachable is not None):
            loaded = datasets.load_dataset(name)
    except Exception as error:  # offline, not found, needs a config name, broken data files...
        if isinstance(error, ConnectionError) and offline:
            reason = "offline mode is on (HF_HUB_OFFLINE) and no cached copy was found"
        elif isinstance(error, ConnectionError) and unreachable is not None:
            reason = f"the Hub is unreachable: {unreachable}; no cached copy was found"
        else:
            reason = _short(error)
        raise _hub_error(name, reason) from None
    return _source_from_datasets(loaded, name=name, description=f"Hub dataset {name!r}")


def _probe_hub(name: str) -> str | None:
    """None when the Hub answers for ``name``; a short reason when it cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT)
    except HFValidationError:
        raise _hub_error(name, "not a valid Hub dataset name") from None
    except RepositoryNotFoundError:
        raise _hub_error(name, "no such dataset on the Hub, or it is private") from None
    except Exception as error:  # httpx/requests connection errors, timeouts, 5xx answers
        return _short(error)
    return None


def hub_offline() -> bool:
    """Offline mode as the environment says *now*: datasets and huggingface_hub read it at import."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(flag, "").strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


@contextmanager
def _forced_offline(enabled: bool) -> Iterator[None]:
    """Temporarily switch datasets and huggingface_hub to offline mode (their flags are module globals)."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    flags = [
        (module, attribute)
        for module, attribute in (
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        )
        if hasattr(module, attribute)
    ]
    saved = [getattr(module, attribute) for module, attribute in flags]
    try:
        for module, attribute in flags:
            setattr(module, attribute, True)
        yield
    finally:
        for (module, attribute), value in zip(flags, saved, strict=True):
            setattr(module, attribute, value)


def _hub_error(name: str, reason: str) -> UserError:
    return UserError(
        f"dataset {name!r} is not a local file or folder and could not be loaded from the Hugging Face Hub ({reason})",
        f"pass {SUPPORTED_SOURCES}",
    )


def _short(error: BaseException) -> str:
    """The first line of an exception, capped, for one-line UserErrors."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    return first if len(first) <= 200 else first[:197] + "..."
