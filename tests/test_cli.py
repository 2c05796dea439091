"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coldfusion_p2p.cli import main
from coldfusion_p2p.contributor.checkpoints import save_checkpoint
from coldfusion_p2p.contributor.model import head_state, load_classifier, load_tokenizer

from conftest import assert_one_line_error, peer_command, peer_environment
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda is no error here")
def test_a_gpu_asked_for_on_a_machine_without_one(capsys, base_flags, tiny_dataset):
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--device", "cuda", *base_flags)
    assert_one_line_error(code, err, "--device cuda was asked for", "no CUDA GPU", "use --device cpu")


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


@pytest.mark.parametrize("launcher", ["console script", "python -m coldfusion_p2p"])
def test_the_console_script_and_the_package_run_as_a_user_runs_them(launcher, tmp_path):
    """What pip installed (the ``coldfusion-peer`` entry point) and ``python -m coldfusion_p2p``."""
    import sysconfig

    from coldfusion_p2p import __version__

    script = Path(sysconfig.get_path("scripts")) / "coldfusion-peer"
    command = [str(script)] if launcher == "console script" else [sys.executable, "-m", "coldfusion_p2p"]
    assert launcher != "console script" or script.is_file(), f"pip did not install {script}"
    run = dict(capture_output=True, text=True, env=peer_environment(), timeout=120)
    version = subprocess.run([*command, "--version"], **run)
    assert version.returncode == 0 and version.stdout.strip() == f"coldfusion-p2p {__version__}", version
    missing = subprocess.run([*command, "join", "--dataset", str(tmp_path / "missing.csv")], **run)
    assert_one_line_error(missing.returncode, missing.stderr, "missing.csv", "does not exist")


@pytest.mark.parametrize(
    ("config_text", "fragments"),
    [
        ('dataset = "d.csv"\nlocal_steps = [unclosed\n', ("peer.toml is malformed", "fix its syntax")),
        ('local_steps = "many"\n', ("bad value 'many' for 'local_steps'", "config file")),
        ("rounds = 2.5\n", ("expected an integer",)),
        ("[training]\nlr = 1e-3\n", ("unknown config key 'training'",)),
    ],
)
def test_malformed_config_files(capsys, base_flags, tiny_dataset, tmp_path, config_text, fragments):
    config = tmp_path / "peer.toml"
    config.write_text(config_text)
    code, err = run_join(capsys, "--config", str(config), "--dataset", str(tiny_dataset), *base_flags)
    assert_one_line_error(code, err, *fragments)


def write_checkpoint(output_dir: Path, model_dir: Path, label_names: list[str]) -> Path:
    model = load_classifier(str(model_dir), label_names, seed=0)
    return save_checkpoint(
        output_dir,
        round_number=3,
        model=model,
        tokenizer=load_tokenizer(str(model_dir)),
        head=head_state(model),
        label_names=label_names,
        metadata={"group_size": 2},
    )


def folder_contents(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under ``folder``: proof that nothing was touched."""
    contents = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            contents[str(path.relative_to(folder))] = os.readlink(path)
        elif path.is_file():
            contents[str(path.relative_to(folder))] = path.read_bytes()
    return contents


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda round_dir: truncate(round_dir / "model.safetensors"), ("model.safetensors is corrupt", "backup")),
        (lambda round_dir: truncate(round_dir / "head.safetensors"), ("head", "is corrupt", "backup")),
        (lambda round_dir: (round_dir / "round.json").unlink(), ("is unreadable", "remove")),
        (lambda round_dir: (round_dir / "round.json").write_text('{"round": '), ("is unreadable",)),
        (lambda round_dir: (round_dir / "head.json").write_text("[]"), ("head", "is corrupt")),
    ],
    ids=["truncated-body", "truncated-head", "missing-round-json", "truncated-round-json", "bad-head-json"],
)
def test_resume_from_a_corrupt_checkpoint_fails_and_keeps_it(
    capsys, base_flags, tiny_dataset, tiny_model_dir, tmp_path, damage, fragments
):
    round_dir = write_checkpoint(tmp_path / "out", tiny_model_dir, ["negative", "positive"])
    damage(round_dir)
    before = folder_contents(tmp_path / "out")
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--resume", *base_flags)
    assert_one_line_error(code, err, *fragments)
    assert folder_contents(tmp_path / "out") == before, "the damaged checkpoint must be left for the user to inspect"


def test_resume_with_a_dataset_of_other_labels_is_refused(capsys, base_flags, tiny_dataset, tiny_model_dir, tmp_path):
    """A head trained on other classes must never be mixed with this dataset's labels."""
    write_checkpoint(tmp_path / "out", tiny_model_dir, ["bad", "good"])
    before = folder_contents(tmp_path / "out")
    code, err = run_join(capsys, "--dataset", str(tiny_dataset), "--resume", *base_flags)
    assert_one_line_error(code, err, "['negative', 'positive'] differ from the checkpoint's ['bad', 'good']")
    assert "fresh --output-dir" in err
    assert folder_contents(tmp_path / "out") == before


@pytest.mark.parametrize("command", ["join", "demo", "evaluate", "simulate", "bootstrap", "monitor"])
def test_every_command_builds_its_flags_and_prints_help(capsys, command):
    """Two settings with one flag name would make argparse fail for every command, not only this one."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out


def test_grad_accum_is_the_short_name_of_gradient_accumulation():
    from coldfusion_p2p.cli import build_parser, parse_config

    config = parse_config(build_parser().parse_args(["join", "--dataset", "d.csv", "--grad-accum", "4"]))
    assert config.training.gradient_accumulation == 4
