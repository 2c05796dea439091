"""Introspection of the config dataclasses: their flat keys, types, help texts and value coercion."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from coldfusion_p2p.errors import UserError


def normalize_key(key: str) -> str:
    return key.strip().replace("-", "_")


def config_fields(config_type: type) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(section, field, type hint)`` for every leaf setting of a sectioned config class."""
    for section in fields(config_type):
        section_type = get_type_hints(config_type)[section.name]
        hints = get_type_hints(section_type)
        for leaf in fields(section_type):
            yield section.name, leaf.name, hints[leaf.name]


def _field_index(config_type: type) -> dict[str, tuple[str, str, Any]]:
    return {name: (section, name, hint) for section, name, hint in config_fields(config_type)}


def field_help(name: str, section_type: type | None = None) -> str:
    """The trailing ``# comment`` of a field in ``schema.py``: the single source of flag help texts.

    Two config classes may each have a field of the same name (``lr`` of training and of
    evaluation): pass the field's section class to get its own comment.
    """
    comments = _field_comments()
    if section_type is not None and (section_type.__name__, name) in comments:
        return comments[section_type.__name__, name]
    return comments.get(name, "")


@functools.cache
def _field_comments() -> dict[str | tuple[str, str], str]:
    """``{name: comment}`` (first definition wins) and ``{(class name, name): comment}``."""
    comments: dict[str | tuple[str, str], str] = {}
    owner = ""
    for line in Path(__file__).with_name("schema.py").read_text().splitlines():
        if line.startswith("class "):
            owner = line[len("class ") :].split("(")[0].split(":")[0].strip()
        code, _, comment = line.partition("  # ")
        if comment and ":" in code and "=" in code and code.startswith("    "):
            name = code.split(":")[0].strip()
            comments.setdefault(name, comment.strip())
            comments[owner, name] = comment.strip()
    return comments


def coerce_value(key: str, value: Any, type_hint: Any) -> Any:
    """Turn a config-file or command-line value into the field's type, or raise a UserError."""
    origin, args = get_origin(type_hint), get_args(type_hint)
    optional = type(None) in args
    if optional:
        if value is None:
            return None
        (type_hint,) = [arg for arg in args if arg is not type(None)]
        origin, args = get_origin(type_hint), get_args(type_hint)
    try:
        if origin is list:
            items = [value] if isinstance(value, str) else list(value)
            return [str(item) for item in items]
        if origin is Literal:
            if value not in args:
                raise ValueError(f"expected one of {', '.join(map(str, args))}")
            return value
        if type_hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError("expected true or false")
        if type_hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if type_hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if type_hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
    except (TypeError, ValueError) as error:
        raise UserError(f"bad value {value!r} for {key!r} ({error})", "fix it in the flag or the config file") from None
    raise TypeError(f"unsupported config type {type_hint} for {key}")
