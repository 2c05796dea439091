"""Read whatever ``--dataset`` names into tables of columns: a file, a save_to_disk folder or a Hub name.

This is the only part of data loading that knows about formats, folders, the Hub and offline
mode; everything after it sees a :class:`Source` holding one or two :class:`Table` objects whose
columns are read on demand. Keeping it apart lets the column and label rules work on plain
lists, and keeps the network timeouts and offline handling in one place.

Files are read with pandas (or the ``json`` module) rather than ``datasets.load_dataset`` so that
a private file is never copied into the shared ``datasets`` cache. Test splits are ignored here:
they are for the final report, not for choosing between rounds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coldfusion_p2p.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
VALIDATION_SPLITS = ("validation", "valid", "dev")
TEST_SPLITS = ("test",)
HUB_PROBE_TIMEOUT = 5.0  # seconds; one metadata request decides whether the Hub is reachable at all

SUPPORTED_SOURCES = "a path to a .csv/.tsv/.jsonl/.json/.parquet file or a save_to_disk folder"


@dataclass(frozen=True)
class Table:
    """A split whose columns are read only on demand (a saved dataset may hold large unused columns)."""

    columns: list[str]
    read: Callable[[str], list[Any]]
    class_names: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel names per column


@dataclass(frozen=True)
class Source:
    name: str  # default public name
    description: str  # for error messages: "file x.csv", "folder x", "Hub dataset 'x'"
    train: Table
    validation: Table | None


def read_source(dataset: str) -> Source:
    """Dispatch on what ``dataset`` is: an existing file or folder, a path-like typo, or a Hub name."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path)
    check_local_dataset(dataset)
    return _read_hub(dataset)


def check_local_dataset(dataset: str | None) -> None:
    """A ``--dataset`` meant as a local path must exist. Cheap (no pandas, no torch), so the CLI
    checks it before the seconds of imports a peer needs: a typo fails at once, not after 10 s."""
    if dataset and looks_like_path(dataset) and not Path(dataset).expanduser().exists():
        raise UserError(f"dataset file {dataset} does not exist", "check the --dataset path")


def looks_like_path(text: str) -> bool:
    """True for strings the user surely meant as a local path, so a typo is not sent to the Hub.

    Hub names are ``name`` or ``namespace/name``: one slash at most and no data-file extension.
    """
    if Path(text).suffix.lower() in FILE_FORMATS:
        return True
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text:
        return True
    return text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _read_file(path: Path) -> Source:
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
    table = Table(columns=list(frame.columns), read=lambda column: frame[column].tolist())
    return Source(name=path.stem, description=f"file {path}", train=table, validation=None)


def _read_frame(path: Path, suffix: str) -> pd.DataFrame:
    """Read every cell as written: "NA", "null" or "None" in a text column stay strings."""
    import pandas as pd  # here, not at the top: the CLI imports this module for its early checks

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


def _read_folder(path: Path) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError for plain folders, arrow errors for damaged ones
        raise UserError(
            f"folder {path} is not a dataset written by save_to_disk ({_short(error)})",
            f"pass {SUPPORTED_SOURCES}",
        ) from None
    return _source_from_datasets(loaded, name=path.name, description=f"folder {path}")


def _source_from_datasets(loaded: Any, name: str, description: str) -> Source:
    """Pick train and validation from a Dataset or DatasetDict; test splits are deliberately ignored."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return Source(name=name, description=description, train=_dataset_table(loaded), validation=None)
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
    return Source(
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


def _dataset_table(dataset: Any) -> Table:
    from datasets import ClassLabel

    class_names = {name: list(f.names) for name, f in dataset.features.items() if isinstance(f, ClassLabel)}
    return Table(columns=list(dataset.column_names), read=lambda column: list(dataset[column]), class_names=class_names)


def _read_hub(name: str) -> Source:
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
