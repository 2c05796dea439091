"""The hivemind adapter's compressions: what a peer sends and what its partners decode."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import Uniform8BitQuantization, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType

from coldfusion_p2p.contributor.checkpoints import load_body_state
from coldfusion_p2p.contributor.model import body_parameters, body_state_names, load_classifier
from coldfusion_p2p.swarm.hivemind_adapter import COMPRESSIONS, Uniform8Bit

from conftest import pre_fusion, round_dir

APART_FRACTION = 0.5  # measured: 0.27 x the largest drift with drifts; 3.7 x with weights (sabotaged: no centering)

pytestmark = pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")


def test_int8_parts_are_a_quarter_of_fp32_and_decode_through_hiveminds_own_deserializer():
    generator = torch.Generator().manual_seed(0)
    tensor = 0.04 * torch.randn(4096, 64, generator=generator)
    serialized = serialize_torch_tensor(tensor, CompressionType.UNIFORM_8BIT)
    assert serialized.ByteSize() <= 0.26 * tensor.numel() * 4
    decoded = deserialize_torch_tensor(serialized)  # what a partner does with our part: hivemind's registry
    assert decoded.shape == tensor.shape and decoded.dtype == tensor.dtype
    inside = tensor.abs() < 2.5 * tensor.std()  # the 6-sigma-wide codebook: buckets of 6 sigma / 256
    bucket = 6 * float(tensor.std()) / 256
    assert float((decoded - tensor)[inside].abs().max()) <= bucket
    assert COMPRESSIONS["int8"]().compression_type == CompressionType.UNIFORM_8BIT


def test_our_int8_quantize_makes_hiveminds_indices_and_keeps_a_parts_mean_when_serialized_in_place():
    """hivemind serializes a reducer's results with allow_inplace, where its own quantize builds the
    codebook from centered values: every decoded part lost its mean. Ours: the same indices, no loss."""
    generator = torch.Generator().manual_seed(0)
    part = 0.04 * torch.randn(4096, generator=generator) + 0.1  # a delta part with a mean of 0.1
    theirs_indices, theirs_codebook = Uniform8BitQuantization().quantize(part.clone())
    ours_indices, ours_codebook = Uniform8Bit().quantize(part.clone())
    assert (ours_indices == theirs_indices).all() and (ours_codebook == theirs_codebook).all()
    bucket = 6 * float(part.std()) / 256
    for decode in (Uniform8Bit().extract, deserialize_torch_tensor):
        decoded = decode(serialize_torch_tensor(part.clone(), CompressionType.UNIFORM_8BIT, allow_inplace=True))
        assert abs(float((decoded - part).mean())) < bucket / 10, "the part's mean was lost"
    in_place_indices, in_place_codebook = Uniform8BitQuantization().quantize(part.clone(), allow_inplace=True)
    lost = torch.as_tensor(in_place_codebook)[torch.as_tensor(in_place_indices).long()] - part
    assert float(lost.mean()) == pytest.approx(-0.1, abs=0.01)  # what hivemind's own would have sent
    assert Uniform8Bit().quantize(torch.zeros(8))[0].tolist() == [128] * 8  # a constant part: no division by 0
    nan_indices, nan_codebook = Uniform8Bit().quantize(torch.tensor([1.0, float("nan"), 2.0]))
    assert torch.isnan(torch.as_tensor(nan_codebook)[torch.as_tensor(nan_indices).long()]).all()  # the guard sees it


@pytest.mark.swarm
def test_two_peers_fuse_with_int8_near_the_exact_mean_for_a_quarter_of_the_bytes(
    local_swarm, tiny_model_dir, tiny_datasets
):
    settings = dict(rounds=1, min_group_size=2, save_local_body=True, refit_steps=0, compression="int8")
    peers = [local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)]
    local_swarm.wait_all()
    bodies = [pre_fusion(peer, 1, "body") for peer in peers]
    model = load_classifier(str(tiny_model_dir), ["negative", "positive"], seed=0)
    original = dict(zip(body_state_names(model), body_parameters(model), strict=True))  # --model's body
    mean = {name: (bodies[0][name] + bodies[1][name]) / 2 for name in bodies[0]}
    payload = sum(tensor.numel() * 4 for tensor in mean.values())
    update = max(float((bodies[0][name] - bodies[1][name]).abs().max()) for name in mean)
    assert update > 1e-3, "the peers trained alike: nothing to average"
    fused_bodies = []
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 2, report
        fused = load_body_state(round_dir(peer, 1))
        fused_bodies.append(fused)
        # 8 bits per value: within a few codebook buckets of the exact mean, never the own body
        error = torch.cat([(fused[name] - mean[name]).abs().reshape(-1) for name in mean])
        assert float(error.median()) < 0.01 * update, (peer.name, float(error.median()), update)
    # the codec encodes drifts from the original, not weights, so its error scales with the drift:
    # both peers end on (nearly) one base, every value within a small fraction of the largest drift
    drift = max(float((bodies[0][name] - original[name]).abs().max()) for name in mean)
    apart = max(float((fused_bodies[0][name] - fused_bodies[1][name]).abs().max()) for name in mean)
    print(f"int8: the peers' bases are at most {apart:.2e} apart; largest drift {drift:.2e}, update {update:.2e}")
    assert apart < APART_FRACTION * drift, (apart, drift)
    # each part carries one byte per value plus its codebook (8 + 256 x 4 bytes); this tiny model's many
    # small tensors make the codebooks weigh (on MiniLM they are under 1% of the bytes). Both peers
    # send each part once: as a sender or, averaged, as its reducer
    int8_body = sum(tensor.numel() + 8 + 1024 for tensor in mean.values())
    sent = sum(peer.round_info(1)["report"]["bytes_sent"] for peer in peers)
    assert 2 * int8_body <= sent <= 2 * int8_body * 1.05 + 8192, (sent, int8_body, payload)
    assert sent < 0.8 * 2 * payload, "no cheaper than fp32"


def test_only_clients_that_asked_for_streamed_results_get_them():
    from types import SimpleNamespace

    from hivemind.p2p import PeerID
    from hivemind.utils.serializer import MSGPackSerializer as Serializer

    from coldfusion_p2p.swarm.hivemind_adapter import streamed_clients

    peers = [PeerID(bytes([index]) * 34) for index in range(4)]
    infos = [{"client_results": "streamed"}, {"client_results": "after_sending"}, {}, {"client_results": "streamed"}]
    gathered = [Serializer.dumps([1.0, 1, Serializer.dumps(info)]) for info in infos]
    gathered[3] = b"not msgpack"  # a malformed entry: that peer keeps hivemind's default (delayed)
    group = SimpleNamespace(peer_ids=tuple(peers), gathered=tuple(gathered))
    assert streamed_clients(Serializer, group) == frozenset({peers[0]})


def test_a_reducer_reads_a_senders_parts_ahead_of_writing_its_results_and_averages_them_exactly():
    """A client on a home line sends and receives on one link: the reducer must not read its next
    part only once the client took the last result (each side would wait on the other)."""
    import asyncio
    from types import SimpleNamespace

    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from coldfusion_p2p.swarm.hivemind_adapter import RESULT_BUFFER_PARTS, ClientStreamingRunner, FusedBodyAverager

    parts, part_values = 3 * RESULT_BUFFER_PARTS, 256
    generator = torch.Generator().manual_seed(0)
    ours, theirs = (torch.randn(parts * part_values, generator=generator) for _ in range(2))
    reducer, client = PeerID(b"\x01" * 34), PeerID(b"\x02" * 34)

    async def scenario():
        runner = ClientStreamingRunner(
            p2p=SimpleNamespace(peer_id=reducer),
            servicer_type=FusedBodyAverager,
            prefix="test",
            group_id=b"group",
            tensors=[ours.clone()],
            ordered_peer_ids=(reducer, client),
            peer_fractions=(1.0, 0.0),  # the client reduces nothing, as behind NAT
            part_size_bytes=part_values * 4,
        )
        local = asyncio.create_task(runner._communicate_with_peer(reducer))  # our own parts, no network
        read = []

        async def client_parts():
            for index, part in enumerate(theirs.split(part_values)):
                read.append(index)
                yield averaging_pb2.AveragingData(tensor_part=serialize_torch_tensor(part), weight=1.0)

        results = runner._accumulate_parts_streaming(client_parts(), sender_index=1)
        deltas = [deserialize_torch_tensor((await anext(results)).tensor_part)]
        await asyncio.sleep(0.5)  # the client is not reading: how far does the reducer read meanwhile?
        read_ahead = len(read)
        deltas += [deserialize_torch_tensor(message.tensor_part) async for message in results]
        await local
        return read_ahead, torch.cat(deltas)

    read_ahead, deltas = asyncio.run(scenario())
    assert read_ahead >= RESULT_BUFFER_PARTS, read_ahead  # hivemind's own loop reads 2-3 parts ahead
    assert torch.allclose(theirs + deltas, (ours + theirs) / 2, atol=1e-6)  # the client's part, averaged
