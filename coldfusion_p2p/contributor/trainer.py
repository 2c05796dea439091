"""Local finetuning and evaluation of one peer's model: pure PyTorch, no networking.

A round of local work is ``local_steps`` AdamW steps from the current fused body with a fresh
optimizer (ColD Fusion restarts the optimizer every iteration, since the body it starts from is
new), a short linear warm-up and a decay, optionally with gradient accumulation and an L2-SP pull
toward the round's start. Batches come from the seeded stream of :mod:`coldfusion_p2p.contributor.batches`,
so a round's batches depend only on (seed, round) and a restarted peer resumes the same stream.

After a new fused body arrives, :meth:`LocalTrainer.refit_head` re-aligns the peer's head with it
by a few head-only steps on cached body outputs: the old head was trained on the peer's own
pre-fusion body and does not fit the average.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from coldfusion_p2p.config import TrainingConfig
from coldfusion_p2p.contributor.batches import (  # re-exported: evaluation and benchmarks batch the same way
    EVAL_BATCH_SIZE,
    EncodedSplit,
    batch_indices,
    collate,
    encode_split,
    pad_token_id,
    stream_batch,
    token_chunks,
)
from coldfusion_p2p.contributor.data import TextSplit
from coldfusion_p2p.contributor.device import autocast, grad_scaler
from coldfusion_p2p.contributor.head_fit import FrozenBody, train_head
from coldfusion_p2p.contributor.lora import lora_round
from coldfusion_p2p.contributor.model import body_parameters, forward_input_names

__all__ = [
    "EVAL_BATCH_SIZE",
    "EncodedSplit",
    "EvalStats",
    "LocalTrainer",
    "TrainStats",
    "batch_indices",
    "collate",
    "encode_split",
    "pad_token_id",
]

SCHEDULES = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda optimizer, warmup, total: get_constant_schedule_with_warmup(optimizer, warmup),
}


@dataclass(frozen=True)
class TrainStats:
    steps: int  # steps actually taken (fewer than asked when stopped early)
    loss: float  # mean training loss over the steps taken
    seconds: float
    samples_per_second: float

    @property
    def completed(self) -> bool:
        return self.steps > 0


@dataclass(frozen=True)
class EvalStats:
    accuracy: float
    loss: float
    examples: int


class LocalTrainer:
    """Finetunes one model on one peer's split; the peer owns the model and swaps its body between rounds.

    >>> trainer = LocalTrainer(model, tokenizer, train_split, validation_split, training_config, max_length=64)
    >>> stats = trainer.train_round(round_number=1)          # local_steps AdamW steps
    >>> trainer.evaluate().accuracy
    >>> trainer.refit_head(round_number=1)                   # after a new fused body arrived
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train: TextSplit,
        validation: TextSplit,
        config: TrainingConfig,
        *,
        max_length: int,
        max_eval_examples: int = 512,
    ):
        self.model, self.config = model, config
        self.pad_token_id = pad_token_id(tokenizer)
        self.train_data = encode_split(tokenizer, train, max_length)
        self.validation_data = encode_split(tokenizer, validation, max_length)
        self.eval_indices = np.arange(min(len(self.validation_data), max_eval_examples))
        self.input_names = forward_input_names(model)
        self.device = next(model.parameters()).device  # the learner put the model there (--device)

    def batch(self, batch_number: int) -> np.ndarray:
        """Indices of micro-batch ``batch_number`` of this peer's stream."""
        config = self.config
        return stream_batch(self.train_data, config.batch_size, config.seed, batch_number, config.length_bucketing)

    def train_round(
        self,
        round_number: int,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainStats:
        """Run ``local_steps`` steps of round ``round_number`` (1-based); ``on_step(step, loss)`` after each.

        ``should_stop`` is polled between steps so SIGTERM never waits for a whole round. With
        ``lora_rank`` the steps train fresh adapters that are merged into the body at the end.
        """
        config = self.config
        if not config.lora_rank:
            return self._train_steps(round_number, on_step, should_stop)
        with lora_round(self.model, config.lora_rank, config.lora_alpha, config.lora_targets):
            return self._train_steps(round_number, on_step, should_stop)

    def _train_steps(self, round_number: int, on_step, should_stop) -> TrainStats:
        config, model = self.config, self.model
        steps, accumulation = config.local_steps, config.gradient_accumulation
        torch.manual_seed(config.seed * 1_000_003 + round_number)  # dropout
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        scaler = grad_scaler(self.device, config.precision)
        schedule = SCHEDULES[config.schedule](optimizer, math.floor(config.warmup_ratio * steps), steps)
        body = body_parameters(model)
        start = [parameter.detach().clone() for parameter in body] if config.l2sp > 0 else None
        model.train()
        losses, examples, started = [], 0, time.perf_counter()
        first_batch = (round_number - 1) * steps * accumulation
        for step in range(steps):
            if should_stop is not None and should_stop():
                break
            step_loss = 0.0
            for micro in range(accumulation):
                indices = self.batch(first_batch + step * accumulation + micro)
                step_loss += self._backward(indices, scaler, 1.0 / accumulation)
                examples += len(indices)
            if scaler is not None:
                scaler.unscale_(optimizer)  # the L2-SP pull below adds true (unscaled) gradients
            if start is not None:
                pull_toward(body, start, config.l2sp)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skips the step when fp16 overflowed, and lowers the scale
                scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step + 1, losses[-1])
        model.eval()
        seconds = time.perf_counter() - started
        return TrainStats(
            steps=len(losses),
            loss=float(np.mean(losses)) if losses else float("nan"),
            seconds=seconds,
            samples_per_second=examples / seconds if seconds > 0 else 0.0,
        )

    def _backward(self, indices: np.ndarray, scaler, weight: float) -> float:
        """Accumulate ``weight`` x the mean loss of micro-batch ``indices`` into the gradients, in
        pieces of at most ``max_tokens`` (each weighted by its share: the same gradient); its loss."""
        total = 0.0
        for piece in token_chunks(self.train_data, indices, self.config.max_tokens):
            batch = collate(self.train_data, piece, self.input_names, self.device)
            with autocast(self.device, self.config.precision):
                loss = self.model(**batch).loss * (weight * len(piece) / len(indices))
            (loss if scaler is None else scaler.scale(loss)).backward()
            total += loss.item()
        return total

    def refit_head(self, round_number: int) -> list[float]:
        """Re-fit the head to the current body: ``refit_steps`` head-only steps on cached body outputs.

        The examples (at most ``refit_examples`` of the training split) and batches are seeded by
        (seed, round), so the simulator and the swarm re-fit identically. Returns the step losses.
        """
        config = self.config
        if config.refit_steps <= 0:
            return []
        rng = np.random.default_rng([config.seed, round_number, 11])
        count = min(len(self.train_data), config.refit_examples)
        needed = np.sort(rng.permutation(len(self.train_data))[:count])
        batch_size = min(config.batch_size, count)
        batches = [rng.choice(needed, size=batch_size, replace=False) for _ in range(config.refit_steps)]
        body = FrozenBody(self.model, self.pad_token_id)
        feed = body.prepare(self.train_data, needed)
        return train_head(
            body, feed, batches, lr=config.refit_lr, seed=config.seed + round_number, weight_decay=config.weight_decay
        )

    def majority_rate(self) -> float:
        """Accuracy on the evaluated validation examples of always predicting their most common label."""
        labels = self.validation_data.labels[self.eval_indices]
        return float(torch.bincount(labels).max()) / max(len(labels), 1)

    @torch.no_grad()
    def evaluate(self) -> EvalStats:
        """Accuracy and mean loss on (at most ``max_eval_examples`` of) the validation split."""
        self.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(self.eval_indices), EVAL_BATCH_SIZE):
            indices = self.eval_indices[start : start + EVAL_BATCH_SIZE]
            batch = collate(self.validation_data, indices, self.input_names, self.device)
            with autocast(self.device, self.config.precision):
                output = self.model(**batch)
            loss_sum += output.loss.item() * len(indices)
            correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        count = len(self.eval_indices)
        return EvalStats(accuracy=correct / count, loss=loss_sum / count, examples=count)


def pull_toward(parameters: list[torch.nn.Parameter], anchor: list[torch.Tensor], weight: float) -> None:
    """Add the gradient of the L2-SP penalty ``weight/2 * ||theta - anchor||^2`` to each parameter's grad."""
    with torch.no_grad():
        for parameter, origin in zip(parameters, anchor, strict=True):
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.add_(parameter - origin, alpha=weight)
