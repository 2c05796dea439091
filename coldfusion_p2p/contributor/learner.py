"""One contributor's local side, built from its config: data, tokenizer, classifier, body and trainer.

The peer daemon and the in-process simulator build their contributors with the same function, so
a simulated contributor loads the same rows, initialises the same head and trains on the same
batches as the real peer with that config: that is what makes a simulator result a swarm result.
No networking here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coldfusion_p2p.config import PeerConfig
from coldfusion_p2p.contributor.data import TaskData, load_task_data
from coldfusion_p2p.contributor.device import available_device, check_precision
from coldfusion_p2p.contributor.lora import check_targets
from coldfusion_p2p.contributor.model import (
    body_parameters,
    keep_local,
    load_classifier,
    load_tokenizer,
    resolve_model_name,
)
from coldfusion_p2p.contributor.trainer import LocalTrainer


@dataclass
class LocalLearner:
    """What a contributor trains with; ``body`` is the model's body parameters in canonical order."""

    config: PeerConfig
    data: TaskData
    model_name: str
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    body: list[torch.nn.Parameter]
    trainer: LocalTrainer


def build_learner(config: PeerConfig) -> LocalLearner:
    """Load the data and the model of ``config`` and wrap them in a trainer; UserError on bad input."""
    data = load_task_data(config.data)
    model_name = resolve_model_name(config.training.model)
    tokenizer = load_tokenizer(model_name)
    device = available_device(config.training.device)  # a GPU asked for but absent fails before loading
    check_precision(device, config.training.precision)
    model = load_classifier(model_name, data.label_names, seed=config.training.seed).to(device)
    if config.fusion.local_modules:
        keep_local(model, config.fusion.local_modules)
    if config.training.lora_rank:
        check_targets(model, config.training.lora_targets)
    trainer = LocalTrainer(
        model,
        tokenizer,
        data.train,
        data.validation,
        config.training,
        max_length=config.data.max_length,
        max_eval_examples=config.data.max_eval_examples,
    )
    return LocalLearner(config, data, model_name, tokenizer, model, body_parameters(model), trainer)
