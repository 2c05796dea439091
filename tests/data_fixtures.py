"""Write tiny labelled datasets in every supported format, for the data-loading tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd


def labelled_rows(count: int, labels: tuple[Any, ...] = ("negative", "positive")) -> list[dict[str, Any]]:
    """``count`` rows with distinct texts, cycling through ``labels``."""
    return [{"text": f"example number {index}", "label": labels[index % len(labels)]} for index in range(count)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` in the format named by ``path``'s extension (.csv .tsv .jsonl .json .parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(f"unsupported test format {suffix}")
    return path


def save_dataset(folder: Path, rows: list[dict[str, Any]], class_names: list[str] | None = None) -> Path:
    """A ``datasets.Dataset`` saved with ``save_to_disk``; ``label`` becomes a ClassLabel when names are given."""
    _to_dataset(rows, class_names).save_to_disk(str(folder))
    return folder


def save_dataset_dict(
    folder: Path, splits: dict[str, list[dict[str, Any]]], class_names: list[str] | None = None
) -> Path:
    """A ``datasets.DatasetDict`` saved with ``save_to_disk``, one entry per split name."""
    from datasets import DatasetDict

    DatasetDict({name: _to_dataset(rows, class_names) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def _to_dataset(rows: list[dict[str, Any]], class_names: list[str] | None):
    from datasets import ClassLabel, Dataset, Features, Value

    if class_names is None:
        return Dataset.from_list(rows)
    features = Features(
        {
            name: ClassLabel(names=class_names) if name == "label" else Value("string")
            for name in dict.fromkeys(key for row in rows for key in row)
        }
    )
    encoded = [{**row, "label": class_names.index(row["label"])} for row in rows]
    return Dataset.from_list(encoded, features=features)
