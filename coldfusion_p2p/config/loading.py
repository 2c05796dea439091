"""From a config file and flags to a validated config: defaults, then the file, then the flags."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from coldfusion_p2p.config.fields import normalize_key
from coldfusion_p2p.config.schema import PeerConfig, SectionedConfig
from coldfusion_p2p.config.validation import validate
from coldfusion_p2p.errors import UserError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML or YAML mapping of config keys; raises UserError when unreadable or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist", "check the --config path")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {path} has an unknown format", "use a .toml, .yaml or .yml file")
    except UserError:
        raise
    except Exception as error:  # tomllib, yaml and json each raise their own parse errors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"config file {path} is malformed ({first_line})", "fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values", "write key = value lines")
    return {key: _relative_to(path.parent, key, value) for key, value in data.items()}


FILE_RELATIVE_KEYS = ("dataset",)  # a relative path in a config file means "beside the config file"


def _relative_to(folder: Path, key: str, value: Any) -> Any:
    if normalize_key(key) not in FILE_RELATIVE_KEYS or not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = folder / value
    return str(candidate) if candidate.exists() else value


def build_config(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    config_type: type[SectionedConfig] = PeerConfig,
):
    """Defaults, then the config file, then explicit overrides (command-line flags), each validated."""
    config = config_type()
    for source in (file_values or {}, overrides or {}):
        for key, value in source.items():
            config.set(key, value)
    validate(config)
    return config


def as_flags(values: dict[str, Any]) -> list[str]:
    """The command-line flags that set ``values`` (the inverse of parsing; for spawning peers)."""
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags
