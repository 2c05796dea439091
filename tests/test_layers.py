"""The package's layers import only downwards (see coldfusion_p2p/__init__.py), at any depth of code."""

from __future__ import annotations

import ast
from pathlib import Path

import coldfusion_p2p

PACKAGE = Path(coldfusion_p2p.__file__).parent
ALLOWED = {  # layer: the other layers it may import (config and errors are open to all)
    "contributor": set(),
    "merge": set(),
    "evaluation": {"contributor"},
    "swarm": {"contributor", "merge"},
    "apps": {"contributor", "merge", "swarm", "evaluation"},
}


def imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "coldfusion_p2p" and len(parts) > 1 and parts[1] in ALLOWED:
                layers.add(parts[1])
    return layers


def test_every_layer_imports_only_the_layers_below_it():
    checked = 0
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).glob("*.py")):
            wrong = imported_layers(path) - allowed - {layer}
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}: layer {layer} may use {allowed}"
            checked += 1
    assert checked >= 25, checked


def test_the_layer_check_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from coldfusion_p2p.swarm.peer import Peer\n")
    assert imported_layers(sample) == {"swarm"}
