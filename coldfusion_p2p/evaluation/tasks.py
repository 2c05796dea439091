"""The evaluation's datasets: each one read once into a train split and a held-out test split.

Every base is judged on exactly the same rows, so the choices that fix them (which file is the
test split, the seeded carve when there is none, the seeded subsamples, the validation split
carved for early stopping, the few-shot examples) live here, apart from the training that uses
them in :mod:`coldfusion_p2p.evaluation.evaluate`. A dataset is a folder holding ``train.<ext>``
and ``test.<ext>`` (used as given), or anything ``--dataset`` accepts, whose test split is then
its validation split or a seeded fraction of its rows
(:func:`coldfusion_p2p.contributor.data.split_indices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coldfusion_p2p.config import DataConfig, EvaluateConfig
from coldfusion_p2p.contributor.data import FILE_FORMATS, TaskData, TextSplit, load_task_data, split_indices
from coldfusion_p2p.errors import UserError


@dataclass(frozen=True)
class EvalTask:
    """One dataset of the evaluation: a train split, a held-out test split and the label vocabulary."""

    name: str
    train: TextSplit
    test: TextSplit
    label_names: list[str]
    seen: bool


def load_eval_task(
    spec: str,
    *,
    seen: bool,
    max_train_examples: int,
    max_test_examples: int,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> EvalTask:
    """Read a dataset for evaluation; UserError for anything unusable.

    ``spec`` is a folder holding ``train.<ext>`` and ``test.<ext>`` (used as given), or anything
    ``--dataset`` accepts (a file, a ``save_to_disk`` folder, a Hub name): then its validation
    split, or a seeded ``test_fraction`` carved from its rows, is the test split. Both splits are
    then subsampled (seeded) to at most ``max_train_examples`` / ``max_test_examples``.
    """
    path = Path(spec).expanduser()
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    train_file = _split_file(path, "train") if path.is_dir() else None
    if train_file is not None:
        test_file = _split_file(path, "test")
        if test_file is None:
            raise UserError(
                f"folder {path} has {train_file.name} but no test file",
                f"add test{train_file.suffix} beside it, or pass {train_file} alone to carve a test split",
            )
        name = path.name
        train_data = load_task_data(DataConfig(dataset=str(train_file), **columns), split_seed)
        test_data = load_task_data(
            DataConfig(
                dataset=str(test_file),
                text_column=train_data.text_column,
                text_pair_column=train_data.text_pair_column,
                label_column=train_data.label_column,
            ),
            split_seed,
        )
        if (test_data.text_pair_column is None) != (train_data.text_pair_column is None):
            raise UserError(
                f"{train_file} and {test_file} disagree on the text pair column "
                f"({train_data.text_pair_column} vs {test_data.text_pair_column})",
                "give both files the same columns",
            )
        label_names = train_data.label_names
        train = _whole(train_data)
        test = _relabel(_whole(test_data), test_data.label_names, label_names, test_file, train_file)
    else:
        data = load_task_data(DataConfig(dataset=spec, validation_fraction=test_fraction, **columns), split_seed)
        name, label_names, train, test = data.name, data.label_names, data.train, data.validation
    return EvalTask(
        name=name,
        train=_subsample(train, max_train_examples, [split_seed, 1]),
        test=_subsample(test, max_test_examples, [split_seed, 2]),
        label_names=label_names,
        seen=seen,
    )


def _split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in FILE_FORMATS if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise UserError(
            f"folder {folder} has several {split} files ({', '.join(path.name for path in found)})",
            f"keep only one {split} file",
        )
    return found[0] if found else None


def _whole(data: TaskData) -> TextSplit:
    """A file read by load_task_data back in one piece (it always carves a validation split)."""
    first, second = data.train, data.validation
    return TextSplit(
        texts=first.texts + second.texts,
        text_pairs=None if first.text_pairs is None else first.text_pairs + (second.text_pairs or []),
        labels=first.labels + second.labels,
    )


def _relabel(split: TextSplit, names: list[str], target: list[str], test_file: Path, train_file: Path) -> TextSplit:
    """Express the test labels as indices into the train label vocabulary."""
    index = {name: position for position, name in enumerate(target)}
    unknown = sorted({names[label] for label in split.labels} - set(index))
    if unknown:
        raise UserError(
            f"label(s) {', '.join(map(repr, unknown))} of {test_file} never occur in {train_file}",
            "a head cannot learn labels it never sees: add them to the train file or drop those test rows",
        )
    return TextSplit(split.texts, split.text_pairs, [index[names[label]] for label in split.labels])


def _subsample(split: TextSplit, limit: int, seed: list[int]) -> TextSplit:
    """At most ``limit`` rows, chosen by a seeded permutation, kept in their original order."""
    if len(split) <= limit:
        return split
    return _rows(split, sorted(np.random.default_rng(seed).permutation(len(split))[:limit].tolist()))


def _rows(split: TextSplit, keep: Sequence[int]) -> TextSplit:
    return TextSplit(
        texts=[split.texts[i] for i in keep],
        text_pairs=None if split.text_pairs is None else [split.text_pairs[i] for i in keep],
        labels=[split.labels[i] for i in keep],
    )


def carve_validation(train: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """(fit, validation): a seeded ``fraction`` of ``train`` held out to pick the best epoch."""
    fit, held_out = split_indices(len(train), fraction, seed + 1_000)
    return _rows(train, fit), _rows(train, held_out)


def few_shot_split(train: TextSplit, shots: int, seed: int) -> TextSplit:
    """At most ``shots`` examples of every label (all of a rarer one), seeded, in their original order."""
    rng = np.random.default_rng([seed, 4])
    labels = np.asarray(train.labels)
    keep = []
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        keep += rng.choice(where, size=min(shots, len(where)), replace=False).tolist()
    return _rows(train, sorted(keep))


def repeated_names(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def load_tasks(config: EvaluateConfig) -> list[EvalTask]:
    """Every seen then unseen dataset, subsampled and split; names must be distinct."""
    settings = config.evaluation
    options = dict(
        max_train_examples=settings.max_train_examples,
        max_test_examples=settings.max_test_examples,
        test_fraction=settings.test_fraction,
    )
    tasks = [load_eval_task(spec, seen=True, **options) for spec in settings.dataset]
    tasks += [load_eval_task(spec, seen=False, **options) for spec in settings.unseen]
    duplicates = repeated_names([task.name for task in tasks])
    if duplicates:
        raise UserError(
            f"several datasets are named {', '.join(map(repr, duplicates))} (a file's stem or a folder's name)",
            "rename the files or folders so that every dataset has its own name",
        )
    return tasks
