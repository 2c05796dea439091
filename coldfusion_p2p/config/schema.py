"""Every setting, with its default and its help text, grouped into small dataclasses.

Each field's trailing ``# comment`` is its ``--help`` text (:func:`~coldfusion_p2p.config.fields.field_help`
reads this file), so a setting is documented exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coldfusion_p2p.config.fields import _field_index, coerce_value, config_fields, normalize_key
from coldfusion_p2p.errors import UserError

LOOPBACK_HOST_MADDR = "/ip4/127.0.0.1/tcp/0"


@dataclass
class DataConfig:
    dataset: str | None = None  # file (csv/tsv/jsonl/json/parquet), save_to_disk folder, or hub name
    dataset_name: str | None = None  # public label of this peer's data shown to the swarm (default: file stem)
    dataset_license: str | None = None  # licence of this data (Hub ids: mit, cc-by-4.0...) for the bases' model cards
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
    max_tokens: int | None = None  # split a micro-batch into pieces of at most this many padded tokens (same math)
    device: str = "auto"  # auto (CUDA when torch sees a GPU), cpu, cuda, cuda:N or mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast (fp16 adds loss scaling); weights stay fp32
    length_bucketing: bool = True  # batch examples of similar length: short texts cost what they are
    l2sp: float = 0.0  # L2-SP: pull the body toward the round's start with this penalty weight (0: off)
    lora_rank: int = 0  # LoRA (peft): train rank-R adapters on the body (merged before fusion) plus the head; 0: off
    lora_alpha: float | None = None  # LoRA scaling alpha (default: 2 x rank)
    lora_targets: list[str] = field(default_factory=list)  # body modules given adapters (default: attention q, v)
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
    compression: Literal["none", "fp16", "int8"] = "none"  # fp16 halves the bytes each peer sends; int8 quarters them
    client_results: Literal["after_sending", "streamed"] = "streamed"  # NAT clients get results while sending
    aggregation: Literal["mean", "clipped_mean", "ties"] = "mean"  # clipped_mean: robust to bad updates; ties: TIES
    clip_ratio: float = 2.0  # clipped_mean caps each update's norm at this many times the group's median
    ties_density: float = 0.2  # ties keeps this fraction of each member's largest update entries per tensor
    outer_lr: float = 1.0  # outer optimizer (DiLoCo): step size on the averaged update (1 and no momentum: the mean)
    outer_momentum: float = 0.0  # Nesterov momentum of the outer optimizer; its state travels with the fused base
    anchor: float = 0.0  # WiSE-FT: move the fused base this fraction back toward the original weights
    local_modules: list[str] = field(default_factory=list)  # base-model parts kept local like the head, e.g. pooler
    target_group_size: int | None = None  # bounded groups of at most this many peers, over stages (default: one group)
    fusion_stages: int | None = None  # stages of bounded groups (default: the fewest whose grid holds the round)


@dataclass
class NetworkConfig:
    run_id: str = "coldfusion"  # peers with the same run id fuse together
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peers already in the swarm
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to announce (NAT)
    reachability: Literal["auto", "public", "private"] = "auto"  # auto: a bootstrap tries to connect back to us
    use_relay: Literal["auto", "on", "off"] = "auto"  # behind NAT: use a --relay bootstrap (auto: if one is found)
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
    report_to: Literal["none", "tensorboard"] = "none"  # also write per-step and per-round scalars for TensorBoard
    tensorboard_dir: str | None = None  # where --report-to tensorboard writes (default: <output-dir>/tensorboard)


@dataclass
class BootstrapSettings:
    peers_file: str | None = None  # write the --initial-peers value here (default: initial_peers.txt)
    relay: bool = False  # serve libp2p circuit relays for peers behind NAT (needs a public address)
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
    device: str = "auto"  # auto (CUDA when torch sees a GPU), cpu, cuda, cuda:N or mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision of the runs; weights stay fp32


@dataclass
class DemoSettings:
    quick: bool = False  # the whole idea in about three minutes: fewer rounds, steps and examples
    contributors: list[str] = field(default_factory=list)  # bundled peers that train (default: four of them)
    unseen_datasets: list[str] = field(default_factory=list)  # bundled datasets kept for evaluation only
    rounds: int | None = None  # fusion rounds (default 5; --quick 2)
    local_steps: int | None = None  # steps per round at each peer's lr (default 20; --quick 8)
    batch_size: int | None = None  # examples per step (default 32; --quick 16)
    peer_lr: float | None = None  # contributors' learning rate (default: each bundled peer config's)
    model: str | None = None  # base model (default: the bundled all-MiniLM-L6-v2)
    seeds: int = 1  # evaluation seeds
    evaluated_contributors: int | None = None  # contributors' datasets evaluated as seen (default 2; all train)
    curve_every: int = 0  # also evaluate every K-th archived round: accuracy over rounds (0: last round only)
    finetune_steps: int | None = None  # evaluation finetuning steps (default 30; --quick 10)
    probe_steps: int | None = None  # evaluation linear-probe steps (default 300)
    max_train_examples: int | None = None  # evaluation train examples per dataset (default 400; --quick 200)
    max_test_examples: int | None = None  # evaluation test examples per dataset (default 400; --quick 120)
    report_dir: str = "demo-report"  # summary.md, CSV/JSON of every number, PNG plots
    run_id: str = "coldfusion-demo"  # the demo swarm's run id
    swarm_timeout: float = 3600.0  # give up on the swarm after this many seconds


DEMO_QUICK = {  # --quick: the whole idea in about three minutes on two cores
    "rounds": 2,
    "local_steps": 8,
    "batch_size": 16,
    "validation_examples": 100,
    "evaluated_contributors": 2,  # seen datasets evaluated (all contributors train)
    "finetune_steps": 10,
    "probe_steps": 300,
    "max_train_examples": 200,
    "max_test_examples": 120,
}
DEMO_DEFAULTS = {  # measured on two cores: the contributors learn (docs/measurements/demo-defaults)
    "rounds": 5,
    "local_steps": 20,  # at the peers' lr 2e-4: TREC 0.63 -> 0.90, tweets 0.64 -> 0.72 after fusion (simulator)
    "batch_size": 32,
    "validation_examples": 200,
    "evaluated_contributors": 2,  # seen datasets evaluated (all contributors train): evaluation dominates the time
    "finetune_steps": 30,
    "probe_steps": 300,
    "max_train_examples": 400,
    "max_test_examples": 400,
}


def effective_demo_settings(demo: DemoSettings) -> dict[str, Any]:
    """The demo's settings: every unset (None) field takes its value from :data:`DEMO_DEFAULTS`, or
    :data:`DEMO_QUICK` with ``--quick``; explicit flags always win."""
    settings = dict(demo.__dict__)
    preset = DEMO_QUICK if demo.quick else DEMO_DEFAULTS
    for key, value in preset.items():
        if settings.get(key) is None:
            settings[key] = value
    return settings


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
