"""The reducer's aggregation rules, on hivemind's real TensorPartReducer protocol (no network)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

from coldfusion_p2p.merge.aggregation import (
    ClippedMeanReducer,
    ReferenceReducer,
    clipped_mean,
    reference_parts,
    ties_merge,
    trim_update,
)
from coldfusion_p2p.swarm.faults import SCALE_UPDATE_ENV

from conftest import attack_drift


def honest_updates(count: int, size: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) for _ in range(count)]


def test_clipped_mean_equals_the_mean_when_nobody_stands_out():
    updates = [torch.full((10,), 1.0), torch.full((10,), -1.0), torch.full((10,), 2.0)]
    assert torch.allclose(clipped_mean(updates, [1.0, 1.0, 1.0], clip_ratio=2.0), torch.full((10,), 2.0 / 3.0))


def test_one_attacker_among_four_moves_the_clipped_mean_no_more_than_an_honest_peer():
    honest = honest_updates(3)
    attacker = 100.0 * honest_updates(1, seed=7)[0]
    honest_mean = torch.stack(honest).mean(0)
    plain = torch.stack([*honest, attacker]).mean(0)
    robust = clipped_mean([*honest, attacker], [1.0] * 4, clip_ratio=2.0)
    typical = float(torch.stack(honest).norm(dim=1).median())
    assert (plain - honest_mean).norm() > 20 * typical  # the mean follows the attacker
    # the clipped attacker weighs at most clip_ratio honest norms, shared among 4 members
    assert (robust - honest_mean).norm() <= (2.0 + 1.0) / 4 * typical + 1e-4


def test_a_forged_weight_is_capped_at_the_median_weight():
    updates = [-torch.ones(4), -torch.ones(4), torch.ones(4)]  # equal norms: no clipping, weights only
    result = clipped_mean(updates, [1.0, 1.0, 1e9], clip_ratio=2.0)
    assert torch.allclose(result, torch.full((4,), -1.0 / 3.0))


async def reduce_all(reducer: TensorPartReducer, contributions: list[list[torch.Tensor]], weights: list[float]):
    """Every sender sends every part, as hivemind's all-reduce does; returns the averaged parts."""

    async def send(sender: int) -> list[torch.Tensor]:
        return [
            await reducer.accumulate_part(sender, index, part, weight=weights[sender])
            for index, part in enumerate(contributions[sender])
        ]

    results = await asyncio.wait_for(asyncio.gather(*(send(sender) for sender in range(len(contributions)))), 10)
    return results[0]


def test_the_clipped_reducer_runs_on_hiveminds_protocol_and_matches_the_pure_rule():
    reference = [torch.linspace(-1, 1, 300), torch.ones(200)]
    shapes = [part.shape for part in reference]
    senders = [[part + update[: part.numel()] for part in reference] for update in honest_updates(3, size=300)]
    senders.append([part + 50 * torch.ones_like(part) for part in reference])  # the attacker
    weights = [1.0, 2.0, 1.0, 1.0]

    async def run():
        plain = await reduce_all(TensorPartReducer(shapes, 4), senders, weights)
        clipped = await reduce_all(ClippedMeanReducer(shapes, 4, reference, clip_ratio=2.0), senders, weights)
        return plain, clipped

    plain, clipped = asyncio.run(run())
    for index, base in enumerate(reference):
        updates = [sender[index] - base for sender in senders]
        expected = base + clipped_mean(updates, weights, clip_ratio=2.0)
        assert torch.allclose(clipped[index], expected, atol=1e-6)
        weighted = sum(w * sender[index] for w, sender in zip(weights, senders, strict=True)) / sum(weights)
        assert torch.allclose(plain[index], weighted, atol=1e-5)
        assert (clipped[index] - base).abs().max() < 5 < (plain[index] - base).abs().max()


def test_trim_keeps_the_largest_magnitudes_only():
    update = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 0.0, 1.0, -0.05, 0.3, 4.0])
    assert torch.equal(trim_update(update, 0.3), torch.tensor([0, -3.0, 0, 2.0, 0, 0, 0, 0, 0, 4.0]))
    assert torch.equal(trim_update(update, 1.0), update)
    assert int((trim_update(update, 0.01) != 0).sum()) == 1  # at least one entry survives
    assert trim_update(update.reshape(2, 5), 0.3).shape == (2, 5)


def test_ties_elects_a_sign_and_averages_only_the_agreeing_updates():
    updates = [
        torch.tensor([1.0, -2.0, 0.0, 3.0]),
        torch.tensor([3.0, 1.0, 0.0, -1.0]),
        torch.tensor([-1.0, 0.0, 0.0, -1.0]),
    ]
    merged = ties_merge(updates, [1.0, 1.0, 1.0])
    # coordinate 0: sum +3 -> mean of 1 and 3; 1: sum -1 -> only -2; 2: nobody; 3: sum +1 -> only 3
    assert torch.allclose(merged, torch.tensor([2.0, -2.0, 0.0, 3.0]))
    weighted = ties_merge(updates, [1.0, 5.0, 1.0])  # the heavy member's signs win
    assert torch.allclose(weighted, torch.tensor([(1 + 15) / 6, 1.0, 0.0, -6.0 / 6]))
    assert torch.allclose(ties_merge([updates[0]], [2.0]), updates[0])


def test_the_ties_reducer_on_hiveminds_protocol_equals_ties_on_whole_tensors():
    """Parts are cut anywhere; elect and disjoint mean are per coordinate, so the result is the same."""
    reference = [torch.linspace(-1, 1, 300), torch.ones(200)]
    shapes = [part.shape for part in reference]
    updates = [
        [
            trim_update(torch.randn(part.shape, generator=torch.Generator().manual_seed(7 * s + i)), 0.3)
            for i, part in enumerate(reference)
        ]
        for s in range(3)
    ]
    senders = [[base + update for base, update in zip(reference, sender, strict=True)] for sender in updates]
    weights = [1.0, 2.0, 1.0]

    async def run():  # the reducer's futures belong to the loop it is made in
        return await reduce_all(ReferenceReducer(shapes, 3, reference, ties_merge), senders, weights)

    merged = asyncio.run(run())
    for index, base in enumerate(reference):
        expected = base + ties_merge([sender[index] for sender in updates], weights)
        assert torch.allclose(merged[index], expected, atol=1e-6)


def test_reference_parts_are_split_exactly_like_the_averaged_tensors():
    tensors = [torch.randn(70_000), torch.randn(33, 17), torch.randn(5)]
    fractions = (0.5, 0.3, 0.2)
    container = TensorPartContainer(tensors, fractions, part_size_bytes=2**14)
    for index in range(len(fractions)):
        own = TensorPartContainer(tensors, fractions, part_size_bytes=2**14).get_raw_input_parts(index)
        twin = reference_parts([tensor * 2 for tensor in tensors], container, index)
        assert [part.shape for part in twin] == [part.shape for part in own]
        assert all(torch.equal(a, 2 * b) for a, b in zip(twin, own, strict=True))


def test_a_reducer_refuses_reference_parts_of_another_shape():
    async def build():  # reducers live in the averager's event loop
        ClippedMeanReducer([torch.Size([4])], 2, [torch.zeros(5)], clip_ratio=2.0)

    with pytest.raises(ValueError, match="reference parts"):
        asyncio.run(build())


@pytest.mark.swarm
def test_clipped_mean_keeps_one_100x_attacker_among_four_from_moving_the_base(
    local_swarm, tiny_model_dir, tiny_datasets
):
    """Real peers: three honest ones and one that sends 100x its update, all with --aggregation clipped_mean."""
    settings = dict(rounds=1, min_group_size=4, save_local_body=True, aggregation="clipped_mean", keep_checkpoints=5)
    honest = [
        local_swarm.start_peer(f"honest{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in range(3)
    ]
    poison = {SCALE_UPDATE_ENV: "100"}
    attacker = local_swarm.start_peer("attacker", tiny_datasets[0], tiny_model_dir, poison, seed=3, **settings)
    local_swarm.wait_all()

    drift = attack_drift(tiny_model_dir, honest, attacker, scale=100)
    for peer in honest:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 4, report
    plain_drift, clipped_drift = drift.plain, drift.fused
    assert plain_drift > 10  # what plain averaging would have fused (the poisoning guard rejects it)
    # clipped: the attacker weighs at most clip_ratio (2) honest updates, shared among 4 members
    assert clipped_drift < 1.0
    assert drift.learned > 0.5  # the base still moved with the honest peers
