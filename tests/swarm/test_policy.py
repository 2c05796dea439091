"""The peer's decisions, without a network."""

from __future__ import annotations

import pytest

from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.records import PeerRecord


def record(status="training", round=1, fused_round=0, fuse_at=None, group=0) -> PeerRecord:
    return PeerRecord(
        peer_id="Qm",
        dataset_name="d",
        num_examples=10,
        status=status,
        round=round,
        fused_round=fused_round,
        step=0,
        total_steps=1,
        fuse_at=fuse_at,
        last_group_size=group,
        time=0.0,
    )


def test_group_bits_separate_rounds_and_have_fixed_width():
    assert policy.group_bits(1) != policy.group_bits(2)
    assert len(policy.group_bits(0)) == len(policy.group_bits(65535)) == policy.GROUP_BITS
    assert set(policy.group_bits(12345)) <= {"0", "1"}


def test_fusion_time_is_the_earliest_proposal_of_ready_peers_in_that_round():
    records = [
        record("ready", 3, fuse_at=110.0),
        record("ready", 3, fuse_at=105.0),
        record("ready", 2, fuse_at=50.0),  # another round
        record("training", 3, fuse_at=90.0),  # not ready: its old proposal does not count
    ]
    assert policy.fusion_time(records, 3) == 105.0
    assert policy.fusion_time(records, 4) is None


def test_window_closes_early_only_when_every_peer_of_the_round_is_ready():
    assert policy.everyone_ready([record("ready"), record("fusing")], 1)
    assert not policy.everyone_ready([record("ready"), record("training")], 1)
    assert not policy.everyone_ready([record("ready"), record("starting")], 1)
    assert policy.everyone_ready([record("ready"), record("training", round=2)], 1)
    assert not policy.everyone_ready([record("ready", round=3), record("downloading", round=2)], 3), "about to join"
    assert policy.everyone_ready([record("ready", round=3), record("downloading", round=4)], 3)


def test_the_group_size_is_known_only_when_the_whole_swarm_is_ready():
    three = [record("ready"), record("fusing"), record("ready")]
    assert policy.complete_group_size(three, 1) == 3
    assert policy.complete_group_size([*three, record("training", round=2)], 1) == 3, "another round's peer"
    assert policy.complete_group_size([*three, record("training")], 1) is None, "one still trains"
    assert policy.complete_group_size([*three, record("downloading", round=0)], 1) is None, "one is about to join"
    assert policy.complete_group_size(three, 1, min_group_size=4) is None


def test_a_rounds_members_are_the_earliest_proposals_list_or_else_the_ready_peers():
    def peer(name, status="ready", round=1, fuse_at=None, members=None):
        return record(status, round=round, fuse_at=fuse_at).copy(update={"peer_id": name, "fuse_members": members})

    view = [peer("c"), peer("a", status="fusing"), peer("b", status="training"), peer("d", round=2)]
    assert policy.round_members(view, 1) == ["a", "c"], "no list published: the ready peers of round 1"
    listed = [*view, peer("e", fuse_at=9.0, members=["a", "e"]), peer("f", fuse_at=8.0, members=["a", "c", "f"])]
    assert policy.round_members(listed, 1) == ["a", "c", "f"], "the earliest proposal's list"
    moved_on = peer("c", status="idle", round=2)
    assert policy.newest_for_round(peer("c"), moved_on, 1).round == 1, "a record that left the round keeps it"
    assert policy.newest_for_round(peer("c"), peer("c", status="fusing"), 1).status == "fusing"


def test_partners_are_live_peers_of_the_same_round():
    assert not policy.has_partners([], 1)
    assert not policy.has_partners([record("stopped")], 1)
    assert not policy.has_partners([record("training", round=2)], 1)
    assert policy.has_partners([record("starting")], 1)


def test_a_peer_behind_the_swarm_missed_its_round():
    assert policy.missed_round(2, [record("idle", round=3, fused_round=2, group=2)])
    assert policy.missed_round(2, [record("training", round=4, fused_round=3, group=1)])  # moved past it
    assert not policy.missed_round(2, [record("training", round=2, fused_round=1, group=2)])


def test_a_partner_whose_own_fusion_failed_does_not_make_the_round_missed():
    """It moved on to the next round, but nobody fused this one: the others may still fuse it."""
    failed = record("training", round=3, fused_round=2, group=1)
    assert not policy.missed_round(2, [failed, record("ready", round=2, fused_round=1, group=2)])
    assert policy.swarm_fused_round([]) == 0


def test_after_a_failed_fusion_only_bases_fused_in_a_group_are_worth_downloading():
    others = [record("idle", round=4, fused_round=3, group=1), record("idle", round=4, fused_round=3, group=2)]
    assert policy.fused_without_us(others, 3) == 3
    assert policy.fused_without_us([record("idle", round=4, fused_round=3, group=1)], 3) is None
    assert policy.still_fusing([record("fusing", round=3)], 3)


def test_a_peer_goes_alone_only_once_no_partner_was_read_for_twice_a_records_life():
    assert not policy.partners_gone(5.0, record_ttl=3.0, min_group_size=2, now=100.0, scheduled=90.0), "a bad read"
    assert policy.partners_gone(6.5, record_ttl=3.0, min_group_size=2, now=100.0, scheduled=90.0)
    assert not policy.partners_gone(6.5, record_ttl=3.0, min_group_size=2, now=80.0, scheduled=90.0), "not yet"
    assert policy.partners_gone(float("inf"), record_ttl=3.0, min_group_size=1, now=80.0, scheduled=90.0)


def test_a_second_look_waits_for_first_attempts_and_partners_only_with_second_looks():
    """A lost attempt's members learn of the loss at different times (a client only when the reducers
    give up), so a peer looking again waits while another's first all-reduce runs, then meets only
    the peers that look again: the others' first proposals lie in the past and would start it at once."""
    first = record("fusing", round=3, fuse_at=10.0)
    second = record("ready", round=3, fuse_at=60.0).copy(update={"attempt": 1})
    assert policy.first_attempts_running([first, second], 3)
    assert not policy.first_attempts_running([second, record("fusing", round=2)], 3), "another round's"
    assert policy.first_attempts_running([record("ready", round=3)], 3), "its record not refreshed since"
    assert not policy.first_attempts_running([first.copy(update={"attempt": 1})], 3), "its second look"
    moved_on = record("idle", round=3).copy(update={"attempt": 1})  # e.g. fused its retry, next round not begun
    assert policy.looking_again([first, second, moved_on, record("ready", round=4)], 3) == [second]
    assert policy.fusion_time(policy.looking_again([first, second], 3), 3) == 60.0
    assert policy.second_look([first, second], 3, waited_out=False) == ("wait", 0), "first may look again"
    assert policy.second_look([first, second], 3, waited_out=True) == ("fuse", 2), "waited long enough: go"
    assert policy.second_look([second, second.copy(update={"peer_id": "b"})], 3, waited_out=False) == ("fuse", 3)
    assert policy.second_look([record("downloading", round=3)], 3, waited_out=False) == ("alone", 1), "gave up"
    assert policy.second_look([first], 3, waited_out=True) == ("alone", 1), "nobody else looks again"


def test_weights_and_stopping():
    assert policy.fusion_weight("uniform", 500) == 1.0
    assert policy.fusion_weight("examples", 500) == 500.0
    with pytest.raises(ValueError):
        policy.fusion_weight("median", 1)
    assert policy.rounds_done(3, 3) and not policy.rounds_done(2, 3) and not policy.rounds_done(10**6, None)


def test_an_all_reduce_is_applied_only_when_every_member_confirms_it():
    from coldfusion_p2p.swarm.records import Verdict

    def verdict(peer, ok=True, nonce=None):
        return Verdict(peer_id=peer, round=1, nonce=nonce or f"n-{peer}", ok=ok, time=0.0)

    members = {peer: {"nonce": f"n-{peer}"} for peer in ("me", "a", "b")}
    assert policy.group_decision("me", members, [verdict("a")]) is None, "b has not confirmed yet"
    assert policy.group_decision("me", members, [verdict("a"), verdict("b")]) == "apply"
    assert "incomplete" in policy.group_decision("me", members, [verdict("a"), verdict("b", ok=False)])
    stale = [verdict("a"), verdict("b", nonce="an-earlier-attempt")]
    assert policy.group_decision("me", members, stale) is None, "a verdict on another attempt does not count"
    # b's log also holds its verdict on its next stage: the one on this attempt still counts
    later_stage = [verdict("a"), verdict("b"), verdict("b", nonce="its-next-stage")]
    assert policy.group_decision("me", members, later_stage) == "apply"


def test_a_refused_attempt_is_looked_for_again_only_when_every_refuser_looks_again():
    from coldfusion_p2p.swarm.records import Verdict

    def verdict(peer, ok=True, retry=False, nonce=None):
        return Verdict(peer_id=peer, round=1, nonce=nonce or f"n-{peer}", ok=ok, time=0.0, retry=retry)

    members = {peer: {"nonce": f"n-{peer}"} for peer in ("me", "a", "b", "c")}
    lost = [verdict("a", ok=False, retry=True), verdict("b", ok=False, retry=True), verdict("c")]
    assert policy.refusers_look_again("me", members, lost)
    rejected = [verdict("a", ok=False, retry=True), verdict("b", ok=False), verdict("c")]
    assert not policy.refusers_look_again("me", members, rejected), "b rejected the average: it would again"
    assert not policy.refusers_look_again("me", members, [verdict("a"), verdict("b")]), "nobody refused"
    elsewhere = [verdict("a", ok=False, retry=True, nonce="another-attempt"), verdict("b", ok=False)]
    assert not policy.refusers_look_again("me", members, elsewhere), "a's refusal was of another attempt"


def test_a_fused_update_far_larger_than_the_typical_one_is_poisoned():
    honest = [1.0, 1.2, 0.9]
    assert not policy.poisoned_update(1.0, own_norm=1.0, member_norms=honest, max_ratio=10)
    assert not policy.poisoned_update(1.1, own_norm=0.01, member_norms=honest, max_ratio=10), "a tiny own update"
    assert policy.poisoned_update(25.0, own_norm=1.0, member_norms=[*honest, 100.0], max_ratio=10)
    assert policy.poisoned_update(float("nan"), own_norm=1.0, member_norms=honest, max_ratio=10)
    assert policy.poisoned_update(25.0, own_norm=1.0, member_norms=[float("nan")] * 4, max_ratio=10)


def test_in_a_pair_a_member_declaring_its_own_100x_update_does_not_vouch_for_it():
    """Stage groups of 2: the upper median of two norms is the attacker's own claim."""
    assert policy.poisoned_update(50.0, own_norm=1.0, member_norms=[1.0, 100.0], max_ratio=10)
    assert policy.poisoned_update(50.0, 1.0, [1.0, 100.0], 10, honest_bounds=[2.0, 1e9])
    assert not policy.poisoned_update(3.0, own_norm=1.0, member_norms=[1.0, 5.0], max_ratio=10), "honest, unequal"


def test_a_newcomer_among_converged_peers_is_not_poison_but_a_round_no_honest_peer_could_make_is():
    """Converged peers update by 0.01; a newcomer's honest update of 3 averages to 1 (100x theirs)."""
    converged = [0.01, 0.01, 3.0]
    assert policy.poisoned_update(1.0, own_norm=0.01, member_norms=converged, max_ratio=10)  # without the bound
    bound = policy.adam_update_bound(lr=1e-3, steps=20, num_values=100_000)  # 6.3
    assert not policy.poisoned_update(1.0, 0.01, converged, 10, honest_bounds=[bound] * 3)
    assert policy.poisoned_update(50.0, 0.01, converged, 10, honest_bounds=[bound] * 3)  # beyond any honest round
    assert policy.poisoned_update(50.0, 0.01, converged, 10, honest_bounds=[bound, bound, 1e9])  # one liar


def test_a_group_mixing_rounds_or_aggregation_rules_does_not_fuse():
    same = {"a": {"round": 3, "aggregation": "clipped_mean"}, "b": {"round": 3, "aggregation": "clipped_mean"}}
    assert policy.group_mismatch(same, 3, "clipped_mean") is None
    late = {"round": 2, "aggregation": "clipped_mean"}
    assert "round" in policy.group_mismatch({**same, "c": late}, 3, "clipped_mean")
    mixed = {**same, "c": {"round": 3}}  # an older peer sends no rule: the plain mean
    assert "clipped_mean, mean" in policy.group_mismatch(mixed, 3, "clipped_mean")
    assert policy.group_mismatch({"a": {"round": 1}}, 1, "mean") is None


def test_a_group_mixing_fusion_rules_does_not_fuse():
    momentum = "outer_lr=0.7,momentum=0.9,anchor=0"
    same = {peer: {"round": 2, "aggregation": "mean", "fusion_rule": momentum} for peer in "ab"}
    assert policy.group_mismatch(same, 2, "mean", momentum) is None
    mixed = {**same, "c": {"round": 2, "aggregation": "mean"}}  # an older peer sends no rule: the plain mean
    reason = policy.group_mismatch(mixed, 2, "mean", momentum)
    assert momentum in reason and policy.PLAIN_MEAN_RULE in reason and "--outer-momentum" in reason
    assert policy.group_mismatch({"a": {"round": 1}}, 1, "mean") is None, "the default rule is the plain mean"
    assert "fusion rules" in policy.group_mismatch({"a": {"round": 1, "fusion_rule": momentum}}, 1, "mean")


def test_lossy_compression_sends_drifts_and_a_group_mixing_drifts_with_bodies_does_not_fuse():
    assert policy.contribution_kind("none") == "body"
    assert policy.contribution_kind("fp16") == policy.contribution_kind("int8") == "drift"
    drifts = {peer: {"round": 1, "aggregation": "mean", "contribution": "drift"} for peer in "ab"}
    assert policy.group_mismatch(drifts, 1, "mean", contribution="drift") is None  # fp16 and int8 mix
    older = {**drifts, "c": {"round": 1, "aggregation": "mean"}}  # sends no kind: a body
    assert "--compression none with a lossy one" in policy.group_mismatch(older, 1, "mean", contribution="drift")
    assert "--compression" in policy.group_mismatch(drifts, 1, "mean")


def test_members_share_a_start_only_when_their_start_sketches_agree_up_to_rounding():
    base = [3.0, -4.0, 12.0]
    rounded = [value + 1e-7 for value in base]
    updates = [0.5, 0.6, 0.4]
    assert policy.same_start([base, rounded, base], updates)
    assert not policy.same_start([base, [3.0, -4.0, 12.3]], updates), "a start 0.3 away, updates of 0.5"
    assert not policy.same_start([base, None], updates), "a member that sent no sketch"
    assert not policy.same_start([base, base[:2]], updates)
    assert policy.same_start([base], [])


def test_a_gap_between_the_members_starts_is_not_taken_for_poison():
    honest = [0.01, 0.012, 0.011]  # a converged model: tiny updates
    # after a failed round every member kept its own body: the average also moves by the starts' gap
    assert policy.poisoned_update(0.5, own_norm=0.01, member_norms=honest, max_ratio=10)
    assert not policy.poisoned_update(0.5, own_norm=0.01, member_norms=honest, max_ratio=10, start_gaps=[0, 0.6, 0.7])
    # one liar claiming a far-away start does not widen the bound (median of the gaps)
    assert policy.poisoned_update(5.0, own_norm=0.01, member_norms=honest, max_ratio=10, start_gaps=[0, 0, 0, 1e6])
