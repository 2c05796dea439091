"""Checks of a whole config that no single field's type can express; each failure names the fix."""

from __future__ import annotations

from coldfusion_p2p.config.schema import (
    EVALUATION_METHODS,
    BootstrapConfig,
    DemoConfig,
    EvaluateConfig,
    IdentityConfig,
    InviteConfig,
    InviteSettings,
    MonitorConfig,
    NetworkConfig,
    PeerConfig,
    SectionedConfig,
    SimulateConfig,
)
from coldfusion_p2p.errors import UserError


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


def _validate_bounded_groups(fusion) -> None:
    if fusion.target_group_size is None:
        if fusion.fusion_stages is not None:
            raise UserError("--fusion-stages needs --target-group-size", "pass e.g. --target-group-size 8")
        return
    if fusion.target_group_size < 2:
        raise UserError(f"target_group_size must be at least 2, got {fusion.target_group_size}", "pass e.g. 8")
    if fusion.fusion_stages is not None and fusion.fusion_stages < 1:
        raise UserError(f"fusion_stages must be at least 1, got {fusion.fusion_stages}", "pass 1 or more, or omit it")
    if fusion.aggregation == "ties":
        raise UserError(
            "--aggregation ties trims each member's own update, which bounded groups average over several stages",
            "use --aggregation mean or clipped_mean with --target-group-size",
        )


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
    if training.lora_rank and training.l2sp:
        raise UserError("--l2sp pulls the body's weights, which a LoRA peer (--lora-rank) keeps frozen", "drop one")
    if training.lora_alpha is not None and training.lora_alpha <= 0:
        raise UserError(f"lora_alpha must be positive, got {training.lora_alpha}", "pass e.g. --lora-alpha 16")
    for name, value in (
        ("l2sp", training.l2sp),
        ("refit_steps", training.refit_steps),
        ("lora_rank", training.lora_rank),
    ):
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
    _validate_bounded_groups(fusion)
    if fusion.request_timeout >= fusion.matchmaking_time:
        raise UserError(
            "request_timeout must be smaller than matchmaking_time (hivemind matchmaking can deadlock otherwise)",
            "lower --request-timeout or raise --matchmaking-time",
        )
    _validate_network(config.network)
