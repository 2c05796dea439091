"""Local training: learns, is reproducible, stops when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coldfusion_p2p.contributor.batches import token_chunks
from coldfusion_p2p.contributor.trainer import batch_indices


def test_training_learns_the_task(make_trainer):
    trainer = make_trainer()
    before = trainer.evaluate().accuracy
    for round_number in (1, 2, 3):
        stats = trainer.train_round(round_number)
    assert stats.steps == 30 and stats.samples_per_second > 0
    assert trainer.evaluate().accuracy >= max(0.8, before + 0.2)


def test_same_seed_same_weights(make_trainer):
    first, second = make_trainer(local_steps=5), make_trainer(local_steps=5)
    first.train_round(1)
    second.train_round(1)
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True))


def test_batches_cover_every_example_each_epoch_and_differ_by_round():
    n, size = 10, 4
    stream = np.concatenate([batch_indices(n, size, seed=1, batch_number=b) for b in range(5)])
    assert sorted(stream[:n].tolist()) == list(range(n)) and sorted(stream[n:20].tolist()) == list(range(n))
    assert not np.array_equal(batch_indices(n, size, 1, 0), batch_indices(n, size, 2, 0))


def test_should_stop_interrupts_between_steps(make_trainer):
    trainer = make_trainer(local_steps=50)
    calls = []
    stats = trainer.train_round(1, on_step=lambda step, loss: calls.append(step), should_stop=lambda: len(calls) >= 3)
    assert stats.steps == 3 and calls == [1, 2, 3]


def test_length_buckets_keep_the_stream_and_cut_padding():
    """A bucketed window holds exactly the stream's examples, in batches of similar length."""
    from coldfusion_p2p.contributor.batches import BUCKET_WINDOW, EncodedSplit, padding_ratio, stream_batch

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=500)
    encoded = EncodedSplit({}, lengths.astype(np.int64), torch.zeros(500, dtype=torch.long))
    plain = [stream_batch(encoded, 16, 3, number, bucketing=False) for number in range(BUCKET_WINDOW)]
    bucketed = [stream_batch(encoded, 16, 3, number, bucketing=True) for number in range(BUCKET_WINDOW)]
    assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(bucketed).tolist())
    assert padding_ratio(encoded, bucketed) < 1.1 < 1.4 < padding_ratio(encoded, plain)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(bucketed, [stream_batch(encoded, 16, 3, n, True) for n in range(32)], strict=True)
    )
    assert not np.array_equal(stream_batch(encoded, 16, 3, 0, True), stream_batch(encoded, 16, 4, 0, True))


def test_gradient_accumulation_of_two_halves_equals_one_full_batch(make_trainer):
    """Two accumulated micro-batches of 8 are one step on their 16 examples (dropout off to compare)."""
    full, halves = (
        make_trainer(local_steps=1, batch_size=16),
        make_trainer(local_steps=1, batch_size=8, gradient_accumulation=2),
    )
    for trainer in (full, halves):
        trainer.model.config.hidden_dropout_prob = 0.0
        for module in trainer.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    full.batch = lambda number: np.concatenate([halves.batch(2 * number), halves.batch(2 * number + 1)])
    full.train_round(1)
    halves.train_round(1)
    for a, b in zip(full.model.parameters(), halves.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_l2sp_keeps_the_body_closer_to_the_round_start(make_trainer):
    from coldfusion_p2p.contributor.model import body_parameters
    from coldfusion_p2p.swarm.fusion import update_norm

    distances = {}
    for weight in (0.0, 50.0):
        trainer = make_trainer(local_steps=20, l2sp=weight)
        start = [tensor.detach().clone() for tensor in body_parameters(trainer.model)]
        trainer.train_round(1)
        distances[weight] = update_norm(body_parameters(trainer.model), start)
    assert distances[50.0] < 0.8 * distances[0.0]


def test_head_refit_changes_only_the_head_and_fits_a_new_body(make_trainer):
    """After the body changed under it, a re-fit lowers the head's loss without touching the body."""
    from coldfusion_p2p.contributor.model import body_parameters, head_state

    trainer = make_trainer(local_steps=30, refit_steps=40, refit_lr=1e-2)
    trainer.train_round(1)
    with torch.no_grad():  # a "fused" body the head was not trained on
        for parameter in body_parameters(trainer.model):
            parameter.add_(0.05 * torch.randn_like(parameter))
    body_before = [tensor.detach().clone() for tensor in body_parameters(trainer.model)]
    head_before = head_state(trainer.model)
    loss_before = trainer.evaluate().loss
    losses = trainer.refit_head(1)
    assert len(losses) == 40
    assert all(torch.equal(a, b) for a, b in zip(body_before, body_parameters(trainer.model), strict=True))
    assert any(not torch.equal(head_before[name], tensor) for name, tensor in head_state(trainer.model).items())
    assert trainer.evaluate().loss < loss_before
    assert all(parameter.requires_grad for parameter in body_parameters(trainer.model))  # training goes on


def test_head_refit_is_reproducible_and_off_at_zero_steps(make_trainer):
    from coldfusion_p2p.contributor.model import head_state

    first, second = make_trainer(local_steps=5), make_trainer(local_steps=5)
    for trainer in (first, second):
        trainer.train_round(1)
        trainer.refit_head(1)
    assert all(
        torch.equal(first_tensor, head_state(second.model)[name])
        for name, first_tensor in head_state(first.model).items()
    )
    off = make_trainer(local_steps=5, refit_steps=0)
    off.train_round(1)
    before = head_state(off.model)
    assert off.refit_head(1) == []
    assert all(torch.equal(before[name], tensor) for name, tensor in head_state(off.model).items())


def test_majority_rate_is_the_most_common_label_share(make_trainer):
    trainer = make_trainer()
    labels = trainer.validation_data.labels[trainer.eval_indices]
    assert trainer.majority_rate() == pytest.approx(float(torch.bincount(labels).max()) / len(labels))


def without_dropout(trainer) -> None:
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def test_max_tokens_splits_a_batch_into_pieces_with_the_same_gradient(make_trainer):
    """A micro-batch cut into pieces of at most 40 padded tokens takes the same step as the whole batch."""
    whole, pieces = make_trainer(local_steps=2), make_trainer(local_steps=2, max_tokens=40)
    for trainer in (whole, pieces):
        without_dropout(trainer)
    cut = token_chunks(pieces.train_data, pieces.batch(0), 40)
    assert len(cut) > 2 and all(len(piece) * pieces.train_data.lengths[piece].max() <= 40 for piece in cut)
    assert np.array_equal(np.concatenate(cut), pieces.batch(0))  # every example, once, in order
    whole.train_round(1)
    pieces.train_round(1)
    for a, b in zip(whole.model.parameters(), pieces.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu_learns_and_keeps_fp32_weights(make_trainer, precision):
    trainer = make_trainer(precision=precision, device="cpu")
    before = trainer.evaluate().accuracy
    for round_number in (1, 2, 3):
        stats = trainer.train_round(round_number)
    assert np.isfinite(stats.loss) and stats.steps == 30
    assert all(parameter.dtype == torch.float32 for parameter in trainer.model.parameters())
    assert trainer.evaluate().accuracy >= max(0.8, before + 0.2)
