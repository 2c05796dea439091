"""Turn whatever the user passed as ``--dataset`` into validated train/validation text splits.

A peer's data is private and arrives in many shapes: a CSV exported from a spreadsheet, JSON
lines from a scraper, a parquet file, a folder written by ``datasets``' ``save_to_disk``, or a
Hugging Face Hub name. :func:`load_task_data` is the one entry point: it reads the source
(:mod:`~coldfusion_p2p.contributor.sources`), finds the text, optional text-pair and label
columns and reads clean rows from them (:mod:`~coldfusion_p2p.contributor.columns`), and here
builds the :class:`TaskData` splits with labels mapped to indices of a stable ``label_names``
list. It fails early with a one-line :class:`UserError` (problem and fix) rather than letting a
bad file surface as a tensor error minutes into the first round.

Two properties matter for the rest of the peer:

- ``label_names`` is the same on every start of the same file (sorted, integers numerically, or
  the dataset's own ``ClassLabel`` order), because the local head checkpoint is tied to it.
- When the source has no validation split one is carved from the training rows with a seeded
  permutation (:func:`split_indices`), so a restarted peer validates on exactly the rows it
  validated on before and never trains on them. Test splits are never used: they are for the
  final report, not for choosing between rounds.

The interface other layers use is ``__all__``: :func:`load_task_data`, :class:`TaskData`,
:class:`TextSplit`, :func:`split_indices`, and ``FILE_FORMATS``, the file suffixes
:func:`load_task_data` reads (defined with the readers in ``sources``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coldfusion_p2p.config import DataConfig
from coldfusion_p2p.contributor.columns import Rows, detect_columns, extract_rows, order_labels
from coldfusion_p2p.contributor.sources import FILE_FORMATS, SUPPORTED_SOURCES, Source, read_source
from coldfusion_p2p.errors import UserError

__all__ = ["FILE_FORMATS", "TaskData", "TextSplit", "load_task_data", "split_indices"]

logger = logging.getLogger(__name__)


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


def load_task_data(config: DataConfig, split_seed: int = 0) -> TaskData:
    """Read ``config.dataset``, detect its columns and return validated, index-labelled splits.

    Raises UserError for anything the user can fix: a missing file, an unknown format, absent
    columns, missing labels, a single class, too few rows, or an unreachable Hub dataset.
    """
    if not config.dataset or not str(config.dataset).strip():
        raise UserError("no dataset given", f"pass --dataset with {SUPPORTED_SOURCES} or a Hugging Face Hub name")
    if not 0.0 < config.validation_fraction < 1.0:
        raise UserError("validation_fraction must be between 0 and 1", "pass e.g. --validation-fraction 0.1")
    source = read_source(str(config.dataset))
    text_column, pair_column, label_column = detect_columns(source.train.columns, config, source.description)
    train_rows, validation_rows = _train_and_validation_rows(
        source, text_column, pair_column, label_column, config.validation_fraction, split_seed
    )

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


def _train_and_validation_rows(
    source: Source,
    text_column: str,
    pair_column: str | None,
    label_column: str,
    validation_fraction: float,
    split_seed: int,
) -> tuple[Rows, Rows]:
    """The usable train and validation rows: the source's own validation split, else carved from train."""
    used = [text_column, label_column] + ([pair_column] if pair_column else [])
    train_rows = extract_rows(source.train, text_column, pair_column, label_column, source.description)
    validation_rows = None
    if source.validation is not None:
        missing = [column for column in used if column not in source.validation.columns]
        if missing:
            raise UserError(
                f"the validation split of {source.description} has no column(s) {', '.join(missing)}; "
                f"available columns: {', '.join(source.validation.columns)}",
                "give both splits the same columns",
            )
        validation_rows = extract_rows(
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
        train_indices, validation_indices = split_indices(len(train_rows.labels), validation_fraction, split_seed)
        train_rows, validation_rows = _take(train_rows, train_indices), _take(train_rows, validation_indices)
    return train_rows, validation_rows


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


def _take(rows: Rows, indices: Sequence[int]) -> Rows:
    return Rows(
        texts=[rows.texts[i] for i in indices],
        pairs=None if rows.pairs is None else [rows.pairs[i] for i in indices],
        labels=[rows.labels[i] for i in indices],
    )


def _to_split(rows: Rows, index: dict[str, int]) -> TextSplit:
    return TextSplit(texts=rows.texts, text_pairs=rows.pairs, labels=[index[label] for label in rows.labels])
