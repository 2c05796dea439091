"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess

import pytest

from coldfusion_p2p.cli import main

from conftest import peer_command, peer_environment
from tiny_models import write_csv

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCwDC3kXyupnZ2TNUrxghpr5nez39jKjPdxzZ8QCV1EiE"


@pytest.fixture
def base_flags(tiny_model_dir, tmp_path):
    return [
        "--model",
        str(tiny_model_dir),
        "--output-dir",
        str(tmp_path / "out"),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--torch-threads",
        "1",
    ]


def run_join(capsys, *flags) -> tuple[int, str]:
    code = main(["join", *flags])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_dataset_file(capsys, base_flags, tmp_path):
    code, err = run_join(capsys, "--dataset", str(tmp_path / "nope.csv"), *base_flags)
    assert_one_line_error(code, err, "does not exist", "--dataset")


def test_unknown_dataset_format(capsys, base_flags, tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("whatever")
    code, err = run_join(capsys, "--dataset", str(path), *base_flags)
    assert_one_line_error(code, err, ".csv")


def test_missing_column_lists_the_available_ones(capsys, base_flags, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"review": "good", "stars": "5"}, {"review": "bad", "stars": "1"}] * 5)
    code, err = run_join(capsys, "--dataset", str(path), "--text-column", "body", *base_flags)
    assert_one_line_error(code, err, "'body'", "review", "stars")


def test_a_single_class(capsys, base_flags, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": f"good {i}", "label": "pos"} for i in range(10)])
    code, err = run_join(capsys, "--dataset", str(path), *base_flags)
    assert_one_line_error(code, err, "class")


def test_an_empty_dataset(capsys, base_flags, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n")
    code, err = run_join(capsys, "--dataset", str(path), *base_flags)
    assert_one_line_error(code, err, "empty")


def test_malformed_multiaddr(capsys, base_flags, tiny_dataset):
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--initial-peers", "/ip4/1.2.3/tcp/1", *base_flags)
    assert_one_line_error(code, err, "malformed multiaddr", "--initial-peers")
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--initial-peers", "/ip4/1.2.3.4/tcp/1", *base_flags)
    assert_one_line_error(code, err, "/p2p/")


def test_no_initial_peer_reachable(capsys, base_flags, tiny_dataset):
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--initial-peers", UNREACHABLE, *base_flags)
    assert_one_line_error(code, err, "none of the initial peers is reachable")


def test_unknown_config_key(capsys, base_flags, tiny_dataset, tmp_path):
    config = tmp_path / "peer.toml"
    config.write_text("local_stepz = 3\n")
    code, err = run_join(capsys, "--config", str(config), "--dataset", str(tiny_dataset), *base_flags)
    assert_one_line_error(code, err, "unknown config key 'local_stepz'")


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """The real console process, not just main(): exit status and stderr as a user sees them."""
    result = subprocess.run(
        peer_command("join", "--dataset", str(tmp_path / "missing.jsonl")),
        capture_output=True,
        text=True,
        env=peer_environment(),
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "missing.jsonl")
