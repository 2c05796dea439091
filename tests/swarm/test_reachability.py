"""Reachability: the mode decision (pure), and the dial-back probe between two real DHT nodes.

Behind-NAT behaviour itself is tested on the network lab (tests/swarm/test_nat.py): on loopback
everyone can reach everyone.
"""

from __future__ import annotations

import functools
import socket

import pytest
from hivemind import DHT

from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.reachability import (
    MAX_PROBED_ADDRESSES,
    Mode,
    Probe,
    _ask_dialback,
    decide_mode,
    probe,
    probed_addresses,
    serve_probes,
    watch_relay,
)
from coldfusion_p2p.swarm.records import PeerRecord

NATTED = Probe(server="QmBootstrap", reachable=(), unreachable=("192.168.1.2:4001",), relay=False)
NATTED_WITH_RELAY = Probe(server="QmBootstrap", reachable=(), unreachable=("192.168.1.2:4001",), relay=True)
OPEN = Probe(server="QmBootstrap", reachable=("203.0.113.7:4001",), unreachable=(), relay=False)


def test_reachable_nodes_are_public_and_say_who_connected_back():
    mode = decide_mode("auto", "auto", OPEN, has_initial_peers=True)
    assert mode == Mode("public", mode.reason) and "203.0.113.7:4001" in mode.reason
    assert not mode.averager_client_mode and not mode.dht_client_mode


def test_unreachable_nodes_run_in_client_mode_unless_a_relay_is_found_or_asked_for():
    client = decide_mode("auto", "auto", NATTED, has_initial_peers=True)
    assert client.name == "client" and "192.168.1.2:4001" in client.reason and "NAT" in client.reason
    assert client.averager_client_mode and client.dht_client_mode
    relayed = decide_mode("auto", "auto", NATTED_WITH_RELAY, has_initial_peers=True)
    assert relayed.name == "relayed" and relayed.averager_client_mode and relayed.dht_client_mode
    assert decide_mode("auto", "off", NATTED_WITH_RELAY, has_initial_peers=True).name == "client"
    assert decide_mode("auto", "on", NATTED, has_initial_peers=True).name == "relayed"


def test_explicit_settings_and_the_cases_with_nothing_to_probe():
    assert decide_mode("public", "auto", NATTED, has_initial_peers=True).name == "public"
    assert decide_mode("private", "off", OPEN, has_initial_peers=True).name == "client"
    first = decide_mode("auto", "auto", None, has_initial_peers=False)
    assert first.name == "public" and "first node" in first.reason
    silent = decide_mode("auto", "auto", None, has_initial_peers=True)
    assert silent.name == "public" and "--reachability private" in silent.reason
    assert decide_mode("auto", "auto", OPEN, True).line().startswith("reachability: public (")


class AddressesLater:
    """A stand-in for the DHT's address list (only what watch_relay reads): a relay slot after ``calls`` looks."""

    def __init__(self, calls: int):
        self.calls, self.seen = calls, 0

    def get_visible_maddrs(self, latest: bool = False):
        self.seen += 1
        own = ["/ip4/192.168.1.2/tcp/4001/p2p/QmMe"]
        return own + (["/ip4/11.77.0.2/tcp/31337/p2p/QmRelay/p2p-circuit/p2p/QmMe"] if self.seen > self.calls else [])


def test_a_client_awaiting_a_relay_turns_relayed_once_its_slot_appears_and_stops_watching(monkeypatch):
    import threading

    monkeypatch.setattr("coldfusion_p2p.swarm.reachability.RELAY_POLL", 0.01)
    modes, stop = [], threading.Event()
    watch_relay(AddressesLater(calls=3), stop, modes.append).join(timeout=5)
    assert [mode.name for mode in modes] == ["relayed"], modes
    assert "/p2p/QmRelay/p2p-circuit/p2p/QmMe" in modes[0].reason and "after it joined" in modes[0].reason
    assert modes[0].averager_client_mode, "a relayed node still fuses as a client"
    never = []
    watch_relay(AddressesLater(calls=10**9), stop, never.append, timeout=0.05).join(timeout=5)
    assert never == [], "no slot within the bound: it stays a client"
    stop.set()
    watch_relay(AddressesLater(calls=0), stop, never.append).join(timeout=5)
    assert never == [], "a stopping node stops watching"


def test_probed_addresses_keep_tcp_and_drop_loopback_unless_the_prober_is_local():
    maddrs = [
        "/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "/ip4/192.168.1.2/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "/ip4/192.168.1.2/udp/4001/quic/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "/ip4/192.168.1.2/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # a duplicate
    ]
    assert probed_addresses(maddrs, server_is_loopback=False) == [("192.168.1.2", 4001)]
    assert probed_addresses(maddrs, server_is_loopback=True) == [("127.0.0.1", 4001)]
    many = [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(20)]
    assert len(probed_addresses(many, server_is_loopback=False)) == MAX_PROBED_ADDRESSES


def _record(reachability: str) -> PeerRecord:
    return PeerRecord(
        peer_id="Qm",
        dataset_name="d",
        num_examples=1,
        status="ready",
        round=1,
        fused_round=0,
        step=0,
        total_steps=1,
        reachability=reachability,
        time=0.0,
    )


def test_a_group_needs_one_peer_that_can_reduce():
    assert policy.no_reducer([_record("client"), _record("relayed")])
    assert not policy.no_reducer([_record("client"), _record("public")])
    assert not policy.no_reducer([_record("client"), _record("")])  # an older version ran as a full member


@pytest.fixture
def prober_and_node():
    prober = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    node = None
    try:
        serve_probes(prober, relay=True)
        node = DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=[str(address) for address in prober.get_visible_maddrs()],
        )
        yield prober, node
    finally:
        for dht in (node, prober):
            if dht is not None:
                dht.shutdown()


def test_a_public_node_connects_back_to_a_listening_node_and_not_to_a_closed_port(prober_and_node):
    prober, node = prober_and_node
    answer = probe(node, [str(address) for address in prober.get_visible_maddrs()])
    own_port = next(address for address in node.get_visible_maddrs() if "/tcp/" in str(address))
    assert answer is not None and answer.relay and answer.server == prober.peer_id.to_base58()
    assert answer.reachable == (f"127.0.0.1:{str(own_port).split('/tcp/')[1].split('/')[0]}",)

    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        answer = node.run_coroutine(
            functools.partial(_ask_dialback, server=prober.peer_id.to_base58(), addresses=[("127.0.0.1", port)])
        )
    assert answer.reachable == () and answer.unreachable == (f"127.0.0.1:{port}",)


def test_a_node_that_serves_no_probes_gives_no_answer():
    silent = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    node = None
    try:
        node = DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=[str(address) for address in silent.get_visible_maddrs()],
        )
        assert probe(node, [str(address) for address in silent.get_visible_maddrs()]) is None
    finally:
        for dht in (node, silent):
            if dht is not None:
                dht.shutdown()
