"""The bases under evaluation: what ``--base`` names, resolved to a loadable model and checked.

A base is given as ``PATH``, ``LABEL=PATH`` or ``bundled``; tables and plots name it by its
label, so labels must be distinct. Every base is loaded and checked here before any training,
so that a typo in the last ``--base`` fails in seconds rather than after the first base's runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from coldfusion_p2p.contributor.model import load_tokenizer, resolve_model_name
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.evaluation.tasks import repeated_names

BUNDLED = "bundled"


@dataclass(frozen=True)
class BaseSpec:
    label: str  # how tables and plots name it
    path: str  # what load_classifier loads


def parse_base(value: str) -> BaseSpec:
    """``PATH``, ``LABEL=PATH`` or ``bundled``; a run's output folder stands for its ``latest`` checkpoint.

    Raises UserError for an empty label or path and for a local-looking path that does not exist.
    """
    value = value.strip()
    label, separator, target = value.partition("=")
    if not separator or "/" in label or "\\" in label:  # "=" inside a path is not a label
        label, target = "", value
    label, target = label.strip(), target.strip()
    if separator and not target:
        raise UserError(f"--base {value!r} names no model", "write LABEL=PATH, e.g. --base fused=out/latest")
    if not target:
        raise UserError("--base is empty", "pass a model folder, LABEL=PATH or bundled")
    if target == BUNDLED:
        return BaseSpec(label or BUNDLED, resolve_model_name(None))
    path = Path(target).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and (path / "latest" / "config.json").exists():
            path = path / "latest"  # a peer's --output-dir: its newest fused base
        return BaseSpec(label or Path(target.rstrip("/\\")).name or target, str(path))
    try:
        resolved = resolve_model_name(target)
    except UserError:
        raise UserError(f"base model folder {target} does not exist", "check the --base path") from None
    return BaseSpec(label or target, resolved)


def _check_base(base: BaseSpec) -> None:
    """Fail before any training when a base has no usable config or tokenizer."""
    try:
        AutoConfig.from_pretrained(base.path)
        load_tokenizer(base.path)
    except (UserError, OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"base {base.label!r} ({base.path}) could not be loaded ({reason})",
            "pass --base a Hugging Face model folder with config.json, weights and tokenizer files, or bundled",
        ) from None


def load_bases(values: Sequence[str]) -> list[BaseSpec]:
    """Parse and check every ``--base``; labels must be distinct."""
    bases = [parse_base(value) for value in values]
    duplicates = repeated_names([base.label for base in bases])
    if duplicates:
        raise UserError(
            f"several bases are labelled {', '.join(map(repr, duplicates))}",
            "name them with LABEL=PATH, e.g. --base original=PATH --base fused=PATH",
        )
    for base in bases:
        _check_base(base)
    return bases
