"""Config: defaults in one place, strict keys, files and flags agreeing."""

from __future__ import annotations

import pytest

from coldfusion_p2p.cli import build_parser, parse_config
from coldfusion_p2p.config import PeerConfig, build_config, config_fields, read_config_file
from coldfusion_p2p.errors import UserError

from conftest import REPO_ROOT


def test_measured_defaults():
    config = PeerConfig()
    assert (config.training.lr, config.training.local_steps, config.training.batch_size) == (2e-4, 20, 32)
    assert (config.training.refit_steps, config.training.warmup_ratio, config.training.length_bucketing) == (
        300,
        0.1,
        True,
    )
    assert (config.fusion.outer_lr, config.fusion.outer_momentum, config.fusion.anchor) == (1.0, 0.0, 0.0)  # the mean
    assert config.data.max_length == 64 and config.run.rounds is None


def test_every_field_is_a_flag_and_a_config_key(tmp_path):
    parser = build_parser()
    join_help = parser._subparsers._group_actions[0].choices["join"].format_help()
    for _, name, _ in config_fields(PeerConfig):
        assert "--" + name.replace("_", "-") in join_help, name


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"peer{suffix}"
    if suffix == ".toml":
        path.write_text('dataset = "a.csv"\nlocal-steps = 7\ninitial_peers = ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]\n')
    else:
        path.write_text("dataset: a.csv\nlocal_steps: 7\ninitial_peers: [/ip4/127.0.0.1/tcp/1/p2p/QmX]\n")
    arguments = build_parser().parse_args(["join", "--config", str(path), "--local-steps", "9", "--lr", "1e-3"])
    config = parse_config(arguments)
    assert config.data.dataset == "a.csv"
    assert config.training.local_steps == 9 and config.training.lr == 1e-3
    assert config.network.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]


def test_repeatable_initial_peers():
    arguments = build_parser().parse_args(["join", "--initial-peers", "/a", "--initial-peers", "/b", "/c"])
    assert parse_config(arguments).network.initial_peers == ["/a", "/b", "/c"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"local_stepz": 3}, "unknown config key 'local_stepz'"),
        ({"local_steps": "many"}, "bad value 'many' for 'local_steps'"),
        ({"local_steps": 2.5}, "expected an integer"),
        ({"weighting": "median"}, "expected one of uniform, examples"),
        ({"lr": 0}, "lr must be positive"),
        ({"request_timeout": 5, "matchmaking_time": 2}, "request_timeout must be smaller"),
        ({"rounds": 0}, "rounds must be at least 1"),
    ],
)
def test_bad_settings_are_clear_errors(values, message):
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_malformed_and_missing_config_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("dataset = [unclosed\n")
    with pytest.raises(UserError, match="malformed"):
        read_config_file(broken)
    with pytest.raises(UserError, match="does not exist"):
        read_config_file(tmp_path / "absent.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        read_config_file(listing)


def test_to_dict_round_trips_through_build_config():
    config = build_config({"dataset": "x.csv", "rounds": 3, "initial_peers": ["/p"]})
    assert build_config(config.to_dict()).to_dict() == config.to_dict()


def test_every_shipped_peer_config_is_valid_and_its_dataset_resolves():
    from pathlib import Path

    peers = sorted((REPO_ROOT / "peers").glob("*.toml"))
    assert len(peers) >= 4
    for path in peers:
        config = build_config(read_config_file(path))
        assert Path(config.data.dataset).is_file(), path
        assert config.data.dataset_name and config.training.local_steps == 20 and config.training.lr == 2e-4


def test_the_demo_help_texts_state_the_defaults_the_demo_really_uses():
    import re
    from dataclasses import fields

    from coldfusion_p2p.config import DEMO_DEFAULTS, DEMO_QUICK, DemoSettings, field_help

    documented = {field.name for field in fields(DemoSettings)} & set(DEMO_DEFAULTS)
    assert len(documented) >= 6
    for name in documented:
        text = field_help(name, DemoSettings)
        assert re.search(rf"default {DEMO_DEFAULTS[name]}\b", text), (name, text)
        if name in DEMO_QUICK and "--quick" in text:
            assert re.search(rf"--quick {DEMO_QUICK[name]}\b", text), (name, text)
