"""Local training: learns, is reproducible, stops when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coldfusion_p2p.config import DataConfig, TrainingConfig
from coldfusion_p2p.data import load_task_data
from coldfusion_p2p.model import load_classifier, load_tokenizer
from coldfusion_p2p.trainer import LocalTrainer, batch_indices


@pytest.fixture
def make_trainer(tiny_model_dir, tiny_dataset):
    data = load_task_data(DataConfig(dataset=str(tiny_dataset)))
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def make(**overrides):
        torch.set_num_threads(1)
        model = load_classifier(str(tiny_model_dir), data.label_names, seed=0)
        config = TrainingConfig(**{"local_steps": 30, "lr": 3e-3, "batch_size": 16, **overrides})
        return LocalTrainer(model, tokenizer, data.train, data.validation, config, max_length=16)

    return make


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
