"""Tokenized splits and the seeded streams of batches that training reads from them.

A peer's batches depend only on (seed, batch number): a restarted peer resumes the same stream,
and the in-process simulator reproduces the swarm's batches exactly. The stream is an endless
sequence of seeded epoch permutations. With length bucketing, each window of
``BUCKET_WINDOW`` batches of that stream is sorted by length before it is cut into batches (and
the batches' order shuffled, seeded), so a batch holds texts of similar length and, padded only
to its own longest example, costs what its texts are: tweets, SMS and questions are far shorter
than the 64-token limit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from coldfusion_p2p.contributor.data import TextSplit

BUCKET_WINDOW = 32  # batches sorted by length together: large enough to group lengths, small enough to stay random

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


def collate(
    encoded: EncodedSplit, indices, input_names: frozenset[str], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """The chosen examples, cut to the longest of them, with only the inputs the model's forward
    accepts; on ``device`` when given (the model's)."""
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
    if device is not None and device.type != "cpu":
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
    return batch


def token_chunks(encoded: EncodedSplit, indices, max_tokens: int | None) -> list[np.ndarray]:
    """``indices`` in consecutive pieces of at most ``max_tokens`` padded tokens each (at least one
    example per piece): a batch too big for a small GPU's memory, computed in parts (pure)."""
    indices = np.asarray(indices, dtype=np.int64)
    if max_tokens is None:
        return [indices]
    pieces, start = [], 0
    while start < len(indices):
        end, width = start + 1, int(encoded.lengths[indices[start]])
        while end < len(indices):
            wider = max(width, int(encoded.lengths[indices[end]]))
            if wider * (end + 1 - start) > max_tokens:
                break
            end, width = end + 1, wider
        pieces.append(indices[start:end])
        start = end
    return pieces


def stream_batch(encoded: EncodedSplit, batch_size: int, seed: int, batch_number: int, bucketing: bool) -> np.ndarray:
    """Batch ``batch_number`` of the seeded stream, length-bucketed or not (see the module docstring)."""
    if not bucketing:
        return batch_indices(len(encoded), batch_size, seed, batch_number)
    window, position = divmod(batch_number, BUCKET_WINDOW)
    batches = _bucketed_window(encoded.lengths.tobytes(), len(encoded), batch_size, seed, window)
    return batches[position]


@functools.lru_cache(maxsize=8)
def _bucketed_window(lengths_key: bytes, num_examples: int, batch_size: int, seed: int, window: int) -> tuple:
    lengths = np.frombuffer(lengths_key, dtype=np.int64)
    first = window * BUCKET_WINDOW
    indices = np.concatenate(
        [batch_indices(num_examples, batch_size, seed, first + offset) for offset in range(BUCKET_WINDOW)]
    )
    by_length = indices[np.argsort(lengths[indices], kind="stable")]
    batches = [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]
    order = np.random.default_rng([seed, window, 7]).permutation(len(batches))
    return tuple(batches[index] for index in order)


def padding_ratio(encoded: EncodedSplit, batches) -> float:
    """Padded tokens over real tokens for these batches (1.0: no padding); for benchmarks and tests."""
    padded = sum(len(batch) * int(encoded.lengths[batch].max(initial=1)) for batch in batches)
    real = sum(int(encoded.lengths[batch].sum()) for batch in batches)
    return padded / max(real, 1)
