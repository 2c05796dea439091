"""``train_vs_plain``: local samples/s of our trainer against a minimal PyTorch loop (``benchmarks/run.py``).

Both arms train on exactly the same batches (asserted by a hash of every batch's token ids and
labels), both cutting them with the same ``collate`` inside the timer, after the same warm-up round.
"""

from __future__ import annotations

import hashlib
import time

import torch
from common import DATA, order_of, spread

from coldfusion_p2p.config import DataConfig, TrainingConfig
from coldfusion_p2p.contributor.data import load_task_data
from coldfusion_p2p.contributor.model import forward_input_names, load_classifier, load_tokenizer
from coldfusion_p2p.contributor.trainer import LocalTrainer, collate


def _batch_digest(log: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 of every batch a model was fed, in order: equal digests prove both loops saw the same data."""
    digest = hashlib.sha256()
    for input_ids, labels in log:
        digest.update(str(tuple(input_ids.shape)).encode())
        digest.update(input_ids.contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def bench_training(label: str, model_name: str, steps: int, trials: int, batch_size: int = 32) -> dict:
    """Our LocalTrainer against a minimal loop on the same model init, batches and optimizer settings.

    Both arms: one untimed warm-up round (round 1's batches), then ``trials`` timed rounds (round
    t + 2's batches), in alternating order; each round is ``steps`` AdamW steps with a fresh
    optimizer (as ours does every round), batches cut by the same ``collate`` inside the timer,
    the stream's batch indices computed before the timer for both. A forward pre-hook on both
    models records every batch it is fed; their hashes must be identical.
    """
    data = load_task_data(DataConfig(dataset=str(DATA / "tweet_sentiment" / "train.csv")))
    tokenizer = load_tokenizer(model_name)
    config = TrainingConfig(local_steps=steps, batch_size=batch_size, lr=2e-4)
    ours_model = load_classifier(model_name, data.label_names, seed=0)
    plain_model = load_classifier(model_name, data.label_names, seed=0)
    trainer = LocalTrainer(ours_model, tokenizer, data.train, data.validation, config, max_length=64)
    encoded, input_names = trainer.train_data, forward_input_names(plain_model)
    fed: dict[str, list] = {"ours": [], "plain": []}
    for arm, model in (("ours", ours_model), ("plain", plain_model)):
        model.register_forward_pre_hook(
            lambda _module, _args, kwargs, log=fed[arm]: log.append((kwargs["input_ids"], kwargs["labels"])),
            with_kwargs=True,
        )

    def prepare(round_number: int) -> list:  # the stream's indices (cached), outside both timers
        first = (round_number - 1) * steps
        return [trainer.batch(first + step) for step in range(steps)]

    def plain_round(round_number: int) -> float:
        chosen = prepare(round_number)
        torch.manual_seed(config.seed * 1_000_003 + round_number)  # dropout, as ours
        optimizer = torch.optim.AdamW(plain_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        plain_model.train()
        started = time.perf_counter()
        for indices in chosen:
            plain_model(**collate(encoded, indices, input_names)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - started
        plain_model.eval()
        return steps * batch_size / seconds

    def ours_round(round_number: int) -> float:
        prepare(round_number)
        return trainer.train_round(round_number).samples_per_second

    arms = {"ours": ours_round, "plain": plain_round}
    for arm in ("ours", "plain"):  # the same warm-up: one whole round of the same batches each
        arms[arm](1)
    samples: dict[str, list[float]] = {"ours": [], "plain": []}
    orders = []
    for trial in range(trials):
        order = order_of(trial, "ours", "plain")
        orders.append(order[0])
        for arm in order:
            samples[arm].append(arms[arm](trial + 2))
    digests = {arm: _batch_digest(log) for arm, log in fed.items()}
    if digests["ours"] != digests["plain"] or len(fed["ours"]) != len(fed["plain"]):
        raise AssertionError(f"the two loops were fed different batches: {digests}")
    ratios = [ours / plain for ours, plain in zip(samples["ours"], samples["plain"], strict=True)]
    return {
        "model": label,
        "steps_per_trial": steps,
        "batch_size": batch_size,
        "trials": trials,
        "first_arm_per_trial": orders,
        "batches_fed_each": len(fed["ours"]),
        "batches_sha256": digests["ours"],
        "ours_samples_per_second": spread(samples["ours"]),
        "plain_samples_per_second": spread(samples["plain"]),
        "ratio": spread(ratios),
        "per_trial": {"ours": samples["ours"], "plain": samples["plain"], "ratio": ratios},
    }
