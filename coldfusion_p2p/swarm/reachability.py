"""Can this node accept inbound connections? The probe, the mode it implies, and the line saying so.

Why it matters: in hivemind's butterfly all-reduce every member reduces a slice, so every member
dials every other. A volunteer behind home NAT accepts no inbound connection, so a group that
counts it as a reducer loses a slice, and all-or-nothing fusion rolls the round back for all.

The modes (:class:`Mode`):

* **public**: inbound connections work. A full member: reduces a slice, serves the fused base to
  late joiners, answers DHT requests, and answers other nodes' reachability probes.
* **relayed**: inbound connections fail, but a bootstrap started with ``--relay`` serves libp2p
  circuit relays and the node holds a reservation there (a ``/p2p-circuit`` address), so libp2p
  can still dial it through the relay. It fuses like a client (averager and DHT in client mode):
  bodies through a relay would put every byte of the swarm through the bootstrap's link. The
  reservation is libp2p's autorelay's to make, and it comes late: with fewer than 4 relays in
  sight autorelay first waits out its 3-minute boot delay (measured on the network lab: 172 s).
  So such a node joins as a client that awaits a relay (:attr:`Mode.awaiting_relay`), and
  :func:`watch_relay` turns it into a relayed one once its slot is reserved. A relay only
  reserves with addresses libp2p counts as public: behind a relay on a private address
  (10.x, 192.168.x) no ``/p2p-circuit`` address ever appears.
* **client**: inbound connections fail and no relay is used. hivemind's client mode: the averager
  sends its body to the reducers and receives the average but reduces nothing and serves no state,
  and the DHT node only asks. It only ever dials out, which NAT allows.

A group needs at least one non-client member to reduce: the fusion window turns a swarm without
one into a one-line error (:func:`policy.no_reducer`).

The probe. p2pd runs AutoNAT, but its control protocol does not report the verdict, so the probe
is explicit: the node sends the addresses it listens on to a bootstrap (any public node answers),
which opens a *fresh* TCP connection to each. A connection the node opened itself would be
reused by libp2p and prove nothing. To keep the service from being a port scanner for strangers it
dials at most :data:`MAX_PROBED_ADDRESSES` addresses, each bounded by :data:`DIAL_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from google.protobuf.wrappers_pb2 import StringValue
from hivemind import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils.multiaddr import Multiaddr

from coldfusion_p2p.config import NetworkConfig
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.swarm.auth import Moderation
from coldfusion_p2p.swarm.network import start_dht
from coldfusion_p2p.swarm.records import RunKeys

logger = logging.getLogger(__name__)

ModeName = Literal["public", "relayed", "client"]
DIALBACK_HANDLER = "coldfusion.reachability.dialback"
MAX_PROBED_ADDRESSES = 8
DIAL_TIMEOUT = 3.0  # seconds per address: a NAT drops the SYN silently, so only a timeout tells
PROBE_TIMEOUT = 2 * DIAL_TIMEOUT + 4.0  # one bootstrap's whole answer
RELAY_WAIT = 600.0  # seconds a node that asked a relay for a slot watches for it (autorelay waits ~180 s first)
RELAY_POLL = 2.0  # ... looking this often


@dataclass(frozen=True)
class Mode:
    """How this node takes part, and why, in words for the one line it prints."""

    name: ModeName
    reason: str
    awaiting_relay: bool = False  # a client whose DHT asked a relay for a slot (see watch_relay)

    @property
    def averager_client_mode(self) -> bool:
        """Only a public node reduces slices and serves state; the others only dial out."""
        return self.name != "public"

    @property
    def dht_client_mode(self) -> bool:
        """A DHT server nobody can reach directly stalls everyone's lookups, relayed or not."""
        return self.name != "public"

    def line(self) -> str:
        what = {
            "public": "accepts inbound connections: reduces, serves the fused base and answers probes",
            "relayed": "reachable only through a relay: fuses in client mode (sends its body, receives the average)",
            "client": "cannot accept inbound connections: fuses in client mode (sends its body, receives the average)",
        }[self.name]
        return f"reachability: {self.name} ({self.reason}); {what}"


@dataclass(frozen=True)
class Probe:
    """A bootstrap's answer: which of our addresses it could connect to, and whether it relays."""

    server: str  # the answering node's peer id
    reachable: tuple[str, ...]  # our "ip:port" addresses it opened a connection to
    unreachable: tuple[str, ...]
    relay: bool  # it serves circuit relays (a bootstrap started with --relay)


def decide_mode(requested: str, use_relay: str, probe: Probe | None, has_initial_peers: bool) -> Mode:
    """This node's mode from its settings and the probe (None: no node answered it). Pure."""
    if requested == "public":
        return Mode("public", "--reachability public")
    if requested == "private":
        reason = "--reachability private"
    elif not has_initial_peers:
        return Mode("public", "the first node of the swarm: there is nobody to probe through")
    elif probe is None:
        return Mode(
            "public", "no initial peer answered the reachability probe; pass --reachability private if behind NAT"
        )
    elif probe.reachable:
        return Mode("public", f"{_short(probe.server)} connected back to {probe.reachable[0]}")
    else:
        tried = ", ".join(probe.unreachable) or "no address"
        reason = f"{_short(probe.server)} could not connect back to {tried}: behind NAT or a firewall"
    relay_available = probe is not None and probe.relay
    if use_relay == "on" or (use_relay == "auto" and relay_available):
        return Mode("relayed", reason + ("; through the bootstrap's relay" if relay_available else "; --use-relay on"))
    return Mode("client", reason)


def join(
    config: NetworkConfig, keys: RunKeys, *, moderation: Moderation | None = None, serve_relay: bool = False
) -> tuple[DHT, Mode]:
    """Start this node's DHT in the mode its reachability calls for; ``(dht, mode)``.

    With ``--reachability auto`` and initial peers, the DHT starts as a public node, probes, and
    restarts in client mode (same identity) if nobody can connect back: only nodes behind NAT pay
    for the second start. A public node then answers others' probes.
    """
    has_initial_peers = bool(config.initial_peers)
    mode = decide_mode(config.reachability, config.use_relay, None, has_initial_peers)
    if serve_relay and mode.name != "public":
        raise UserError(
            "--relay needs a node others can connect to, but this one runs with --reachability private",
            "run the relay on a public address (drop --reachability private)",
        )
    dht = _start(config, keys, mode, moderation, serve_relay, restart=False)
    if config.reachability == "auto" and has_initial_peers:
        mode = decide_mode("auto", config.use_relay, probe(dht, list(config.initial_peers)), has_initial_peers)
        if mode.name != "public":
            dht.shutdown()
            dht = _start(config, keys, mode, moderation, serve_relay=False, restart=True)
    if mode.name == "relayed":  # until autorelay has reserved its slot (minutes), it runs as a client
        reason = f"{mode.reason}; asked for a relay slot, which libp2p reserves after about 3 minutes"
        mode = Mode("client", reason, awaiting_relay=True)
    if mode.name == "public":
        serve_probes(dht, relay=serve_relay)
    return dht, mode


def relay_address(dht: DHT) -> str | None:
    """This node's ``/p2p-circuit`` address, once a relay has reserved it a slot; else None."""
    addresses = [str(address) for address in dht.get_visible_maddrs(latest=True)]
    return next((address for address in addresses if "p2p-circuit" in address), None)


def watch_relay(
    dht: DHT, stop_event: threading.Event, on_reserved: Callable[[Mode], None], timeout: float = RELAY_WAIT
) -> threading.Thread:
    """In the background, wait (bounded) for a relay to reserve this node a slot, then hand
    ``on_reserved`` its relayed mode. Until then, and for good if none comes, the node is a client.
    Started once the node has joined, so the seconds it reports count from then."""
    started = time.monotonic()

    def watch() -> None:
        while not stop_event.wait(RELAY_POLL):
            try:
                address = relay_address(dht)
            except Exception as error:  # the DHT shutting down
                logger.debug("reading our addresses failed: %r", error)
                return
            waited = time.monotonic() - started
            if address is not None:
                reason = f"a relay reserved this node a slot {waited:.0f} s after it joined: {address}"
                on_reserved(Mode("relayed", reason))
                return
            if waited > timeout:
                logger.info("no relay reserved a slot in %.0f s: staying a client", waited)
                return

    thread = threading.Thread(target=watch, name="relay-watch", daemon=True)
    thread.start()
    return thread


def _start(
    config: NetworkConfig, keys: RunKeys, mode: Mode, moderation: Moderation | None, serve_relay: bool, restart: bool
) -> DHT:
    relay = "serve" if serve_relay else "reserve" if mode.name == "relayed" else None
    return start_dht(
        config, keys, client_mode=mode.dht_client_mode, moderation=moderation, relay=relay, restart=restart
    )


def probed_addresses(maddrs: list, server_is_loopback: bool) -> list[tuple[str, int]]:
    """The (ip, port) pairs worth probing among our visible multiaddrs: TCP only, and loopback only
    when the probing node is on this machine too (elsewhere 127.0.0.1 is the prober itself)."""
    found: list[tuple[str, int]] = []
    for maddr in maddrs:
        try:
            parsed = Multiaddr(str(maddr))
        except Exception:  # a transport this multiaddr parser does not know: not TCP anyway
            continue
        names = [protocol.name for protocol in parsed.protocols()]
        if "tcp" not in names or "p2p-circuit" in names:
            continue
        family = "ip4" if "ip4" in names else "ip6" if "ip6" in names else None
        if family is None:
            continue
        host, port = parsed.value_for_protocol(family), int(parsed.value_for_protocol("tcp"))
        if ipaddress.ip_address(host).is_loopback != server_is_loopback:
            continue
        if (host, port) not in found:
            found.append((host, port))
    return found[:MAX_PROBED_ADDRESSES]


def probe(dht: DHT, initial_peers: list[str]) -> Probe | None:
    """Ask the initial peers in turn to connect back to us; the first answer, or None."""
    own = dht.get_visible_maddrs()
    for initial_peer in initial_peers:
        parsed = Multiaddr(initial_peer)
        names = [protocol.name for protocol in parsed.protocols()]
        server = parsed.value_for_protocol("p2p")
        host = parsed.value_for_protocol("ip4" if "ip4" in names else "ip6") if {"ip4", "ip6"} & set(names) else ""
        loopback = bool(host) and ipaddress.ip_address(host).is_loopback
        addresses = probed_addresses(own, server_is_loopback=loopback)
        if not addresses:
            continue
        try:
            answer = dht.run_coroutine(functools.partial(_ask_dialback, server=server, addresses=addresses))
        except Exception as error:  # not a probing node (an old version, a plain DHT), or gone
            logger.debug("reachability probe through %s failed: %r", server, error)
            continue
        if answer is not None:
            return answer
    return None


def serve_probes(dht: DHT, relay: bool = False) -> None:
    """Answer other nodes' reachability probes (public nodes only: a node behind NAT would lie)."""
    dht.run_coroutine(functools.partial(_register_dialback, relay=relay))


async def _register_dialback(_dht: DHT, node, relay: bool) -> None:
    async def dialback(request: StringValue, context: P2PContext) -> StringValue:
        try:
            addresses = [(str(host), int(port)) for host, port in json.loads(request.value)][:MAX_PROBED_ADDRESSES]
        except (ValueError, TypeError):
            return StringValue(value=json.dumps({"error": "malformed probe"}))
        results = await asyncio.gather(*(_connects(host, port) for host, port in addresses))
        answers = [[f"{host}:{port}", ok] for (host, port), ok in zip(addresses, results, strict=True)]
        return StringValue(value=json.dumps({"results": answers, "relay": relay}))

    await node.p2p.add_protobuf_handler(DIALBACK_HANDLER, dialback, StringValue)


async def _connects(host: str, port: int) -> bool:
    """A fresh TCP connection (no libp2p: it would reuse the one the prober opened)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def _ask_dialback(_dht: DHT, node, server: str, addresses: list[tuple[str, int]]) -> Probe | None:
    request = StringValue(value=json.dumps(addresses))
    response = await asyncio.wait_for(
        node.p2p.call_protobuf_handler(PeerID.from_base58(server), DIALBACK_HANDLER, request, StringValue),
        PROBE_TIMEOUT,
    )
    answer = json.loads(response.value)
    if "results" not in answer:
        return None
    reachable = tuple(address for address, ok in answer["results"] if ok)
    unreachable = tuple(address for address, ok in answer["results"] if not ok)
    return Probe(server=server, reachable=reachable, unreachable=unreachable, relay=bool(answer.get("relay")))


def _short(peer_id: str) -> str:
    return f"bootstrap {peer_id[:8]}…"
