"""Pure helpers of the fusion round (the round itself runs in the multi-process tests of test_peer.py)."""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import sys

import torch
from hivemind.averaging import allreduce as allreduce_module
from hivemind.compression import Float16Compression, NoCompression
from hivemind.compression.base import CompressionInfo
from hivemind.proto.runtime_pb2 import CompressionType

from coldfusion_p2p.swarm.fusion import count_sketch, sketch_distance, update_norm
from coldfusion_p2p.swarm.hivemind_adapter import CountingCompression, count_reducer_bytes


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


def test_counting_compression_counts_every_serialized_part_and_changes_nothing():
    counter = mp.Value(ctypes.c_uint64, 0)
    parts = [torch.randn(1000), torch.randn(30, 7)]
    payload = sum(part.numel() * part.element_size() for part in parts)
    for inner, bytes_per_value in ((NoCompression(), 4), (Float16Compression(), 2)):
        counter.value = 0
        counting = CountingCompression(inner, counter)
        assert counting.compression_type == inner.compression_type
        serialized = [counting.compress(part, CompressionInfo.from_tensor(part)) for part in parts]
        assert counter.value == sum(message.ByteSize() for message in serialized)
        raw = payload * bytes_per_value // 4
        assert raw <= counter.value <= raw + 200  # the tensors' bytes plus a few bytes of protobuf header
        for part, message in zip(parts, serialized, strict=True):
            assert torch.allclose(counting.extract(message), part, atol=1e-2)


def test_reducer_bytes_are_counted_where_the_all_reduce_serializes_averaged_parts(monkeypatch):
    home = sys.modules[count_reducer_bytes.__module__]  # wherever the counter lives now
    monkeypatch.setattr(home, "_reducer_counter", [None])
    monkeypatch.setattr(allreduce_module, "serialize_torch_tensor", allreduce_module.serialize_torch_tensor)
    counter = mp.Value(ctypes.c_uint64, 0)
    count_reducer_bytes(counter)
    count_reducer_bytes(counter)  # idempotent: a second averager in the process must not count twice
    part = torch.randn(2500)
    message = allreduce_module.serialize_torch_tensor(part, CompressionType.NONE)
    assert counter.value == message.ByteSize() >= part.numel() * 4
