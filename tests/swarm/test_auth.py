"""Moderated runs: invites (signing, expiry, forgery), the DHT authorizer, the averager's gate, the CLI,
and a real swarm where invited peers fuse and an uninvited one is refused."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, dht_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.crypto import RSAPrivateKey

from coldfusion_p2p.cli import main
from coldfusion_p2p.config import FusionConfig, NetworkConfig
from coldfusion_p2p.swarm.auth import (
    Invite,
    InviteAuthorizer,
    InviteGate,
    Moderation,
    admitted_peers,
    invite_problem,
    issue_invite,
    load_identity,
    peer_id_of,
    prepare_identity,
    public_key_text,
    sign_invite,
)
from coldfusion_p2p.swarm.hivemind_adapter import FusedBodyAverager
from coldfusion_p2p.swarm.network import network_moderation, shut_down, start_dht
from coldfusion_p2p.swarm.records import PeerRecord, RecordBoard, RunKeys

from conftest import assert_one_line_error, cli_output

RUN = "moderated-run"
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmNWbgEMioifYsa6ihdAvq15uiY1rwrndcnbeFyDejYQXx"


@pytest.fixture(scope="module")
def owner() -> RSAPrivateKey:
    return RSAPrivateKey()


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keys")


def identity(keys_dir: Path, name: str) -> tuple[Path, RSAPrivateKey]:
    path = keys_dir / f"{name}.key"
    prepare_identity(path)
    return path, load_identity(path)[1]


def invite_for(owner: RSAPrivateKey, key: RSAPrivateKey, run_id: str = RUN, days: float = 1.0, name: str = "x"):
    public = key.get_public_key().to_bytes()
    return sign_invite(owner, public, run_id=run_id, name=name, expires=time.time() + days * 86400)


def moderation_of(owner: RSAPrivateKey, key: RSAPrivateKey, invite: Invite) -> Moderation:
    return Moderation(run_id=RUN, owner=owner.get_public_key(), identity_key=key, invite=invite)


# ---------------------------------------------------------------- invites (pure)
def test_an_invite_round_trips_and_names_the_peer_id_of_its_key(owner, keys_dir):
    path, key = identity(keys_dir, "alice")
    invite = invite_for(owner, key, name="alice")
    decoded = Invite.decode(invite.encode())
    assert decoded == invite
    assert decoded.peer_id == PeerID.from_identity(path.read_bytes()) == peer_id_of(key.get_public_key().to_bytes())
    assert invite_problem(decoded, owner.get_public_key(), RUN, time.time()) is None
    assert decoded.to_token().public_key == key.get_public_key().to_bytes()  # what the DHT authorizer sends


def test_expired_forged_altered_and_foreign_invites_are_invalid(owner, keys_dir):
    _, key = identity(keys_dir, "bob")
    now = time.time()
    owner_public = owner.get_public_key()
    expired = invite_for(owner, key, days=-1)
    assert "expired" in invite_problem(expired, owner_public, RUN, now)
    assert "for run 'moderated-run', not 'other'" in invite_problem(invite_for(owner, key), owner_public, "other", now)
    forged = invite_for(RSAPrivateKey(), key)  # signed by someone who is not the owner
    assert "not signed by the run owner" in invite_problem(forged, owner_public, RUN, now)
    valid = invite_for(owner, key, name="bob")
    for field, value in (("name", "mallory"), ("expires", valid.expires + 10**7), ("run_id", "other")):
        altered = Invite(**{**valid.__dict__, field: value})
        assert "not signed by the run owner" in invite_problem(altered, owner_public, RUN, now), field
    _, other_key = identity(keys_dir, "carol")
    stolen_key = Invite(**{**valid.__dict__, "public_key": other_key.get_public_key().to_bytes()})
    assert "not signed by the run owner" in invite_problem(stolen_key, owner_public, RUN, now)
    tokens = [valid.encode(), expired.encode(), forged.encode(), "cfinvite1.garbage", "nonsense"]
    assert list(admitted_peers(tokens, owner_public, RUN, now)) == [valid.peer_id]


@pytest.mark.parametrize(
    "text",
    ["", "cfinvite1.", "cfinvite1.!!!", "cfinvite1.AAAA", "cfinvite1." + "A" * 5000, "ssh-rsa AAAA"],
    ids=["empty", "prefix-only", "not-base64", "not-protobuf", "too-long", "a-public-key"],
)
def test_malformed_tokens_raise_value_errors(text):
    with pytest.raises(ValueError):
        Invite.decode(text)


# ---------------------------------------------------------------- the DHT authorizer
def test_the_dht_authorizer_accepts_invited_requests_and_refuses_others(owner, keys_dir):
    _, server_key = identity(keys_dir, "server")
    _, client_key = identity(keys_dir, "client")
    _, stranger_key = identity(keys_dir, "stranger")
    server = InviteAuthorizer(moderation_of(owner, server_key, invite_for(owner, server_key)))
    client = InviteAuthorizer(moderation_of(owner, client_key, invite_for(owner, client_key)))
    # a stranger with a self-made "invite": signed by its own key instead of the owner's
    stranger = InviteAuthorizer(moderation_of(stranger_key, stranger_key, invite_for(stranger_key, stranger_key)))

    async def exchange(authorizer) -> bool:
        request = dht_pb2.PingRequest(validate=True)
        await authorizer.sign_request(request, None)
        return await server.validate_request(request)

    async def checks():
        assert await exchange(client)
        assert not await exchange(stranger)
        assert not await server.validate_request(dht_pb2.PingRequest())  # a node without any invite

    asyncio.run(checks())


# ---------------------------------------------------------------- the averager's gate
class FakeDHT:
    """Answers ``get`` with the records of ``tokens``; counts the lookups."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.calls = tokens, 0

    def get(self, key, latest=True, return_future=True):
        from hivemind.utils import ValueWithExpiration

        self.calls += 1
        value = {
            bytes([i]): ValueWithExpiration({"invite": token}, time.time() + 10) for i, token in enumerate(self.tokens)
        }

        async def answer():
            return ValueWithExpiration(value, time.time() + 10)

        return answer()


def test_the_gate_admits_invited_peer_ids_refuses_others_and_bounds_lookups(owner, keys_dir):
    _, own_key = identity(keys_dir, "own")
    _, member_key = identity(keys_dir, "member")
    _, late_key = identity(keys_dir, "late")
    stranger = peer_id_of(RSAPrivateKey().get_public_key().to_bytes())
    member, late = invite_for(owner, member_key), invite_for(owner, late_key)
    dht = FakeDHT([member.encode()])
    gate = InviteGate(dht, "key", moderation_of(owner, own_key, invite_for(owner, own_key)), refresh_period=60.0)

    async def checks():
        assert await gate.admits(member.peer_id)  # miss -> one lookup -> admitted
        assert await gate.admits(member.peer_id) and dht.calls == 1  # cached
        gate._last_refresh = -1e9  # the refresh period has passed
        for _ in range(20):
            assert not await gate.admits(stranger)
        assert dht.calls == 2  # a stranger knocking again and again causes one lookup per refresh period
        dht.tokens.append(late.encode())
        assert not await gate.admits(late.peer_id)  # published, but within the refresh period
        gate._last_refresh = -1e9
        assert await gate.admits(late.peer_id)
        assert await gate.uninvited([member.peer_id, stranger, late.peer_id]) == [stranger]

    asyncio.run(checks())
    gate.update([], now=time.time() + 2 * 86400)  # every invite has expired by then
    assert not gate._admitted


def test_averager_rpcs_from_an_uninvited_peer_id_are_refused_even_bypassing_the_dht(owner, keys_dir, tmp_path):
    """A raw libp2p client calls the averager's handlers directly, never touching the DHT."""
    server_path, server_key = identity(keys_dir, "avg-server")
    client_path, client_key = identity(keys_dir, "avg-client")
    stranger_path, _ = identity(keys_dir, "avg-stranger")
    (tmp_path / "server.invite").write_text(invite_for(owner, server_key).encode())
    network = NetworkConfig(
        run_id=RUN,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity=str(server_path),
        require_invite=True,
        invite=str(tmp_path / "server.invite"),
        owner_public_key=public_key_text(owner),
    )
    keys, moderation = RunKeys.from_run_id(RUN), network_moderation(network)
    dht = start_dht(network, keys, moderation=moderation)
    averager = None
    try:
        # the invited client's invite is in the swarm's records, as a peer publishes it
        board = RecordBoard(dht, keys)
        record = dict(dataset_name="d", num_examples=1, status="idle", round=1, fused_round=0, step=0, total_steps=1)
        client_invite = invite_for(owner, client_key).encode()
        assert board.publish(PeerRecord(peer_id="c", **record, invite=client_invite, time=time.time()), ttl=60)
        gate = InviteGate(dht, keys.records_key, moderation)
        config = FusionConfig(matchmaking_time=1.5, request_timeout=0.5)
        averager = FusedBodyAverager(
            [torch.arange(4.0)], dht, prefix=keys.averager_prefix("x"), config=config, gate=gate
        )
        maddrs = dht.get_visible_maddrs()

        async def call_all(identity_path: Path, send_part: bool = True) -> dict[str, object]:
            p2p = await P2P.create(
                identity_path=str(identity_path), host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs
            )
            try:
                stub = FusedBodyAverager.get_stub(p2p, dht.peer_id, namespace=averager.prefix)
                join = await stub.rpc_join_group(
                    averaging_pb2.JoinRequest(schema_hash=b"x", expiration=time.time() + 5)
                )
                answers = {"join": (await asyncio.wait_for(anext(join), 10)).code}
                if send_part:  # (an invited sender with no running group would wait for one: not sent)
                    part = averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"none")
                    try:
                        aggregate = await stub.rpc_aggregate_part(as_aiter(part))
                        answers["aggregate"] = (await asyncio.wait_for(anext(aggregate), 10)).code
                    except (BrokenPipeError, ConnectionResetError, StopAsyncIteration):  # refused, stream closed
                        answers["aggregate"] = averaging_pb2.PROTOCOL_VIOLATION
                download = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                answers["download"] = len([message async for message in download])
                return answers
            finally:
                await p2p.shutdown()

        refused = asyncio.run(call_all(stranger_path))
        assert refused == {
            "join": averaging_pb2.PROTOCOL_VIOLATION,
            "aggregate": averaging_pb2.PROTOCOL_VIOLATION,
            "download": 0,
        }
        invited = asyncio.run(call_all(client_path, send_part=False))
        assert invited["join"] == averaging_pb2.NOT_LOOKING_FOR_GROUP  # hivemind's own answer: past the gate
        assert invited["download"] > 0  # the fused snapshot was served
    finally:
        shut_down(averager, dht)


# ---------------------------------------------------------------- the CLI
def test_identity_and_invite_commands(capsys, tmp_path):
    assert main(["identity", "--identity", str(tmp_path / "owner.key")]) == 0
    owner_out = capsys.readouterr().out
    assert main(["identity", "--identity", str(tmp_path / "peer.key")]) == 0
    peer_id, public_key = (line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines())
    assert public_key.startswith("ssh-rsa ")
    token_file = tmp_path / "peer.invite"
    invite_flags = ["--owner-key", str(tmp_path / "owner.key"), "--public-key", public_key, "--run-id", RUN]
    code = main(["invite", *invite_flags, "--name", "alice", "--output", str(token_file)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == token_file.read_text().strip()
    invite = Invite.decode(captured.out)
    assert (invite.name, invite.run_id, invite.peer_id.to_base58()) == ("alice", RUN, peer_id)
    owner_public = owner_out.splitlines()[1].split(":", 1)[1].strip()
    network = NetworkConfig(
        run_id=RUN,
        identity=str(tmp_path / "peer.key"),
        require_invite=True,
        invite=str(token_file),
        owner_public_key=owner_public,
    )
    assert network_moderation(network).invite == invite


def test_bad_invites_and_keys_are_one_line_errors(capsys, tmp_path, owner):
    owner_file = tmp_path / "owner.key"
    main(["identity", "--identity", str(owner_file)])
    owner_public = capsys.readouterr().out.splitlines()[1].split(":", 1)[1].strip()
    peer_key = tmp_path / "peer.key"
    prepare_identity(peer_key)
    peer_public = public_key_text(load_identity(peer_key)[1])

    def make(**overrides) -> str:
        options = dict(owner_key=str(owner_file), public_key=peer_public, run_id=RUN, name="p", valid_days=1.0)
        return issue_invite(**{**options, **overrides}).encode()

    def monitor(*flags: str) -> tuple[int, str]:
        code = main(["monitor", "--run-id", RUN, "--initial-peers", UNREACHABLE, "--once", *flags])
        return code, capsys.readouterr().err

    moderated = ["--require-invite", "--identity", str(peer_key), "--owner-public-key", owner_public]
    expired = make(now=time.time() - 2 * 86400)
    forged = sign_invite(RSAPrivateKey(), peer_public.encode(), run_id=RUN, name="p", expires=time.time() + 1e5)
    cases = [
        ((*moderated, "--invite", expired), ("expired", "new invite")),
        ((*moderated, "--invite", forged.encode()), ("not signed by the run owner", "--owner-public-key")),
        ((*moderated, "--invite", make(run_id="another-run")), ("for run 'another-run'", "--run-id")),
        ((*moderated, "--invite", make()[:-30]), ("malformed", "whole token")),
        ((*moderated, "--invite", str(tmp_path / "missing.invite")), ("neither an invite token", "file")),
        (("--require-invite", "--identity", str(peer_key), "--invite", make()), ("--owner-public-key",)),
        (("--invite", make()), ("--require-invite",)),
        ((*moderated[:-1], "not-a-key", "--invite", make()), ("--owner-public-key", "ssh-rsa")),
    ]
    for flags, fragments in cases:
        assert_one_line_error(*monitor(*flags), *fragments)
    code = main(["invite", "--owner-key", str(tmp_path / "none.key"), "--public-key", peer_public])
    assert_one_line_error(code, capsys.readouterr().err, "does not exist", "coldfusion-peer identity")
    code = main(["invite", "--owner-key", str(owner_file), "--public-key", peer_public, "--valid-days", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "valid_days")


# ---------------------------------------------------------------- a real moderated swarm
@pytest.mark.swarm
def test_invited_peers_fuse_and_an_uninvited_peer_is_refused(local_swarm, tiny_model_dir, tiny_datasets, tmp_path):
    run_id = local_swarm.run_id
    owner_text = cli_output("identity", "--identity", str(tmp_path / "owner.key"))
    owner_public = owner_text.splitlines()[1].split(":", 1)[1].strip()
    moderated = {}
    for name in ("boot", "peer0", "peer1", "stranger"):
        cli_output("identity", "--identity", str(tmp_path / f"{name}.key"))
        moderated[name] = {
            "identity": str(tmp_path / f"{name}.key"),
            "require_invite": True,
            "owner_public_key": owner_public,
        }
        if name != "stranger":
            token = str(tmp_path / f"{name}.invite")
            owner_key, key = str(tmp_path / "owner.key"), str(tmp_path / f"{name}.key")
            cli_output("invite", "--owner-key", owner_key, "--public-key", key, "--run-id", run_id, "--output", token)
            moderated[name]["invite"] = str(token)

    boot = local_swarm.start_bootstrap("boot", **moderated["boot"])
    initial_peers = boot.wait_ready()
    common = dict(rounds=1, min_group_size=2, initial_peers=initial_peers)
    peers = [
        local_swarm.start_peer(name, tiny_datasets[i], tiny_model_dir, seed=i, **common, **moderated[name])
        for i, name in enumerate(("peer0", "peer1"))
    ]
    # uninvited: no invite at all, and with an identity but someone else's invite
    stranger = local_swarm.start_peer(
        "stranger", tiny_datasets[2], tiny_model_dir, **common, identity=moderated["stranger"]["identity"]
    )
    thief = local_swarm.start_peer(
        "thief",
        tiny_datasets[2],
        tiny_model_dir,
        **common,
        **{**moderated["stranger"], "invite": moderated["peer0"]["invite"]},
    )
    assert stranger.wait(timeout=120) == 2, stranger.log()
    assert "refused this node" in stranger.log() and "Traceback" not in stranger.log()
    assert thief.wait(timeout=120) == 2, thief.log()
    assert "your invite was issued for peer id" in thief.log()
    for peer in peers:
        assert peer.wait(timeout=150) == 0, peer.log()

    invited_ids = {load_identity(moderated[name]["identity"])[0].to_base58() for name in ("peer0", "peer1")}
    for peer in peers:
        report = peer.round_info(1)["report"]
        assert report["outcome"] == "fused", (peer.name, report["reason"])
        assert report["group_size"] == 2 and set(report["peer_ids"]) == invited_ids
        assert json.loads(json.dumps(peer.round_info(1)["peer_id"])) in invited_ids
