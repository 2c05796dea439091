"""What the benchmark scripts share, so that each says only what it measures.

- paths: ``ROOT`` (the checkout), ``DATA`` (the bundled contributors' data), ``LOOPBACK``;
- ``spread`` and ``fmt``: the min/median/max every benchmark reports, and how a report prints it;
  ``order_of``: which arm of a compared pair runs first in a trial;
- peer processes: ``cli`` (a ``coldfusion_p2p.cli`` command line), ``peer_environment`` and
  ``round_failures`` (the rounds of one peer that did not fuse in a full group), ``run_record`` and
  ``exit_if_any_failed`` (a swarm run's record; the exit status when one failed);
- results and reports: ``provenance`` (command, machine, date), ``write_json``, ``report_header``,
  ``table_header``/``table_row``, ``section``, ``bullet_section``, ``pyplot``/``save_figure``;
- ``benchmark_model``: the swarm benchmarks' ``--model`` (a folder, the bundled MiniLM, or ``tiny``).

Importing it sets ``HF_HUB_OFFLINE`` and ``TOKENIZERS_PARALLELISM`` unless they are set: the
benchmarks download nothing. It imports nothing heavy itself (torch and matplotlib on first use).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "peers" / "data"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- numbers
def spread(values) -> dict | None:
    """min/median/max (and how many) of a list of numbers; None when there are none."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def fmt(value: dict | None, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    """``median (min-max)`` of a spread, or ``-`` when nothing was measured."""
    if value is None:
        return "-"
    low, mid, high = (value[key] / scale for key in ("min", "median", "max"))
    return f"{mid:.{digits}f}{suffix} ({low:.{digits}f}-{high:.{digits}f})"


def order_of(trial: int, first: str, second: str) -> tuple[str, str]:
    """Which arm runs first in ``trial``: alternating, so neither always gets the warmer machine."""
    return (first, second) if trial % 2 == 0 else (second, first)


# ----------------------------------------------------------------------------- peer processes
def log(message: str) -> None:
    """A timestamped progress line: the swarm benchmarks run for many minutes."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli(*arguments: str) -> list[str]:
    """The command line of a ``coldfusion-peer`` subcommand, run by this interpreter."""
    return [sys.executable, "-m", "coldfusion_p2p.cli", *arguments]


def peer_environment(**extra: str) -> dict[str, str]:
    """A peer process's environment: this one, with one torch thread and nothing downloaded, plus ``extra``.

    The peers share a few cores, so each gets one OpenMP thread; the benchmarks compare runs, so no
    peer may fetch a model or a data set in the middle of one."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def round_failures(name: str, history: list[dict], rounds: int, group_size: int) -> list[str]:
    """Rounds 1..``rounds`` of one peer's history that did not fuse in a group of ``group_size``.

    A swarm benchmark compares fused rounds; a round with no report, or one that fused in a smaller
    group (or not at all), makes its comparison meaningless and is listed as a failure."""
    failures = []
    rows = {row["round"]: row for row in history}
    for round_number in range(1, rounds + 1):
        row = rows.get(round_number)
        if row is None:
            failures.append(f"{name} round {round_number}: no report")
        elif row["outcome"] != "fused" or row["group_size"] != group_size:
            failures.append(
                f"{name} round {round_number}: {row['outcome']} in a group of {row['group_size']} "
                f"({row.get('reason', '')})"
            )
    return failures


def run_record(label: str, compression: str, started: float, failures: list[str], **details) -> dict:
    """How every swarm benchmark records a run: what ran, its wall time since ``started``, its failures, ``details``."""
    return {
        "label": label,
        "compression": compression,
        "wall_seconds": time.monotonic() - started,
        "ok": not failures,
        "failures": failures,
        **details,
    }


def exit_if_any_failed(runs: list[dict], group_size: int) -> None:
    """Exit with status 1, after the report is written, if a run did not fuse every round in a full group."""
    failed = [run["label"] for run in runs if not run["ok"]]
    if failed:
        print(
            f"error: {len(failed)} run(s) did not fuse every round in a group of {group_size}: {failed}",
            file=sys.stderr,
        )
        raise SystemExit(1)


def benchmark_model(argument: str | None, workdir: Path) -> tuple[str, str]:
    """The swarm benchmarks' ``--model``: (the model the peers load, what the report calls it).

    ``tiny`` builds a tiny BERT under ``workdir`` for smoke tests; None is the bundled MiniLM;
    anything else is a model folder. Needs ``tests/`` on the path for ``tiny``."""
    from coldfusion_p2p.contributor.model import resolve_model_name

    if argument == "tiny":
        from tiny_models import build_tiny_model

        return str(build_tiny_model(workdir / "tiny-model", "bert")), "a tiny BERT (smoke test)"
    model = resolve_model_name(argument)
    return model, "all-MiniLM-L6-v2 (bundled)" if argument is None else Path(model).name


# ----------------------------------------------------------------------------- results and reports
def provenance(command: str, *, with_platform: bool = False) -> dict[str, str]:
    """The ``command`` (with this process's arguments), machine and date every results file opens with."""
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if with_platform:
        machine += f", {platform.platform()}"
    return {
        "command": command + "".join(f" {argument}" for argument in sys.argv[1:]),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_json(path: Path, results: dict) -> None:
    """Every number of a run, as the report was written from it (the report can be regenerated)."""
    path.write_text(json.dumps(results, indent=2) + "\n")


def report_header(title: str, results: dict, machine_note: str = "") -> list[str]:
    """A report's title, command and machine line (``machine_note`` follows the wall time)."""
    return [
        f"# {title}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min."
        f"{machine_note}",
        "",
    ]


def table_header(*columns: str) -> list[str]:
    """A markdown table's header line and its separator."""
    return [table_row(*columns), "|" + "---|" * len(columns)]


def table_row(*cells: object) -> str:
    """One markdown table line of already formatted cells."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def bullet_section(title: str, items: list[str], empty: str | None = None) -> list[str]:
    """A ``## title`` section of ``- item`` lines; ``empty`` stands alone where there are no items.

    Without ``empty``, a section with no items is left out of the report."""
    if not items and empty is None:
        return []
    return [*section(title), *([f"- {item}" for item in items] or [empty])]


def section(title: str, *paragraphs: str) -> list[str]:
    """A report's ``## title`` line and its paragraphs, each set off by blank lines (a table may follow)."""
    lines = ["", f"## {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def pyplot():
    """matplotlib's pyplot drawing to files only (the benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Every benchmark's figure: laid out tight, 110 dpi, closed (the scripts draw more than one)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
