"""Swarm records: typed by a strict schema and signed, so no peer can write another's record."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils.crypto import RSAPrivateKey

from coldfusion_p2p.swarm.records import PeerRecord, RunKeys, swarm_validators

KEYS = RunKeys.from_run_id("records.test/run 1")


def a_record(**changes) -> dict:
    record = PeerRecord(
        peer_id="12D3KooWtest",
        dataset_name="reviews",
        num_examples=100,
        status="training",
        round=2,
        fused_round=1,
        step=3,
        total_steps=40,
        train_loss=0.5,
        accuracy_before=0.7,
        accuracy_after=0.75,
        samples_per_second=12.5,
        last_group_size=3,
        last_fusion_seconds=1.5,
        version="0.1.0",
        time=1.0,
    ).dict()
    record.update(changes)
    return record


def dht_record(value: dict, subkey: bytes, key: str = KEYS.records_key) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=DHTProtocol.serializer.dumps(subkey),
        value=DHTProtocol.serializer.dumps(value),
        expiration_time=10.0,
    )


def signed(validator: CompositeValidator, record: DHTRecord) -> DHTRecord:
    return DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)


@pytest.fixture
def owner():
    key = RSAPrivateKey()
    return CompositeValidator(swarm_validators(KEYS, key)), RSASignatureValidator(key).local_public_key


def test_run_keys_are_safe_for_any_printable_run_id():
    keys = RunKeys.from_run_id("my.run / 2 ✓")
    assert "." not in keys.averager_prefix("abc123") and " " not in keys.prefix
    assert RunKeys.from_run_id("a.b").prefix != RunKeys.from_run_id("a_b").prefix


def test_a_signed_well_formed_record_is_accepted(owner):
    validator, public_key = owner
    assert validator.validate(signed(validator, dht_record(a_record(), public_key)))


@pytest.mark.parametrize(
    "changes",
    [
        {"round": -1},
        {"status": "hacking"},
        {"num_examples": 1.5},
        {"accuracy_before": 1.5},
        {"unexpected_field": 1},
        {"dataset_name": "x" * 500},
    ],
)
def test_malformed_records_are_rejected(owner, changes):
    validator, public_key = owner
    assert not validator.validate(signed(validator, dht_record(a_record(**changes), public_key)))


def test_unsigned_records_are_rejected(owner):
    validator, public_key = owner
    assert not validator.validate(dht_record(a_record(), public_key)), "no signature"
    assert not validator.validate(dht_record(a_record(), b"plain-subkey-without-owner")), "no owner in subkey"


def test_forged_records_are_rejected(owner):
    validator, victim_key = owner
    attacker = CompositeValidator(swarm_validators(KEYS, RSAPrivateKey()))
    forged = signed(attacker, dht_record(a_record(dataset_name="forged"), victim_key))
    assert not validator.validate(forged)
    genuine = signed(validator, dht_record(a_record(), victim_key))
    tampered = DHTRecord(genuine.key, genuine.subkey, genuine.value.replace(b"reviews", b"REVIEWS"), 10.0)
    assert not validator.validate(tampered)


def test_a_peers_verdicts_on_successive_stages_all_stay_readable_through_a_real_dht():
    """With bounded groups a member publishes its verdict on stage 2 right after the one on stage 1:
    a slower member of the stage-1 group must still find the stage-1 verdict (it would roll back a
    stage the others applied). The log keeps the latest VERDICT_HISTORY, oldest dropped first."""
    from hivemind import DHT

    from coldfusion_p2p.swarm.records import VERDICT_HISTORY, RecordBoard, Verdict

    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        board = RecordBoard(dht, KEYS, RSAPrivateKey())
        for attempt in range(VERDICT_HISTORY + 2):
            verdict = Verdict(peer_id="12D3KooWme", round=1 + attempt // 4, nonce=f"n{attempt}", ok=True, time=1.0)
            assert board.publish_verdict(verdict, ttl=30.0)
        first_round = {verdict.nonce for verdict in board.fetch_verdicts(1)}
        assert first_round == {"n2", "n3"}, "the oldest two fell out of the log; the round's others stay"
        assert {verdict.nonce for verdict in board.fetch_verdicts(4)} == {f"n{i}" for i in range(12, 16)}
        assert len([v for r in range(1, 6) for v in board.fetch_verdicts(r)]) == VERDICT_HISTORY
    finally:
        dht.shutdown()
