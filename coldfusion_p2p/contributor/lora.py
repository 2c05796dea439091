"""LoRA contributors (the ``peft`` package): train low-rank adapters on the body, plus the head.

For bigger models on small machines: a LoRA peer keeps the body's weights frozen and trains rank-R
adapters on its attention projections (and its whole head), so its optimizer holds a fraction of
the state. ColD Fusion still averages *full* bodies: at the end of each local round the adapters
are merged into the body's own weights and removed (``merge_and_unload``), so the body the peer
sends is an ordinary full body, and LoRA and full-finetuning peers fuse together. The next round
starts fresh adapters on the new fused base, as ColD Fusion restarts its optimizer every round.

The body's parameters stay the same tensor objects throughout (peft wraps each targeted
``nn.Linear`` and puts the very same module back), so everything that holds them (the averager's
copy-in, checkpoints) is untouched by LoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from coldfusion_p2p.errors import UserError

# attention projections by name, for architectures peft's own table does not list (mpnet, distilbert)
FALLBACK_TARGETS = (("query", "value"), ("q_lin", "v_lin"), ("q", "v"), ("query_proj", "value_proj"))


def default_targets(model: PreTrainedModel) -> list[str]:
    """LoRA's usual targets for this architecture: its attention query and value projections."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    if KNOWN.get(model.config.model_type):
        return list(KNOWN[model.config.model_type])
    linear_names = _linear_names(model)
    for pair in FALLBACK_TARGETS:
        if set(pair) <= linear_names:
            return list(pair)
    raise UserError(
        f"no default LoRA targets for a {model.config.model_type!r} model",
        f"pass --lora-targets with names of its linear layers (e.g. {', '.join(sorted(linear_names)[:6])})",
    )


def check_targets(model: PreTrainedModel, targets: list[str]) -> list[str]:
    """The targets LoRA will use (``targets``, or the architecture's default), each a linear layer
    of the body; a UserError at start-up rather than a crash in the first round."""
    chosen = targets or default_targets(model)
    linear_names = _linear_names(model)
    missing = [target for target in chosen if target not in linear_names]
    if missing:
        raise UserError(
            f"--lora-targets {', '.join(missing)}: no such linear layer in the {model.config.model_type} body",
            f"choose from {', '.join(sorted(linear_names))}",
        )
    return chosen


def _linear_names(model: PreTrainedModel) -> set[str]:
    """The last name part of every linear layer in the body (what LoRA's target_modules match)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.base_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@contextlib.contextmanager
def lora_round(model: PreTrainedModel, rank: int, alpha: float | None, targets: list[str]) -> Iterator[None]:
    """Fresh rank-``rank`` adapters on the body for one round; merged into its weights on the way out.

    Inside, the body's own weights are frozen and only the adapters and the head train. On exit
    (also on an exception or a stop) the adapters' update ``B @ A * alpha / rank`` is added to the
    weights they sit on and the adapters are removed, leaving an ordinary model.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    body = model.base_model
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=targets or default_targets(model),
        lora_dropout=0.0,
        bias="none",
    )
    frozen = {name: parameter.requires_grad for name, parameter in body.named_parameters()}
    wrapped = LoraModel(body, config, "round")  # injects the adapters into ``body`` in place
    for name, parameter in body.named_parameters():
        parameter.requires_grad = "lora_" in name  # the body's own weights stay as fused
    try:
        yield
    finally:
        with torch.no_grad():
            wrapped.merge_and_unload()  # puts the original modules back, with the update merged in
        for name, parameter in body.named_parameters():
            parameter.requires_grad = frozen.get(name, True)
