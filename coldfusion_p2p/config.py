"""Every setting of a peer, with its default, in one place.

The settings are grouped into small dataclasses (data, training, fusion, network, run) so that
library code receives only the part it needs, but their field names are unique across groups:
each field is exactly one command-line flag (``local_steps`` is ``--local-steps``) and one key of
a ``--config`` file (TOML or YAML, flat, ``local_steps`` or ``local-steps``). An unknown key is an
error, as in nanoGPT and torchtune: a typo must never silently fall back to a default.

Defaults are the ones measured on a 2-core CPU with the bundled all-MiniLM-L6-v2 (see
docs/measurements/): 20 local steps at lr 2e-4 with length-bucketed batches of 32 take 5-8 s, and
after fusion and the head re-fit the contributors clear their majority-class rates by far (TREC
0.90 against 0.27). The earlier 5e-5 x 8 steps left them at their majority rates: no learning, so
the fused base was the original plus noise.
"""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from coldfusion_p2p.errors import UserError

LOOPBACK_HOST_MADDR = "/ip4/127.0.0.1/tcp/0"


@dataclass
class DataConfig:
    dataset: str | None = None  # file (csv/tsv/jsonl/json/parquet), save_to_disk folder, or hub name
    dataset_name: str | None = None  # public label of this peer's data shown to the swarm (default: file stem)
    text_column: str | None = None  # auto-detected when not given
    text_pair_column: str | None = None  # second text of sentence-pair tasks (auto-detected)
    label_column: str | None = None  # auto-detected when not given
    validation_fraction: float = 0.1  # carved from train when the source has no validation split
    max_eval_examples: int = 512  # evaluation uses at most this many validation examples
    max_length: int = 64  # tokens per example after truncation


@dataclass
class TrainingConfig:
    model: str | None = None  # local HF folder or hub name; default: the bundled all-MiniLM-L6-v2
    local_steps: int = 20  # optimizer steps per round, from the fused body
    lr: float = 2e-4  # peak learning rate of a fresh AdamW each round (5e-5 barely moved the body: no learning)
    batch_size: int = 32  # examples per step
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.1  # fraction of local steps with linear warm-up before the decay
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # learning-rate decay after the warm-up
    gradient_accumulation: int = 1  # micro-batches of batch_size per optimizer step
    length_bucketing: bool = True  # batch examples of similar length: short texts cost what they are
    l2sp: float = 0.0  # L2-SP: pull the body toward the round's start with this penalty weight (0: off)
    refit_steps: int = 300  # head-only steps on cached body outputs after each new fused body (0: off)
    refit_lr: float = 5e-2  # learning rate of the head re-fit (as the linear probe's: 5e-3 left SMS spam at majority)
    refit_examples: int = 512  # training examples whose body outputs the re-fit caches
    seed: int = 0  # seeds head init, batch order and dropout
    torch_threads: int | None = None  # torch intra-op threads (default: torch's choice)


@dataclass
class FusionConfig:
    weighting: Literal["uniform", "examples"] = "uniform"  # plain mean (paper) or by dataset size
    fusion_window: float = 60.0  # seconds after the first peer is ready during which others may join
    min_group_size: int = 2  # the window closes early only once this many peers are ready (1: never wait alone)
    matchmaking_time: float = 5.0  # hivemind min_matchmaking_time: how long a group stays open
    request_timeout: float = 3.0  # hivemind request_timeout; keep below matchmaking_time
    allreduce_timeout: float = 120.0  # the whole all-reduce must finish within this many seconds
    next_chunk_timeout: float = 10.0  # a silent sender is dropped after this many seconds
    state_download_timeout: float = 120.0  # bound on downloading the fused base from the swarm
    max_update_ratio: float = 10.0  # reject a fused update this many times the typical one (poisoning guard)
    compression: Literal["none", "fp16"] = "none"  # fp16 halves the bytes each peer sends per round
    aggregation: Literal["mean", "clipped_mean", "ties"] = "mean"  # clipped_mean: robust to bad updates; ties: TIES
    clip_ratio: float = 2.0  # clipped_mean caps each update's norm at this many times the group's median
    ties_density: float = 0.2  # ties keeps this fraction of each member's largest update entries per tensor
    outer_lr: float = 1.0  # outer optimizer (DiLoCo): step size on the averaged update (1 and no momentum: the mean)
    outer_momentum: float = 0.0  # Nesterov momentum of the outer optimizer; its state travels with the fused base
    anchor: float = 0.0  # WiSE-FT: move the fused base this fraction back toward the original weights
    local_modules: list[str] = field(default_factory=list)  # base-model parts kept local like the head, e.g. pooler


@dataclass
class NetworkConfig:
    run_id: str = "coldfusion"  # peers with the same run id fuse together
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peers already in the swarm
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to announce (NAT)
    record_period: float = 2.0  # seconds between refreshes of this peer's swarm record
    identity: str | None = None  # private key file: a stable peer id across restarts (created if absent)
    require_invite: bool = False  # moderated run: refuse DHT and averaging requests of nodes without a valid invite
    invite: str | None = None  # this node's invite from the run owner (the token, or a file holding it)
    owner_public_key: str | None = None  # the run owner's public key (ssh-rsa ... line or file) that signs invites


@dataclass
class RunConfig:
    rounds: int | None = None  # stop after the swarm's fused round reaches this (default: until stopped)
    output_dir: str = "coldfusion-output"  # checkpoints of the fused base and this peer's head
    resume: bool = False  # continue from the local checkpoint or the swarm, whichever is newer
    keep_checkpoints: int = 2  # fused-base checkpoints kept in output_dir
    save_local_body: bool = False  # also save each round's pre-fusion body (for audits and tests)


@dataclass
class LoggingConfig:
    quiet: bool = False  # only warnings and errors on the console
    log_format: Literal["text", "json"] = "text"  # json: one object per line for log collectors
    verbose: bool = False  # also show hivemind's and transformers' own logs


@dataclass
class BootstrapSettings:
    peers_file: str | None = None  # write the --initial-peers value here (default: initial_peers.txt)
    archive_dir: str | None = None  # keep every round's fused base here
    keep: int | None = None  # archived rounds to keep (default: all)
    push_to_hub: str | None = None  # also upload each archived round to this Hub repo id
    base_model: str | None = None  # the run's base model, for the archive's config and tokenizer (default: bundled)
    local_modules: list[str] = field(default_factory=list)  # the swarm's --local-modules, so the archive fits its body
    poll_period: float = 1.0  # seconds between looks at the swarm's records
    download_timeout: float = 120.0  # bound on downloading one fused base


@dataclass
class MonitorSettings:
    once: bool = False  # print one snapshot and exit
    json: bool = False  # print the snapshot as JSON (with --once) for scripts
    refresh: float = 1.0  # seconds between dashboard refreshes
    settle: float = 3.0  # with --once: seconds spent collecting records before the snapshot
    stale_after: float = 10.0  # a peer silent this long is marked stale
    drop_after: float = 60.0  # ... and dropped after this long


@dataclass
class KeySettings:
    identity: str | None = None  # private key file to show; created if absent (a peer's, a bootstrap's or the owner's)


@dataclass
class InviteSettings:
    owner_key: str | None = None  # the run owner's private key file (create it with: coldfusion-peer identity)
    public_key: str | None = None  # the invitee's public key (the ssh-rsa line its `identity` prints) or key file
    name: str | None = None  # who the invite is for, shown in logs and errors (default: the invitee's peer id)
    run_id: str = "coldfusion"  # the run the invite admits to (the peers' --run-id)
    valid_days: float = 30.0  # the invite expires after this many days
    output: str | None = None  # also write the token to this file (default: print it only)


EVALUATION_METHODS = ("finetune", "linear_probe", "finetune_few_shot")  # the first two run by default


@dataclass
class EvaluationSettings:
    base: list[str] = field(default_factory=list)  # model to compare (repeat): PATH, LABEL=PATH, or bundled
    dataset: list[str] = field(default_factory=list)  # seen dataset (swarm trained on it): file or train/test dir
    unseen: list[str] = field(default_factory=list)  # unseen dataset (swarm never saw it): file or train/test dir
    seeds: int = 1  # repeat every run with seeds 0..seeds-1; claims need 3 or more (the CI covers seeds then)
    methods: list[str] = field(default_factory=lambda: list(EVALUATION_METHODS[:2]))  # and/or finetune_few_shot
    finetune_epochs: int = 4  # most epochs of full finetuning, early-stopped on validation (0: fixed finetune_steps)
    patience: int = 2  # stop finetuning after this many validations without a better one (the best is tested)
    eval_every: int = 0  # validate the finetuning every this many steps (0: once per epoch)
    validation_fraction: float = 0.15  # share of the train subsample held out (seeded) for the early stopping
    finetune_steps: int = 50  # with --finetune-epochs 0: this many AdamW steps on the whole train split
    few_shot_examples: int = 16  # finetune_few_shot: training examples per class (seeded, the same for every base)
    few_shot_steps: int = 40  # finetune_few_shot: AdamW steps of full finetuning on those examples
    probe_steps: int = 300  # AdamW steps of the linear probe (frozen body; cheap: body outputs are cached)
    lr: float = 2e-4  # peak learning rate of full finetuning
    probe_lr: float = 5e-2  # peak learning rate of the linear probe (measured: 1e-3 leaves it near chance)
    batch_size: int = 16  # examples per step
    max_length: int = 64  # tokens per example after truncation
    max_train_examples: int = 1000  # train on a seeded subsample of at most this many examples
    max_test_examples: int = 500  # test on a seeded subsample of at most this many examples
    test_fraction: float = 0.2  # test split carved from a single dataset file (never trained on)
    bootstrap_resamples: int = 2000  # bootstrap replicates (seeds and test examples) behind each 95 percent CI
    report_dir: str = "evaluation"  # where results.csv, summary.csv, results.json and evaluation.png go
    torch_threads: int | None = None  # torch intra-op threads (default: torch's choice)


@dataclass
class DemoSettings:
    quick: bool = False  # the whole idea in about three minutes: fewer rounds, steps and examples
    contributors: list[str] = field(default_factory=list)  # bundled peers that train (default: four of them)
    unseen_datasets: list[str] = field(default_factory=list)  # bundled datasets kept for evaluation only
    rounds: int | None = None  # fusion rounds (default 6; --quick 2)
    local_steps: int | None = None  # steps per round (default 8, as --quick; more specialises the body)
    batch_size: int | None = None  # examples per step (default 32; --quick 16)
    peer_lr: float | None = None  # contributors' learning rate (default: each bundled peer config's)
    model: str | None = None  # base model (default: the bundled all-MiniLM-L6-v2)
    seeds: int = 1  # evaluation seeds
    evaluated_contributors: int | None = None  # contributors' datasets evaluated as seen (default: all; --quick 2)
    curve_every: int = 0  # also evaluate every K-th archived round: accuracy over rounds (0: last round only)
    finetune_steps: int | None = None  # evaluation finetuning steps (default 30; --quick 10)
    probe_steps: int | None = None  # evaluation linear-probe steps (default 300)
    max_train_examples: int | None = None  # evaluation train examples per dataset (default 600; --quick 200)
    max_test_examples: int | None = None  # evaluation test examples per dataset (default 400; --quick 120)
    report_dir: str = "demo-report"  # summary.md, CSV/JSON of every number, PNG plots
    run_id: str = "coldfusion-demo"  # the demo swarm's run id
    swarm_timeout: float = 3600.0  # give up on the swarm after this many seconds


@dataclass
class SimulateSettings:
    contributors: list[str] = field(default_factory=list)  # bundled peer names or .toml files (default: the demo's)
    rounds: int = 5  # fusion rounds
    peer_settings: list[str] = field(default_factory=list)  # KEY=VALUE for every contributor's config (lr=2e-4)
    output_dir: str = "simulation"  # fused bases (Hugging Face folders), rounds.csv/png, simulation.json
    save_every: int = 0  # also keep the fused base of every K-th round (0: the last round only)
    torch_threads: int | None = None  # torch intra-op threads (default: torch's choice)


class SectionedConfig:
    """A config made of section dataclasses whose field names are unique: flat keys in, flat keys out."""

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{key: value}``: what a ``--config`` file holds and what checkpoints record."""
        return {name: getattr(getattr(self, section), name) for section, name, _ in config_fields(type(self))}

    def set(self, key: str, value: Any) -> None:
        """Set one flat key, coercing and validating ``value``; raises UserError on a bad key or value."""
        section, name, type_hint = _field_index(type(self)).get(normalize_key(key), (None, None, None))
        if section is None:
            known = ", ".join(sorted(_field_index(type(self))))
            raise UserError(f"unknown config key {key!r}", f"use one of: {known}")
        setattr(getattr(self, section), name, coerce_value(key, value, type_hint))


@dataclass
class PeerConfig(SectionedConfig):
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


BOOTSTRAP_PORT = 31337


@dataclass
class BootstrapConfig(SectionedConfig):
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    network: NetworkConfig = field(
        default_factory=lambda: NetworkConfig(host_maddrs=[f"/ip4/0.0.0.0/tcp/{BOOTSTRAP_PORT}"])
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
    """The trailing ``# comment`` of a field in this file: the single source of flag help texts.

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
    for line in Path(__file__).read_text().splitlines():
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


@dataclass
class MonitorConfig(SectionedConfig):
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class IdentityConfig(SectionedConfig):
    key: KeySettings = field(default_factory=KeySettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class InviteConfig(SectionedConfig):
    invite: InviteSettings = field(default_factory=InviteSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class EvaluateConfig(SectionedConfig):
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class SimulateConfig(SectionedConfig):
    simulate: SimulateSettings = field(default_factory=SimulateSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class DemoConfig(SectionedConfig):
    demo: DemoSettings = field(default_factory=DemoSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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


def validate(config: SectionedConfig) -> None:
    """Reject settings that cannot work, with the fix; pure, so tests need no network."""
    if isinstance(config, BootstrapConfig):
        _validate_bootstrap(config)
    elif isinstance(config, MonitorConfig):
        settings = config.monitor
        _require_positive({"refresh": settings.refresh, "settle": settings.settle, "stale_after": settings.stale_after})
        if settings.drop_after < settings.stale_after:
            raise UserError("drop_after must not be shorter than stale_after", "raise --drop-after")
        if not config.network.initial_peers:
            raise UserError("the monitor needs a swarm to watch", "pass --initial-peers of a peer or bootstrap node")
        _validate_network(config.network)
    elif isinstance(config, InviteConfig):
        _validate_invite(config.invite)
    elif isinstance(config, IdentityConfig):
        if not config.key.identity:
            raise UserError("no key file given", "pass --identity FILE (created if absent)")
    elif isinstance(config, EvaluateConfig):
        _validate_evaluate(config)
    elif isinstance(config, SimulateConfig):
        settings = config.simulate
        _require_positive({"rounds": settings.rounds})
        if settings.save_every < 0:
            raise UserError(f"save_every must be 0 or more, got {settings.save_every}", "pass --save-every 0 or K")
        malformed = [item for item in settings.peer_settings if "=" not in item]
        if malformed:
            raise UserError(f"peer setting {malformed[0]!r} is not KEY=VALUE", "pass e.g. --peer-settings lr=2e-4")
    elif isinstance(config, DemoConfig):
        settings = config.demo
        optional = (
            "rounds",
            "local_steps",
            "batch_size",
            "finetune_steps",
            "probe_steps",
            "max_train_examples",
            "max_test_examples",
            "peer_lr",
        )
        _require_positive({name: getattr(settings, name) for name in optional if getattr(settings, name) is not None})
        if settings.evaluated_contributors is not None and settings.evaluated_contributors < 0:
            raise UserError("evaluated_contributors must be 0 or more", "pass --evaluated-contributors 0 or more")
        _require_positive({"seeds": settings.seeds, "swarm_timeout": settings.swarm_timeout})
        if settings.curve_every < 0:
            raise UserError(f"curve_every must be 0 or more, got {settings.curve_every}", "pass --curve-every 0 or K")
        _validate_run_id(settings.run_id)
    else:
        _validate_peer(config)


def _validate_evaluate(config: EvaluateConfig) -> None:
    settings = config.evaluation
    if not settings.base:
        raise UserError("no base model to evaluate", "pass --base at least once (e.g. --base original=bundled)")
    if not settings.dataset and not settings.unseen:
        raise UserError("no dataset to evaluate on", "pass --dataset (seen) and/or --unseen at least once")
    if not settings.methods:
        raise UserError("no evaluation method given", f"pass --methods with {' and/or '.join(EVALUATION_METHODS)}")
    unknown = [method for method in settings.methods if method not in EVALUATION_METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}", f"pass --methods {' '.join(EVALUATION_METHODS)}")
    settings.methods = list(dict.fromkeys(settings.methods))
    positive = {
        name: getattr(settings, name)
        for name in (
            "seeds",
            "patience",
            "finetune_steps",
            "few_shot_examples",
            "few_shot_steps",
            "probe_steps",
            "lr",
            "probe_lr",
            "batch_size",
            "max_length",
            "max_train_examples",
            "max_test_examples",
            "bootstrap_resamples",
        )
    }
    if settings.torch_threads is not None:
        positive["torch_threads"] = settings.torch_threads
    _require_positive(positive)
    for name in ("finetune_epochs", "eval_every"):
        if getattr(settings, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{name} must be 0 or more, got {getattr(settings, name)}", f"pass {flag} 0 or more")
    for name, example in (("test_fraction", 0.2), ("validation_fraction", 0.15)):
        if not 0.0 < getattr(settings, name) < 1.0:
            raise UserError(f"{name} must be between 0 and 1", f"pass e.g. --{name.replace('_', '-')} {example}")


def _require_positive(values: dict[str, float | int]) -> None:
    for key, value in values.items():
        if not value > 0:
            raise UserError(f"{key} must be positive, got {value}", f"pass a positive --{key.replace('_', '-')}")


def _validate_run_id(run_id: str) -> None:
    if not run_id.strip() or not run_id.isprintable():
        raise UserError("run_id must be a non-empty printable string", "pass e.g. --run-id my-swarm")


def _validate_network(network: NetworkConfig) -> None:
    _validate_run_id(network.run_id)
    if network.require_invite:
        missing = [name for name in ("identity", "invite", "owner_public_key") if not getattr(network, name)]
        if missing:
            flags = " and ".join("--" + name.replace("_", "-") for name in missing)
            raise UserError(
                f"a moderated run (--require-invite) needs {flags}",
                "pass your --identity key file, the --invite the run owner made for it, and the owner's public key",
            )
    elif network.invite or network.owner_public_key:
        raise UserError(
            "--invite and --owner-public-key belong to a moderated run", "pass --require-invite too (on every node)"
        )


def _validate_invite(settings: InviteSettings) -> None:
    if not settings.owner_key:
        raise UserError(
            "no owner key to sign the invite with",
            "pass --owner-key OWNER.key (create it once with: coldfusion-peer identity --identity OWNER.key)",
        )
    if not settings.public_key:
        raise UserError(
            "no invitee given",
            "pass --public-key with the ssh-rsa line the invitee's `coldfusion-peer identity` printed, or its key file",
        )
    _require_positive({"valid_days": settings.valid_days})
    _validate_run_id(settings.run_id)


def _validate_bootstrap(config: BootstrapConfig) -> None:
    settings = config.bootstrap
    _require_positive({"poll_period": settings.poll_period, "download_timeout": settings.download_timeout})
    if settings.keep is not None and settings.keep < 1:
        raise UserError(f"keep must be at least 1, got {settings.keep}", "pass --keep 1 or more, or omit it")
    _validate_network(config.network)


def _validate_peer(config: PeerConfig) -> None:
    training, fusion, data = config.training, config.fusion, config.data
    positive = {
        "local_steps": training.local_steps,
        "lr": training.lr,
        "batch_size": training.batch_size,
        "max_length": data.max_length,
        "max_eval_examples": data.max_eval_examples,
        "matchmaking_time": fusion.matchmaking_time,
        "request_timeout": fusion.request_timeout,
        "allreduce_timeout": fusion.allreduce_timeout,
        "next_chunk_timeout": fusion.next_chunk_timeout,
        "state_download_timeout": fusion.state_download_timeout,
        "record_period": config.network.record_period,
        "keep_checkpoints": config.run.keep_checkpoints,
        "min_group_size": fusion.min_group_size,
        "max_update_ratio": fusion.max_update_ratio,
        "clip_ratio": fusion.clip_ratio,
        "gradient_accumulation": training.gradient_accumulation,
        "refit_lr": training.refit_lr,
        "refit_examples": training.refit_examples,
        "outer_lr": fusion.outer_lr,
        "ties_density": fusion.ties_density,
    }
    _require_positive(positive)
    for name, value in (("l2sp", training.l2sp), ("refit_steps", training.refit_steps)):
        if value < 0:
            raise UserError(f"{name} must not be negative, got {value}", f"pass --{name.replace('_', '-')} 0 or more")
    if fusion.ties_density > 1.0:
        raise UserError(f"ties_density must be at most 1, got {fusion.ties_density}", "pass e.g. --ties-density 0.2")
    for name, value in (("outer_momentum", fusion.outer_momentum), ("anchor", fusion.anchor)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {value}", f"pass e.g. --{name.replace('_', '-')} 0.5")
    if config.run.rounds is not None and config.run.rounds < 1:
        raise UserError(f"rounds must be at least 1, got {config.run.rounds}", "pass --rounds 1 or more, or omit it")
    if not 0.0 < data.validation_fraction < 1.0:
        raise UserError("validation_fraction must be between 0 and 1", "pass e.g. --validation-fraction 0.1")
    if not 0.0 <= training.warmup_ratio < 1.0:
        raise UserError("warmup_ratio must be in [0, 1)", "pass e.g. --warmup-ratio 0.1")
    if fusion.fusion_window < 0:
        raise UserError("fusion_window must not be negative", "pass --fusion-window 0 or more seconds")
    if fusion.request_timeout >= fusion.matchmaking_time:
        raise UserError(
            "request_timeout must be smaller than matchmaking_time (hivemind matchmaking can deadlock otherwise)",
            "lower --request-timeout or raise --matchmaking-time",
        )
    _validate_network(config.network)
