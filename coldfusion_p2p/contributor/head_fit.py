"""Training a classifier's head alone on a frozen body, from cached body outputs.

Two places need it: the linear probe of the evaluation (a fresh head on a frozen base), and the
peer's head re-fit after fusion (the contributor's old head does not fit the new fused body, and
re-aligning it costs one body pass over a few hundred examples plus cheap head-only steps).

The frozen body's outputs are computed once per example and replayed into the model's own
forward (the body's ``forward`` is swapped for a lookup), so every architecture's head (BERT's
pooler path, RoBERTa's ``<s>`` dense head, DeBERTa's context pooler...) is trained exactly as it
would be on a live body. When replaying is not possible (an exotic body output, or too large a
cache) it falls back to running the frozen body in every step, which gives the same result more
slowly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, get_linear_schedule_with_warmup
from transformers.utils import ModelOutput

from coldfusion_p2p.contributor.batches import EVAL_BATCH_SIZE, EncodedSplit, collate
from coldfusion_p2p.contributor.model import body_parameters, forward_input_names, split_body_head

logger = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3  # larger caches fall back to running the frozen body each step


@dataclass
class BodyFeed:
    """A tokenized split and, when replaying, the cached body outputs of some of its examples."""

    encoded: EncodedSplit
    width: int  # every batch is padded to this many tokens, as when the cache was made
    position: np.ndarray | None = None  # example index -> row of the cache (-1: not cached)
    output_type: type | None = None
    tensors: dict[str, torch.Tensor] | None = None

    @property
    def replays(self) -> bool:
        return self.tensors is not None


class FrozenBody:
    """Runs a classifier whose body is frozen, replaying cached body outputs when it can.

    ``prepare`` runs the body once per needed example (through the model's own forward, a hook
    capturing what the body returns), checks that replaying reproduces the live logits, and
    keeps the outputs; ``forward`` then swaps ``base_model.forward`` for a lookup, so only the
    head's computation runs. Any surprise falls back to live forwards of the frozen body.
    """

    def __init__(self, model: PreTrainedModel, pad_token_id: int):
        self.model, self.body = model, model.base_model
        self.input_names = forward_input_names(model)
        self.pad_token_id = pad_token_id

    def batch(self, feed: BodyFeed, indices) -> dict[str, torch.Tensor]:
        batch = collate(feed.encoded, indices, self.input_names, next(self.model.parameters()).device)
        for name, tensor in batch.items():
            if name != "labels" and tensor.dim() == 2 and tensor.shape[1] < feed.width:
                pad_value = self.pad_token_id if name == "input_ids" else 0
                batch[name] = torch.nn.functional.pad(tensor, (0, feed.width - tensor.shape[1]), value=pad_value)
        return batch

    def forward(self, feed: BodyFeed, indices) -> Any:
        batch = self.batch(feed, indices)
        if not feed.replays:
            return self.model(**batch)
        rows = torch.as_tensor(feed.position[np.asarray(indices)])
        outputs = feed.output_type(**{key: tensor[rows.to(tensor.device)] for key, tensor in feed.tensors.items()})
        with self._replaying(outputs):
            return self.model(**batch)

    @contextlib.contextmanager
    def _replaying(self, outputs: ModelOutput) -> Iterator[None]:
        self.body.forward = lambda *args, **kwargs: outputs
        try:
            yield
        finally:
            del self.body.forward  # the class's own forward again

    def prepare(self, encoded: EncodedSplit, needed: np.ndarray, replay: bool = True) -> BodyFeed:
        """A feed for ``encoded``; caches the body outputs of the ``needed`` examples when replay works."""
        needed = np.asarray(needed, dtype=np.int64)
        feed = BodyFeed(encoded, width=int(encoded.lengths[needed].max(initial=1)))
        if not replay or not len(needed):
            return feed
        try:
            cached = self._cache(feed, needed)
        except Exception as error:  # an architecture whose forward does not fit the replay: run it live
            logger.info("head fit: replaying body outputs failed (%s); running the frozen body", error)
            return feed
        if cached is None:
            return feed
        return cached

    def _cache(self, feed: BodyFeed, needed: np.ndarray) -> BodyFeed | None:
        captured: list[Any] = []
        handle = self.body.register_forward_hook(lambda module, args, output: captured.append(output))
        chunks: dict[str, list[torch.Tensor]] = {}
        output_type, reference = None, None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(needed), EVAL_BATCH_SIZE):
                    indices = needed[start : start + EVAL_BATCH_SIZE]
                    captured.clear()
                    logits = self.model(**self.batch(feed, indices)).logits
                    if len(captured) != 1 or not isinstance(captured[0], ModelOutput):
                        return _give_up("the body ran other than once or returned no ModelOutput")
                    output = captured[0]
                    items = dict(output.items())
                    if output_type is None:
                        output_type, reference = type(output), (indices, logits)
                        per_example = sum(_nbytes(value) for value in items.values()) / len(indices)
                        if per_example * len(needed) > CACHE_LIMIT_BYTES:
                            return _give_up(f"the cache would take {per_example * len(needed) / 1e9:.1f} GB")
                    if type(output) is not output_type or set(items) != set(chunks or items):
                        return _give_up("the body's outputs differ between batches")
                    for key, value in items.items():
                        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != len(indices):
                            return _give_up(f"body output {key!r} is not one tensor row per example")
                        chunks.setdefault(key, []).append(value)
        finally:
            handle.remove()
            self.model.train(was_training)
        position = np.full(len(feed.encoded), -1, dtype=np.int64)
        position[needed] = np.arange(len(needed))
        cached = BodyFeed(
            feed.encoded,
            feed.width,
            position,
            output_type,
            {key: torch.cat(values) for key, values in chunks.items()},
        )
        indices, logits = reference
        self.model.eval()
        try:
            with torch.no_grad():
                replayed = self.forward(cached, indices).logits
        finally:
            self.model.train(was_training)
        if not torch.allclose(replayed, logits, atol=1e-5, rtol=1e-4):
            return _give_up("replayed logits differ from the live ones")
        return cached


def _give_up(reason: str) -> None:
    logger.info("head fit: not replaying body outputs (%s); running the frozen body", reason)
    return None


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


@contextlib.contextmanager
def frozen_body(model: PreTrainedModel) -> Iterator[None]:
    """The body's parameters take no gradient inside the block (restored after)."""
    parameters = body_parameters(model)
    previous = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, previous, strict=True):
            parameter.requires_grad_(flag)


def train_head(
    body: FrozenBody,
    feed: BodyFeed,
    batches: Sequence[np.ndarray],
    *,
    lr: float,
    seed: int,
    weight_decay: float,
) -> list[float]:
    """AdamW with a linear decay on the head alone over ``batches`` (example indices of ``feed``).

    The body stays frozen and in eval mode (no dropout: a head fits fixed features); the head
    trains with dropout as in finetuning. Returns the loss of every step.
    """
    model = body.model
    parameters = dict(model.named_parameters())
    head = [parameters[name] for name in split_body_head(model).head]
    torch.manual_seed(seed * 1_000_003 + 1)  # head dropout
    optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(batches))
    losses = []
    with frozen_body(model):
        model.train()
        model.base_model.eval()
        for indices in batches:
            loss = body.forward(feed, indices).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return losses


def head_accuracy(body: FrozenBody, feed: BodyFeed) -> float:
    """Accuracy of the model's current head on every example of ``feed``."""
    model, labels = body.model, feed.encoded.labels
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            indices = np.arange(start, min(start + EVAL_BATCH_SIZE, len(labels)))
            output = body.forward(feed, indices)
            correct += (output.logits.argmax(-1).cpu() == labels[indices]).sum().item()
    return correct / max(len(labels), 1)
