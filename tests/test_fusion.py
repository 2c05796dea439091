"""Pure helpers of the fusion round (the round itself runs in the multi-process tests of test_peer.py)."""

from __future__ import annotations

import math

import torch

from coldfusion_p2p.fusion import count_sketch, sketch_distance, update_norm


def bodies(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=generator) for shape in ((300, 40), (40,), (7, 7, 7))]


def test_sketch_distances_estimate_body_distances():
    start = bodies(0)
    for seed in range(1, 6):
        other = [a + b for a, b in zip(start, bodies(seed, scale=0.01), strict=True)]
        true = update_norm(other, start)
        estimate = sketch_distance(count_sketch(start), count_sketch(other))
        assert abs(estimate - true) < 0.3 * true, (estimate, true)


def test_equal_bodies_have_equal_sketches_and_bad_sketches_give_nan():
    assert count_sketch(bodies(0)) == count_sketch([tensor.clone() for tensor in bodies(0)])
    assert sketch_distance(count_sketch(bodies(0)), count_sketch(bodies(0))) == 0.0
    own = count_sketch(bodies(0))
    assert math.isnan(sketch_distance(own, None))
    assert math.isnan(sketch_distance(own, ["x"] * len(own)))
    assert math.isnan(sketch_distance(own, own[:10]))
