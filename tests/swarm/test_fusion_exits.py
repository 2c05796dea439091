"""Every exit of BodyFusion.fuse, on a scripted averager: the decision logic without processes.

The multi-process tests (test_peer.py, test_auth.py) prove the same exits with real hivemind; this
file pins down each decision on its own, fast, including the ones a real swarm reaches rarely.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp

import pytest
import torch

from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.merge.rules import FusionRule
from coldfusion_p2p.swarm.fusion import BodyFusion, update_norm
from coldfusion_p2p.swarm.records import Verdict

START = [torch.zeros(4, 3), torch.zeros(5)]
OWN_ID, OTHER_ID = "QmOwn", "QmOther"


class ScriptedPeerId:
    def __init__(self, name: str):
        self.name = name

    def to_base58(self) -> str:
        return self.name


class ScriptedControl:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def result(self, timeout=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class ScriptedAverager:
    """Stands in for FusedBodyAverager: ``step`` "all-reduces" to a scripted average and group."""

    def __init__(self, average, others: dict | BaseException):
        self.average, self.others = average, others
        self.buffers = [tensor.clone() for tensor in START]
        self.bytes_sent = mp.Value(ctypes.c_uint64, 0)
        self.peer_id = ScriptedPeerId(OWN_ID)
        self.sent_info = None

    def last_fused_body(self):
        return START

    def last_fused_state(self):
        return []

    def set_round_group(self, bits, group_size):
        self.group = (bits, group_size)

    @contextlib.contextmanager
    def get_tensors(self):
        yield self.buffers

    def step(self, gather, **kwargs):
        self.sent_info = gather
        if self.others is None or isinstance(self.others, BaseException):  # no group / matchmaking failed
            self.control = ScriptedControl(self.others)
            return self.control
        self.sent = [buffer.clone() for buffer in self.buffers]  # what this member contributed
        for buffer, value in zip(self.buffers, self.average, strict=True):
            buffer.copy_(value)
        self.bytes_sent.value += 1000
        members = {ScriptedPeerId(OWN_ID): gather}
        members.update({ScriptedPeerId(peer): info for peer, info in self.others.items()})
        self.control = ScriptedControl(members)
        return self.control


class ScriptedBoard:
    def __init__(self, verdict_of_other: bool | None, failed_stores: int = 0, other_retries: bool = False):
        self.verdict_of_other, self.published, self.failed_stores = verdict_of_other, [], failed_stores
        self.other_retries = other_retries  # the other member's refusal says it looks again

    def publish_verdict(self, verdict, ttl):
        """The DHT refuses the first ``failed_stores`` stores (a loaded DHT), then takes them."""
        self.published.append(verdict)
        self.failed_stores -= 1
        return self.failed_stores < 0

    def fetch_verdicts(self, round_number):
        if self.verdict_of_other is None:
            return []
        ok, nonce = self.verdict_of_other, self.other_nonce
        return [Verdict(peer_id=OTHER_ID, round=round_number, nonce=nonce, ok=ok, time=0.0, retry=self.other_retries)]


def trained_body(scale: float = 0.01) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [scale * torch.randn(tensor.shape, generator=generator) for tensor in START]


def other_member(body, **overrides) -> dict:
    info = {
        "round": 1,
        "nonce": "othernonce",
        "update_norm": update_norm(body, START),
        "aggregation": "mean",
        "fusion_rule": FusionRule().signature(),
        "update_bound": 1.0,
    }
    return {**info, **overrides}


def run_fusion(
    average, others, verdict_of_other=True, body=None, original=None, failed_stores=0, other_retries=False, **config
):
    body = body if body is not None else trained_body()
    board = ScriptedBoard(verdict_of_other, failed_stores, other_retries)
    board.other_nonce = others.get(OTHER_ID, {}).get("nonce", "") if isinstance(others, dict) else ""
    averager = ScriptedAverager(average, others)
    settings = dict(matchmaking_time=0.2, request_timeout=0.1, allreduce_timeout=0.5, **config)
    config = FusionConfig(**settings)
    fusion = BodyFusion(None, body, prefix="test", config=config, board=board, averager=averager, original=original)
    kept = [tensor.clone() for tensor in body]
    result = fusion.fuse(body, round_number=1, scheduled_time=0.0, weight=1.0, info={"round": 1, "update_bound": 1.0})
    return result, body, kept, board, averager


def assert_kept(body, kept):
    assert all(torch.equal(now, before) for now, before in zip(body, kept, strict=True)), "the body changed"


def test_a_complete_confirmed_all_reduce_is_applied():
    own, other = trained_body(), trained_body(0.02)
    average = [(a + b) / 2 for a, b in zip(own, other, strict=True)]
    result, body, _, board, _ = run_fusion(average, {OTHER_ID: other_member(other)}, body=own)
    assert result.fused and result.group_size == 2 and result.peer_ids == (OTHER_ID, OWN_ID)
    assert result.bytes_sent == 1000
    assert all(torch.equal(now, mean) for now, mean in zip(body, average, strict=True))
    assert [verdict.ok for verdict in board.published] == [True]


def test_a_verdict_the_dht_did_not_take_is_published_again_while_waiting_for_the_others():
    """Without our verdict every other member rolls back; a store refused under load must not decide that."""
    own, other = trained_body(), trained_body(0.02)
    average = [(a + b) / 2 for a, b in zip(own, other, strict=True)]
    result, _, _, board, _ = run_fusion(average, {OTHER_ID: other_member(other)}, body=own, failed_stores=2)
    assert result.fused
    assert [verdict.ok for verdict in board.published] == [True] * 3, "tried until the DHT took it, then no more"
    assert len({verdict.nonce for verdict in board.published}) == 1, "the same attempt's verdict each time"
    # ... and one the DHT never takes rolls us back with the others (who never saw it), though they confirmed
    result, body, kept, _, _ = run_fusion(average, {OTHER_ID: other_member(other)}, body=own, failed_stores=10**6)
    assert not result.fused and "never took our verdict" in result.reason, result.reason
    assert_kept(body, kept)


def test_with_lossy_compression_members_send_their_drift_from_the_original_and_fuse_to_the_mean_body():
    original = [torch.full(tensor.shape, 3.0) for tensor in START]  # weights far from the codec's zero
    own = [base + update for base, update in zip(original, trained_body(), strict=True)]
    other = [base + update for base, update in zip(original, trained_body(0.02), strict=True)]
    mean_drift = [((a - o) + (b - o)) / 2 for a, b, o in zip(own, other, original, strict=True)]
    member = other_member(other, contribution="drift")
    drift = [mine - base for mine, base in zip(own, original, strict=True)]
    means = [(a + b) / 2 for a, b in zip(own, other, strict=True)]
    result, body, _, _, averager = run_fusion(
        mean_drift, {OTHER_ID: member}, body=own, original=original, compression="int8"
    )
    assert averager.sent_info["contribution"] == "drift"
    assert all(torch.allclose(sent, mine) for sent, mine in zip(averager.sent, drift, strict=True))
    assert result.fused
    assert all(torch.allclose(now, mean, atol=1e-6) for now, mean in zip(body, means, strict=True))
    with pytest.raises(ValueError, match="lossy compression need the original body"):
        run_fusion(mean_drift, {OTHER_ID: member}, compression="fp16")


def test_a_failed_matchmaking_keeps_the_body_and_says_why():
    result, body, kept, board, averager = run_fusion(None, RuntimeError("could not find a group: timed out"))
    assert not result.fused and not result.rejected and "timed out" in result.reason
    assert averager.control.cancelled
    assert_kept(body, kept)
    assert [(verdict.ok, verdict.retry) for verdict in board.published] == [(False, True)], "we look again"
    assert result.retryable, "our verdict rolls every member back: the peer may look for its group again"


def test_no_group_keeps_the_body():
    result, body, kept, _, _ = run_fusion(None, None)
    assert not result.fused and result.reason == "no group formed" and result.retryable
    assert_kept(body, kept)


@pytest.mark.parametrize(
    "override, words",
    [
        ({"round": 2}, "disagreed on the round"),
        ({"aggregation": "ties"}, "mixed aggregation rules"),
        ({"fusion_rule": FusionRule(outer_lr=0.5).signature()}, "mixed fusion rules"),
    ],
)
def test_a_mismatched_group_does_not_fuse(override, words):
    other = trained_body(0.02)
    result, body, kept, _, _ = run_fusion(other, {OTHER_ID: other_member(other, **override)})
    assert not result.fused and words in result.reason and not result.retryable, "a group that cannot agree"
    assert_kept(body, kept)


def test_a_nan_average_is_rejected():
    other = trained_body(0.02)
    average = [torch.full_like(tensor, float("nan")) for tensor in START]
    result, body, kept, board, _ = run_fusion(average, {OTHER_ID: other_member(other)})
    assert result.rejected and not result.fused and "NaN" in result.reason and not result.retryable
    assert_kept(body, kept)
    assert [(verdict.ok, verdict.retry) for verdict in board.published] == [(False, False)], "nobody looks again"


def test_a_poisoned_average_is_rejected():
    other = trained_body(0.02)
    average = [1000.0 * tensor for tensor in other]  # far beyond every member's reported update
    result, body, kept, _, _ = run_fusion(average, {OTHER_ID: other_member(other)})
    assert result.rejected and "poisoned" in result.reason
    assert_kept(body, kept)


@pytest.mark.parametrize("other_retries", [False, True])
def test_a_member_reporting_an_incomplete_all_reduce_rolls_everyone_back(other_retries):
    other = trained_body(0.02)
    result, body, kept, board, _ = run_fusion(
        other, {OTHER_ID: other_member(other)}, verdict_of_other=False, other_retries=other_retries
    )
    assert not result.fused and "incomplete for 1 group member" in result.reason
    # refused by a member that looks again (its transport lost the attempt), we look again with it;
    # refused for any other reason (a rejected average, a mismatch), looking again would meet the same
    assert result.retryable == other_retries
    assert_kept(body, kept)
    assert [verdict.ok for verdict in board.published] == [True], "we confirmed our own view first"


def test_a_member_that_never_confirms_rolls_back_after_the_timeout():
    other = trained_body(0.02)
    result, body, kept, _, _ = run_fusion(other, {OTHER_ID: other_member(other)}, verdict_of_other=None)
    assert not result.fused and "never confirmed" in result.reason
    assert_kept(body, kept)
