"""Find the text, text-pair and label columns of a table and read them into clean rows.

Users name columns however their spreadsheet or scraper did, so the columns are detected from
common names (or taken from ``--text-column`` and friends), rows without text are dropped, and
labels are canonicalized so that ``1``, ``1.0`` and ``"1"`` are one class across formats. Every
problem becomes a one-line :class:`UserError` naming the column and the fix, instead of a tensor
error minutes into the first round. :func:`order_labels` gives the label vocabulary the same
order on every start, because the local head checkpoint is tied to it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from coldfusion_p2p.config import DataConfig
from coldfusion_p2p.contributor.sources import Table
from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

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
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Rows:
    """One split's usable rows, labels still as canonical strings (data.py maps them to indices)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[str]  # canonical label strings, see canonical_label


def detect_columns(columns: Sequence[str], config: DataConfig, where: str) -> tuple[str, str | None, str]:
    """The (text, text pair or None, label) columns: the configured ones, else detected by name."""
    text_column = find_column(columns, config.text_column, TEXT_CANDIDATES, "text", where)
    label_column = find_column(columns, config.label_column, LABEL_CANDIDATES, "label", where)
    if label_column == text_column:
        raise UserError(
            f"the text and label columns of {where} are both {text_column!r}",
            "pass different --text-column and --label-column",
        )
    pair_column = find_column(
        [column for column in columns if column not in (text_column, label_column)],
        config.text_pair_column,
        PAIR_CANDIDATES,
        "text pair",
        where,
        required=False,
        all_columns=columns,
    )
    return text_column, pair_column, label_column


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


def extract_rows(table: Table, text_column: str, pair_column: str | None, label_column: str, where: str) -> Rows:
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
    return Rows(texts=texts, pairs=pairs if pair_column else None, labels=labels)


def _class_name(value: Any, names: Sequence[str]) -> str | None:
    """A ClassLabel integer as its name; -1 (the datasets convention for unlabelled) is missing."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value == -1:
        return None
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    raise ValueError(f"{value!r} is outside the ClassLabel's {len(names)} classes")
