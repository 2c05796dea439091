"""The peer end to end: real hivemind, each peer its own process on 127.0.0.1."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from coldfusion_p2p.config import build_config
from coldfusion_p2p.contributor.checkpoints import apply_body_state, latest_checkpoint, load_body_state, load_head
from coldfusion_p2p.contributor.learner import build_learner
from coldfusion_p2p.contributor.model import load_head_state
from coldfusion_p2p.swarm.faults import CRASH_IN_ALLREDUCE_ENV, LOSE_ATTEMPT_ENV, MISS_GROUP_ENV, SCALE_UPDATE_ENV
from coldfusion_p2p.swarm.presence import record_ttl

from conftest import FAST_SWARM_SETTINGS, pre_fusion, read_scalars, round_dir, wait_until

pytestmark = pytest.mark.swarm


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two bodies (over the names of ``b``)."""
    return sum(((a[name] - b[name]).double() ** 2).sum().item() for name in b) ** 0.5


def reevaluate(peer, round_number: int) -> tuple[float, float, int]:
    """(accuracy, loss, examples) of the saved model of ``round_number`` on the peer's own validation rows,
    rebuilt in this process from the configuration the checkpoint records."""
    folder = round_dir(peer, round_number)
    learner = build_learner(build_config(overrides=peer.round_info(round_number)["config"]))
    apply_body_state(learner.model, load_body_state(folder))
    load_head_state(learner.model, load_head(folder)[0])
    stats = learner.trainer.evaluate()
    return stats.accuracy, stats.loss, stats.examples


MATCHMAKING_TIME = 8.0  # long, to tell a group that starts once complete from one that waits it out


def test_three_peers_fuse_bodies_into_their_mean_and_keep_their_heads(local_swarm, tiny_model_dir, tiny_datasets):
    peers = [
        local_swarm.start_peer(
            f"peer{index}",
            dataset,
            tiny_model_dir,
            rounds=2,
            save_local_body=True,
            seed=index,
            keep_checkpoints=5,
            min_group_size=3,
            refit_steps=0,  # the head re-fit changes heads on purpose (see test_trainer.py); fusion must not
            matchmaking_time=MATCHMAKING_TIME,
        )
        for index, dataset in enumerate(tiny_datasets)
    ]
    local_swarm.wait_all()

    for round_number in (1, 2):
        infos = [peer.round_info(round_number) for peer in peers]
        peer_ids = {info["peer_id"] for info in infos}
        for info in infos:
            assert info["report"]["outcome"] == "fused", info["report"]
            assert info["report"]["group_size"] == 3
            assert set(info["report"]["peer_ids"]) == peer_ids
            # the whole swarm was ready, so its size was known: the all-reduce started once all 3
            # joined, not at the scheduled time MATCHMAKING_TIME after the window closed
            assert info["report"]["fusion_seconds"] < MATCHMAKING_TIME - 3.0, info["report"]

        bodies_before = [pre_fusion(peer, round_number, "body") for peer in peers]
        assert not torch.equal(*(next(iter(body.values())) for body in bodies_before[:2])), "peers trained alike"
        expected_mean = {name: torch.stack([body[name] for body in bodies_before]).mean(0) for name in bodies_before[0]}
        for peer in peers:
            fused = load_body_state(round_dir(peer, round_number))
            assert set(fused) == set(expected_mean)
            for name, tensor in expected_mean.items():
                assert torch.allclose(fused[name], tensor, atol=1e-6), (peer.name, round_number, name)

        heads_before = [pre_fusion(peer, round_number, "head") for peer in peers]
        heads_after = [load_file(round_dir(peer, round_number) / "head.safetensors") for peer in peers]
        for before, after in zip(heads_before, heads_after, strict=True):
            assert before.keys() == after.keys()
            assert all(torch.equal(before[name], after[name]) for name in before), "fusion touched a head"
        assert not torch.equal(heads_after[0]["classifier.weight"], heads_after[1]["classifier.weight"])

        # bytes sent: as a sender, (n-1)/n of the body to the other reducers; as a reducer, its averaged
        # n-th back to each of the n-1 others. Whatever the split, the group sends 2 (n-1) bodies in all.
        payload = sum(tensor.numel() * tensor.element_size() for tensor in bodies_before[0].values())
        sent = [info["report"]["bytes_sent"] for info in infos]
        group = len(peers)
        for peer, count in zip(peers, sent, strict=True):
            assert payload / group <= count <= 3 * payload, (peer.name, round_number, count, payload)
        assert 2 * (group - 1) * payload <= sum(sent) <= 2 * (group - 1) * payload * 1.05 + 65536, (sent, payload)
        print(f"round {round_number}: bytes sent {sent}, {sum(sent) / payload:.3f} bodies of {payload} bytes")

    # what round 2 reports as its accuracy after fusion is what its saved model really scores
    for peer in peers:
        report = peer.round_info(2)["report"]
        accuracy, loss, examples = reevaluate(peer, 2)
        assert 0 < examples <= FAST_SWARM_SETTINGS["max_eval_examples"]
        assert isinstance(report["accuracy_after"], float) and 0.0 <= report["accuracy_after"] <= 1.0, report
        # one example of slack: another torch thread count may flip an argmax on an exact tie
        assert abs(report["accuracy_after"] - accuracy) <= 1 / examples + 1e-9, (peer.name, report, accuracy)
        # the loss is continuous: it tells the saved model from the pre-fusion one even when the tiny
        # tasks leave both accuracies at the majority rate
        assert abs(report["validation_loss_after"] - loss) <= 1e-4 * max(1.0, loss), (peer.name, report, loss)


def test_late_joiner_starts_from_the_swarm_base_and_round(local_swarm, tiny_model_dir, tiny_datasets):
    # min_group_size 3: until the late joiner is there, every window stays open its whole 15 s, so on
    # a loaded machine the early two cannot finish all rounds before it has started up (7 x 15 s to do so)
    settings = dict(rounds=8, keep_checkpoints=20, local_steps=20, save_local_body=True, min_group_size=3)
    settings.update(fusion_window=15.0)  # round 1 waits it out for the absent third (not 60 s: a slow test)
    early = [local_swarm.start_peer(f"early{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)]
    wait_until(lambda: all(1 in peer.rounds_written() for peer in early), timeout=120, message="round 1 of early peers")
    late = local_swarm.start_peer("late", tiny_datasets[2], tiny_model_dir, seed=2, **settings)
    local_swarm.wait_all()

    late_rounds = late.rounds_written()
    first = late_rounds[0]
    assert first >= 1, "the late joiner must never checkpoint an unfused round 0"
    first_info = late.round_info(first)
    assert first_info["report"]["outcome"] == "synced", first_info["report"]
    swarm_body = load_body_state(round_dir(early[0], first))
    joined_body = load_body_state(round_dir(late, first))
    for name, tensor in swarm_body.items():
        assert torch.allclose(joined_body[name], tensor, atol=1e-6), name
    original = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.allclose(joined_body[name], original[name]) for name in joined_body if name in original)

    # its first fused round: a group of all three, and it started from the swarm's fused body of
    # the round before (what it downloaded, or fused after that), so the group's mean is exact
    later = {r: late.round_info(r)["report"] for r in late_rounds[1:]}
    fused = [r for r, report in later.items() if report["outcome"] == "fused"]
    assert fused, {r: report["outcome"] for r, report in later.items()}
    joined = fused[0]
    assert all(report["outcome"] == "synced" for r, report in later.items() if r < joined), later
    assert later[joined]["group_size"] == 3, later[joined]
    early_ids = {peer.round_info(joined)["peer_id"] for peer in early}
    assert early_ids < set(later[joined]["peer_ids"]), (early_ids, later[joined]["peer_ids"])
    start = load_body_state(round_dir(late, joined - 1))
    swarm_start = load_body_state(round_dir(early[0], joined - 1))
    assert all(torch.allclose(start[name], swarm_start[name], atol=1e-6) for name in swarm_start)
    trained = [pre_fusion(peer, joined, "body") for peer in (*early, late)]
    assert any(not torch.equal(trained[2][name], start[name]) for name in start), "the late joiner did not train"
    # ... and it trained from that base, not from the model it loaded: its trained body is nearer the base
    shared = [name for name in start if name in original]
    gap_to_base = distance(trained[2], {name: start[name] for name in shared})
    gap_to_original = distance(trained[2], {name: original[name] for name in shared})
    assert gap_to_base < gap_to_original, (gap_to_base, gap_to_original)
    fused_body = load_body_state(round_dir(late, joined))
    for name in trained[0]:
        mean = torch.stack([body[name] for body in trained]).mean(0)
        assert torch.allclose(fused_body[name], mean, atol=1e-6), (joined, name)


def test_lone_peer_completes_its_rounds_and_keeps_its_body(local_swarm, tiny_model_dir, tiny_dataset):
    peer = local_swarm.start_peer(
        "alone",
        tiny_dataset,
        tiny_model_dir,
        rounds=2,
        save_local_body=True,
        fusion_window=2.0,
        report_to="tensorboard",
    )
    local_swarm.wait_all(timeout=120)
    for round_number in (1, 2):
        report = peer.round_info(round_number)["report"]
        assert report["outcome"] == "alone" and report["group_size"] == 1
        kept = load_body_state(round_dir(peer, round_number))
        trained = pre_fusion(peer, round_number, "body")
        assert all(torch.equal(kept[name], trained[name]) for name in trained)
    # --report-to tensorboard: every step's loss and each round's numbers, in TensorBoard's own files
    scalars = read_scalars(peer.output_dir / "tensorboard")
    steps = FAST_SWARM_SETTINGS["local_steps"]
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 2 * steps + 1))
    before = [value for _, value in scalars["round/accuracy_before_fusion"]]
    assert before == [pytest.approx(peer.round_info(r)["report"]["accuracy_before"]) for r in (1, 2)]


def test_sigterm_during_training_keeps_the_last_fused_checkpoint(local_swarm, tiny_model_dir, tiny_datasets):
    settings = dict(rounds=3, local_steps=300, keep_checkpoints=5, fusion_window=8.0)
    stopping = local_swarm.start_peer("stopping", tiny_datasets[0], tiny_model_dir, seed=0, **settings)
    staying = local_swarm.start_peer("staying", tiny_datasets[1], tiny_model_dir, seed=1, **settings)
    wait_until(lambda: 1 in stopping.rounds_written(), timeout=150, message="round 1 checkpoint")
    assert stopping.round_info(1)["report"]["outcome"] == "fused"
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(timeout=60) == 0, stopping.log()
    assert "Traceback" not in stopping.log()

    checkpoint = latest_checkpoint(stopping.output_dir)
    assert checkpoint.round == 1, "a half-trained round must never be checkpointed"
    AutoModel.from_pretrained(checkpoint.path)
    AutoModelForSequenceClassification.from_pretrained(checkpoint.path, num_labels=2)
    wait_until(lambda: 1 in staying.rounds_written(), timeout=60, message="the other peer's round 1")
    fused_elsewhere = load_body_state(round_dir(staying, 1))
    kept = load_body_state(checkpoint.path)
    assert all(torch.allclose(kept[name], fused_elsewhere[name], atol=1e-6) for name in kept)

    assert staying.wait(timeout=150) == 0, staying.log()
    assert staying.round_info(3)["report"]["outcome"] == "alone"


def test_resume_continues_from_the_local_checkpoint(local_swarm, tiny_model_dir, tiny_dataset):
    first = local_swarm.start_peer("resumable", tiny_dataset, tiny_model_dir, rounds=1, min_group_size=1)
    local_swarm.wait_all(timeout=120)
    round_one = load_body_state(round_dir(first, 1))

    refused = local_swarm.start_peer("resumable", tiny_dataset, tiny_model_dir, rounds=2, min_group_size=1)
    assert refused.wait(timeout=120) == 2
    assert "pass --resume" in refused.log() and "Traceback" not in refused.log()
    assert first.rounds_written() == [1], "a refused start must not touch the checkpoint"

    resumed = local_swarm.start_peer(
        "resumable", tiny_dataset, tiny_model_dir, rounds=3, min_group_size=1, resume=True, save_local_body=True
    )
    assert resumed.wait(timeout=120) == 0, resumed.log()
    assert resumed.rounds_written()[-1] == 3
    assert resumed.round_info(2)["report"]["outcome"] == "alone"
    # round 2 trained from round 1's base: its pre-training start equals round 1, so the update is small
    start_gap = max((pre_fusion(resumed, 2, "body")[name] - round_one[name]).abs().max().item() for name in round_one)
    original = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    original_gap = max((original[name] - round_one[name]).abs().max().item() for name in round_one if name in original)
    assert start_gap < original_gap


def test_a_peer_with_another_model_gets_a_clear_error_and_nobody_crashes(
    local_swarm, tiny_model_dir, tiny_datasets, tmp_path
):
    from tiny_models import build_tiny_model

    other_model = build_tiny_model(tmp_path / "other-model", "distilbert")
    settings = dict(rounds=30, local_steps=100, fusion_window=5.0)
    member = local_swarm.start_peer("member", tiny_datasets[0], tiny_model_dir, **settings)
    wait_until(lambda: 1 in member.rounds_written(), timeout=120, message="the member's first round")
    stranger = local_swarm.start_peer("stranger", tiny_datasets[1], other_model, **settings)
    assert stranger.wait(timeout=120) == 2, stranger.log()
    assert "fuses a different model" in stranger.log() and "Traceback" not in stranger.log()
    assert member.process.poll() is None, "the member must keep running"


@pytest.mark.parametrize("fault", ["100", "nan"])
def test_a_poisoned_contribution_is_rejected_by_everyone(local_swarm, tiny_model_dir, tiny_datasets, fault):
    # a wide window (closed early once all three are ready): a slow start of the attacker's process
    # on a loaded machine must not turn the rejection into a group that never formed
    settings = dict(rounds=1, min_group_size=3, save_local_body=True, fusion_window=90.0)
    honest = [
        local_swarm.start_peer(f"honest{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)
    ]
    poison = {SCALE_UPDATE_ENV: fault}
    attacker = local_swarm.start_peer("attacker", tiny_datasets[2], tiny_model_dir, poison, seed=2, **settings)
    local_swarm.wait_all()
    for peer in honest:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "rejected", (report["outcome"], report.get("reason"), peer.log()[-3000:])
        kept = load_body_state(round_dir(peer, 1))
        trained = pre_fusion(peer, 1, "body")
        assert all(torch.isfinite(kept[name]).all() and torch.equal(kept[name], trained[name]) for name in trained)
    assert attacker.round_info(1)["report"]["outcome"] in ("rejected", "failed")


def test_a_peer_killed_mid_all_reduce_leaves_no_half_averaged_body_and_rejoins(
    local_swarm, tiny_model_dir, tiny_datasets
):
    # a wide window (closed early whenever all three are ready): after the crash the survivors wait
    # in round 2 for the victim's restart, however slowly it starts on a loaded machine
    settings = dict(rounds=3, min_group_size=3, save_local_body=True, keep_checkpoints=5, fusion_window=90.0)
    survivors = [
        local_swarm.start_peer(f"survivor{i}", tiny_datasets[i], tiny_model_dir, seed=i, **settings) for i in (0, 1)
    ]
    crash = {CRASH_IN_ALLREDUCE_ENV: "1"}
    victim = local_swarm.start_peer("victim", tiny_datasets[2], tiny_model_dir, crash, seed=2, **settings)
    assert victim.wait(timeout=120) == -9, victim.log()
    wait_until(lambda: all(1 in peer.rounds_written() for peer in survivors), timeout=90, message="survivors' round 1")

    reports = [peer.round_info(1)["report"] for peer in survivors]
    bodies = [load_body_state(round_dir(peer, 1)) for peer in survivors]
    assert all(torch.isfinite(t).all() for body in bodies for t in body.values())
    if reports[0]["outcome"] == "fused" or reports[1]["outcome"] == "fused":  # then both, on one body
        assert [r["outcome"] for r in reports] == ["fused", "fused"], reports
        assert all(torch.allclose(bodies[0][n], bodies[1][n], atol=1e-6) for n in bodies[0])
    else:  # or both kept exactly their own trained body: never a half-averaged mix
        for peer, body in zip(survivors, bodies, strict=True):
            trained = pre_fusion(peer, 1, "body")
            assert all(torch.equal(body[name], trained[name]) for name in trained), peer.name

    rejoined = local_swarm.start_peer(
        "victim", tiny_datasets[2], tiny_model_dir, seed=2, resume=True, **{**settings, "min_group_size": 2}
    )
    for peer in (*survivors, rejoined):
        assert peer.wait() == 0, peer.log()
    # after its restart it fuses again, in a group with both survivors (not only downloads a base)
    survivor_ids = {peer.round_info(1)["peer_id"] for peer in survivors}
    later = {r: rejoined.round_info(r)["report"] for r in rejoined.rounds_written() if r >= 2}
    fused = [r for r, report in later.items() if report["outcome"] == "fused"]
    assert fused, {r: (report["outcome"], report["reason"]) for r, report in later.items()}
    report = later[fused[0]]
    assert report["group_size"] == 3 and survivor_ids < set(report["peer_ids"]), report


@pytest.mark.parametrize(
    "fault, retried_by",
    [
        # peer0's first matchmaking looks where nobody is: neither finds a group, both look again
        (MISS_GROUP_ENV, "fusion failed"),
        # peer0's all-reduce fails at its end while peer1's completed (its last part too late, as a NAT'd
        # peer's matchmaking once gave up on a leader that still counted it): peer1, refused by a member
        # that looks again, looks again too. Before, it rolled back and stopped: peer0 found nobody
        (LOSE_ATTEMPT_ENV, "incomplete for 1 group member"),
    ],
)
def test_a_round_lost_to_one_members_transport_is_looked_for_again_and_fuses(
    local_swarm, tiny_model_dir, tiny_datasets, fault, retried_by
):
    """Round 1's first attempt is lost for peer0 (the fault); nobody applied it, so both look again
    through a fresh window and fuse round 1 on their two bodies."""
    settings = dict(rounds=1, min_group_size=2, save_local_body=True, quiet=False)
    faults = ({fault: "1:end" if fault == LOSE_ATTEMPT_ENV else "1"}, None)
    peers = [
        local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, faults[i], seed=i, **settings)
        for i in (0, 1)
    ]
    local_swarm.wait_all()
    trained = [pre_fusion(peer, 1, "body") for peer in peers]
    assert "round 1: fusion failed" in peers[0].log() and "looking again" in peers[0].log(), peers[0].log()
    assert retried_by in peers[1].log() and "looking again" in peers[1].log(), peers[1].log()
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 2, report
        fused = load_body_state(round_dir(peer, 1))
        for name in trained[0]:
            assert torch.allclose(fused[name], (trained[0][name] + trained[1][name]) / 2, atol=1e-6), name


def test_a_member_lost_as_its_group_formed_looks_again_with_the_others_once_they_learn_it(
    local_swarm, tiny_model_dir, tiny_datasets
):
    """peer0 leaves round 1's group of three as it forms (the fault; in CI a NAT'd follower gave up on
    a leader that still counted it). It knows at once, the others only when they drop it as a silent
    sender. Its second look waits for their first attempts to end, so all three look again together
    and fuse round 1 on their three bodies. Before, it looked again at once, alone, and found nobody;
    the other two, looking later, were too few for the group of three: the round was lost for all."""
    settings = dict(rounds=1, min_group_size=3, save_local_body=True, quiet=False)
    faults = ({LOSE_ATTEMPT_ENV: "1:start"}, None, None)
    peers = [
        local_swarm.start_peer(f"peer{i}", tiny_datasets[i], tiny_model_dir, faults[i], seed=i, **settings)
        for i in range(3)
    ]
    local_swarm.wait_all()
    trained = [pre_fusion(peer, 1, "body") for peer in peers]
    for peer in peers:
        assert "round 1: fusion failed" in peer.log() and "looking again" in peer.log(), peer.log()
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused" and report["group_size"] == 3, report
        fused = load_body_state(round_dir(peer, 1))
        for name in trained[0]:
            mean = torch.stack([body[name] for body in trained]).mean(0)
            assert torch.allclose(fused[name], mean, atol=1e-6), (peer.name, name)


def assert_loadable_and_finite(peer) -> None:
    for round_number in peer.rounds_written():
        body = load_body_state(round_dir(peer, round_number))
        assert all(torch.isfinite(tensor).all() for tensor in body.values()), (peer.name, round_number)
        AutoModelForSequenceClassification.from_pretrained(round_dir(peer, round_number), num_labels=2)


def assert_fused_without(frozen, running, dropped) -> list[int]:
    """The rounds the running peers fused without the frozen one, each on exactly their two bodies."""
    running_ids = {peer.round_info(1)["peer_id"] for peer in running}
    fused_without_it = []
    for round_number in dropped:
        reports = [peer.round_info(round_number)["report"] for peer in running]
        if round_number == dropped[0] and not all(report["outcome"] == "fused" for report in reports):
            # only the first: while the frozen node still sits in the DHT's routing tables, that round
            # may fail to form a group (its requests time out); then nobody fused and each kept its body
            assert all(report["outcome"] in ("failed", "missed") for report in reports), reports
            continue
        # every later dropped round must fuse the two running peers, on exactly their two bodies
        assert [report["outcome"] for report in reports] == ["fused", "fused"], (round_number, reports)
        fused_without_it.append(round_number)
        for report in reports:
            assert report["group_size"] == 2 and set(report["peer_ids"]) == running_ids, report
        trained = [pre_fusion(peer, round_number, "body") for peer in running]
        for peer in running:
            fused = load_body_state(round_dir(peer, round_number))
            for name in trained[0]:
                mean = (trained[0][name] + trained[1][name]) / 2
                assert torch.allclose(fused[name], mean, atol=1e-6), (peer.name, round_number, name)
    return fused_without_it


def drop_time(running, settings, stopped_round, fused_without_it, frozen_at) -> tuple[float, float]:
    """(seconds from the freeze to the first round fused without it, the most that may take).

    Up to that round the running peers trained (as measured), waited at most a fusion window and
    all-reduced within its timeout; a failed first round adds its own timeouts and the bounded wait
    for a base to download (15 s slack each: loaded CI).
    """
    timeouts = FAST_SWARM_SETTINGS
    fused_round_bound = settings["fusion_window"] + timeouts["allreduce_timeout"] + 15.0
    failed_round_bound = fused_round_bound + timeouts["state_download_timeout"]
    waited_rounds = range(stopped_round, fused_without_it[0] + 1)
    training = sum(running[0].round_info(r)["report"]["train_seconds"] for r in waited_rounds)
    bound = training + fused_round_bound + (len(waited_rounds) - 1) * failed_round_bound
    return running[0].round_info(fused_without_it[0])["time"] - frozen_at, bound


def assert_caught_up_then_fused(frozen, running, stopped_round, fused_without_it, thawed_at) -> tuple[int, int]:
    """After SIGCONT: the swarm's base downloaded (no stale round checkpointed), then a fusion of three."""
    history = {round_number: frozen.round_info(round_number) for round_number in frozen.rounds_written()}
    after_thaw = {r: info for r, info in history.items() if info["time"] >= thawed_at}
    synced = min(r for r, info in after_thaw.items() if info["report"]["outcome"] == "synced")
    assert synced >= max(fused_without_it), history[synced]["report"]
    assert not any(stopped_round <= r < synced for r in history), "the frozen peer checkpointed a stale round"
    swarm_base = load_body_state(round_dir(running[0], synced))
    downloaded = load_body_state(round_dir(frozen, synced))
    assert all(torch.allclose(downloaded[name], swarm_base[name], atol=1e-6) for name in swarm_base)
    rejoined = [r for r, info in after_thaw.items() if info["report"]["outcome"] == "fused"]
    assert rejoined, {r: info["report"]["outcome"] for r, info in after_thaw.items()}
    assert history[rejoined[0]]["report"]["group_size"] == 3, history[rejoined[0]]["report"]
    return synced, rejoined[0]


def test_a_peer_frozen_by_sigstop_is_dropped_then_catches_up_after_sigcont(local_swarm, tiny_model_dir, tiny_datasets):
    """SIGSTOP on the whole process group (peer, averager, DHT node, p2pd) cuts a peer off mid-round
    without closing a single connection. The others must fuse without it within the timeouts, on
    exactly their two bodies; after SIGCONT it must notice the rounds it missed, download the fused
    base instead of checkpointing its stale round, and fuse with the others again."""
    # a 30 s window: the others must not wait it out, since the frozen peer's record expires first.
    # While the frozen node sits in DHT routing tables, a DHT read now and then waits out hivemind's 3 s
    # request timeout on it (measured: one read in 5-10, for as long as it stays frozen), so the matchmaking
    # window must outlast one such read or the two others may never see each other's declarations.
    settings = dict(
        rounds=10,
        min_group_size=2,
        fusion_window=30.0,
        save_local_body=True,
        keep_checkpoints=20,
        matchmaking_time=4.0,
    )
    # peer2 trains longest, so when it is frozen right after a checkpoint the others soon wait for it
    steps = (40, 40, 120)
    peers = [
        local_swarm.start_peer(f"peer{i}", dataset, tiny_model_dir, seed=i, local_steps=steps[i], **settings)
        for i, dataset in enumerate(tiny_datasets)
    ]
    running, frozen = peers[:2], peers[2]

    def all_three_fused() -> bool:
        rounds = frozen.rounds_written()
        return bool(rounds) and frozen.round_info(rounds[-1])["report"]["group_size"] == 3

    wait_until(all_three_fused, timeout=120, interval=0.05, message="a round fused by all three")
    frozen.freeze()
    frozen_at = time.time()
    stopped_round = max(frozen.rounds_written()) + 1  # the round it was training when frozen
    dropped = (stopped_round, stopped_round + 1, stopped_round + 2)
    wait_until(
        lambda: all(dropped[-1] in peer.rounds_written() for peer in running),
        timeout=90,
        message=f"the two running peers to fuse rounds {dropped} without the frozen one",
    )
    assert frozen.process.poll() is None
    frozen.thaw()
    thawed_at = time.time()
    local_swarm.wait_all()

    fused_without_it = assert_fused_without(frozen, running, dropped)
    dropped_after, drop_bound = drop_time(running, settings, stopped_round, fused_without_it, frozen_at)
    assert 0 < dropped_after <= drop_bound, (dropped_after, drop_bound, fused_without_it)
    # ... and without waiting out the window: the frozen peer's record expired (record_ttl), then the
    # window closed early as everyone left was ready (12 s slack: the first ready peer also waits for
    # its partner's training, plus evaluation and re-fit; seen 16.6 s with a quality sweep alongside;
    # with records that never expire (sabotage) the others waited 22.8 and 28.9 s)
    waits = [peer.round_info(fused_without_it[0])["report"]["wait_seconds"] for peer in running]
    timeouts = FAST_SWARM_SETTINGS
    wait_bound = record_ttl(timeouts["record_period"]) + settings["matchmaking_time"] + 2 * timeouts["request_timeout"]
    assert max(waits) <= wait_bound + 12.0 < settings["fusion_window"], (waits, wait_bound)
    synced, rejoined = assert_caught_up_then_fused(frozen, running, stopped_round, fused_without_it, thawed_at)
    for peer in peers:
        assert_loadable_and_finite(peer)
    print(
        f"dropped after {dropped_after:.1f}s (at most {drop_bound:.0f}s); "
        f"caught up {frozen.round_info(synced)['time'] - thawed_at:.1f}s and fused "
        f"with the others {frozen.round_info(rejoined)['time'] - thawed_at:.1f}s after SIGCONT"
    )
