"""Local finetuning and evaluation of one peer's model: pure PyTorch, no networking.

A round of local work is ``local_steps`` AdamW steps from the current fused body with a fresh
optimizer and a linear schedule (ColD Fusion restarts the optimizer every iteration, since the
body it starts from is new). Batches come from an endless, seeded stream of epoch permutations,
so a round's batches depend only on (seed, round) and a restarted peer resumes the same stream.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from coldfusion_p2p.config import TrainingConfig
from coldfusion_p2p.data import TextSplit
from coldfusion_p2p.model import forward_input_names

EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class EncodedSplit:
    """A tokenized split: one right-padded int64 matrix per input name, true lengths, and labels.

    Padding once to the longest example makes a batch two numpy slices instead of a Python loop
    over rows, which matters for small models where a step takes milliseconds.
    """

    features: dict[str, np.ndarray]  # name -> (examples, longest) int64, padded on the right
    lengths: np.ndarray  # tokens per example before padding
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


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


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads ``input_ids`` (0 for tokenizers that define none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_split(tokenizer: PreTrainedTokenizerBase, split: TextSplit, max_length: int) -> EncodedSplit:
    """Tokenize once up front; batches are later cut to their own longest example."""
    if split.text_pairs is None:
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    else:
        encoded = tokenizer(split.texts, split.text_pairs, truncation=True, max_length=max_length)
    lengths = np.asarray([len(row) for row in encoded["input_ids"]], dtype=np.int64)
    width = int(lengths.max(initial=1))
    features = {}
    for name, rows in encoded.items():
        matrix = np.full((len(rows), width), pad_token_id(tokenizer) if name == "input_ids" else 0, dtype=np.int64)
        for row_index, row in enumerate(rows):
            matrix[row_index, : len(row)] = row
        features[name] = matrix
    return EncodedSplit(features, lengths, torch.tensor(split.labels, dtype=torch.long))


def batch_indices(num_examples: int, batch_size: int, seed: int, batch_number: int) -> np.ndarray:
    """Indices of batch ``batch_number`` in the endless stream of seeded epoch permutations."""
    start = batch_number * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        permutation = _epoch_permutation(num_examples, seed, epoch)
        indices.extend(permutation[offset : offset + batch_size - len(indices)].tolist())
    return np.asarray(indices)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def collate(encoded: EncodedSplit, indices, input_names: frozenset[str]) -> dict[str, torch.Tensor]:
    """The chosen examples, cut to the longest of them, with only the inputs the model's forward accepts."""
    indices = np.asarray(indices, dtype=np.int64)
    width = int(encoded.lengths[indices].max(initial=1))
    batch = {
        name: torch.from_numpy(matrix[indices, :width])
        for name, matrix in encoded.features.items()
        if name in input_names
    }
    if "attention_mask" in input_names and "attention_mask" not in batch:
        mask = np.arange(width)[None, :] < encoded.lengths[indices][:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    batch["labels"] = encoded.labels[indices]
    return batch


class LocalTrainer:
    """Finetunes one model on one peer's split; the peer owns the model and swaps its body between rounds.

    >>> trainer = LocalTrainer(model, tokenizer, train_split, validation_split, training_config, max_length=64)
    >>> stats = trainer.train_round(round_number=1)          # local_steps AdamW steps
    >>> trainer.evaluate().accuracy
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
        self.train_data = encode_split(tokenizer, train, max_length)
        self.validation_data = encode_split(tokenizer, validation, max_length)
        self.eval_indices = np.arange(min(len(self.validation_data), max_eval_examples))
        self.input_names = forward_input_names(model)

    def train_round(
        self,
        round_number: int,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainStats:
        """Run ``local_steps`` steps of round ``round_number`` (1-based); ``on_step(step, loss)`` after each.

        ``should_stop`` is polled between steps so SIGTERM never waits for a whole round.
        """
        config, model = self.config, self.model
        steps = config.local_steps
        torch.manual_seed(config.seed * 1_000_003 + round_number)  # dropout
        optimizer = torch.optim.AdamW(
            [parameter for parameter in model.parameters() if parameter.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        schedule = get_linear_schedule_with_warmup(optimizer, math.floor(config.warmup_ratio * steps), steps)
        model.train()
        losses, started = [], time.perf_counter()
        first_batch = (round_number - 1) * steps
        for step in range(steps):
            if should_stop is not None and should_stop():
                break
            indices = batch_indices(len(self.train_data), config.batch_size, config.seed, first_batch + step)
            loss = model(**collate(self.train_data, indices, self.input_names)).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
        model.eval()
        seconds = time.perf_counter() - started
        return TrainStats(
            steps=len(losses),
            loss=float(np.mean(losses)) if losses else float("nan"),
            seconds=seconds,
            samples_per_second=len(losses) * config.batch_size / seconds if seconds > 0 else 0.0,
        )

    @torch.no_grad()
    def evaluate(self) -> EvalStats:
        """Accuracy and mean loss on (at most ``max_eval_examples`` of) the validation split."""
        self.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(self.eval_indices), EVAL_BATCH_SIZE):
            indices = self.eval_indices[start : start + EVAL_BATCH_SIZE]
            batch = collate(self.validation_data, indices, self.input_names)
            output = self.model(**batch)
            loss_sum += output.loss.item() * len(indices)
            correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        count = len(self.eval_indices)
        return EvalStats(accuracy=correct / count, loss=loss_sum / count, examples=count)
