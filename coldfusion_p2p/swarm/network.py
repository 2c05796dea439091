"""Joining the DHT: address validation, start-up, and errors a volunteer can act on.

Every node of a run (peer, bootstrap, monitor) starts its DHT here, so address checks, the swarm's
record validators and the "none of the initial peers is reachable" message exist once.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path
from typing import Literal

from hivemind import DHT
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from coldfusion_p2p.config import NetworkConfig
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.swarm.auth import InviteAuthorizer, Moderation, load_moderation, prepare_identity
from coldfusion_p2p.swarm.process_safety import install as install_fork_hooks
from coldfusion_p2p.swarm.records import RunKeys, swarm_validators

logger = logging.getLogger(__name__)

JOIN_ATTEMPTS = 3  # DHT starts when the initial peers let a ping time out (busy), not when they refuse it
PING_TIMEOUT = 3.0  # hivemind's DHT request timeout (wait_timeout): a ping unanswered this long timed out


def busy_not_refused(seconds: float, attempt: int) -> bool:
    """Whether a DHT start whose pings of the initial peers all failed is worth another try: they
    timed out (busy peers: 16 starting at once on 2 cores did that), rather than being refused at
    once (a moderated run without our invite), and tries are left. Pure."""
    return seconds >= PING_TIMEOUT and attempt < JOIN_ATTEMPTS


DHT_START_TIMEOUT = 60.0


def check_multiaddr(address: str, flag: str, need_peer_id: bool) -> str:
    """Parse one multiaddr; a malformed one is a UserError naming the flag and the expected shape."""
    example = "/ip4/203.0.113.7/tcp/31337/p2p/QmPeerId..." if need_peer_id else "/ip4/0.0.0.0/tcp/31337"
    try:
        parsed = Multiaddr(address)
    except Exception as error:  # the multiaddr parser raises several error types
        raise UserError(f"malformed multiaddr {address!r} in {flag} ({error})", f"use the form {example}") from None
    if need_peer_id and "p2p" not in [protocol.name for protocol in parsed.protocols()]:
        raise UserError(
            f"multiaddr {address!r} in {flag} has no /p2p/<peer id> part",
            f"copy the full address a running peer or bootstrap node prints, e.g. {example}",
        )
    return address


def check_network_config(config: NetworkConfig) -> None:
    for address in config.initial_peers:
        check_multiaddr(address, "--initial-peers", need_peer_id=True)
    for address in config.host_maddrs:
        check_multiaddr(address, "--host-maddrs", need_peer_id=False)
    for address in config.announce_maddrs:
        check_multiaddr(address, "--announce-maddrs", need_peer_id=False)


def check_ports_free(host_maddrs: list[str]) -> None:
    """Fail early when a fixed listening port is taken (libp2p would share it silently via SO_REUSEPORT)."""
    for address in host_maddrs:
        parts = Multiaddr(address).protocols()
        names = [protocol.name for protocol in parts]
        if "tcp" not in names or not ({"ip4", "ip6"} & set(names)):
            continue
        parsed = Multiaddr(address)
        family = "ip4" if "ip4" in names else "ip6"
        host, port = parsed.value_for_protocol(family), int(parsed.value_for_protocol("tcp"))
        if port == 0:
            continue
        with socket.socket(socket.AF_INET if family == "ip4" else socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may leave TIME_WAIT behind
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise UserError(
                        f"port {port} of {address} is already in use",
                        "stop the other process using it or pick another port in --host-maddrs",
                    ) from None
                raise UserError(f"cannot listen on {address} ({error.strerror})", "check --host-maddrs") from None


def network_moderation(config: NetworkConfig) -> Moderation | None:
    """This node's moderation settings (None for an open run), checked: UserError when unusable."""
    return load_moderation(
        require_invite=config.require_invite,
        run_id=config.run_id,
        identity=config.identity,
        invite=config.invite,
        owner_public_key=config.owner_public_key,
    )


def start_dht(
    config: NetworkConfig,
    keys: RunKeys,
    *,
    client_mode: bool = False,
    private_key: RSAPrivateKey | None = None,
    moderation: Moderation | None = None,
    relay: Literal["serve", "reserve"] | None = None,
    restart: bool = False,
) -> DHT:
    """Start this node's DHT with the run's record validators (and, in a moderated run, its invite
    checks); UserError when it cannot join.

    ``relay="serve"``: a public node that serves libp2p circuit relays (p2pd's relay service runs
    only once the node counts as publicly reachable, so that is forced). ``relay="reserve"``: a node
    behind NAT that reserves a slot at the relays among its initial peers (p2pd's default trusted
    relays), to be reachable through them. Every node keeps the relay transport, to dial relayed
    nodes. ``restart``: this identity was online a moment ago (the same node in another mode), so
    hivemind's "is this identity taken" check would see itself.
    """
    check_network_config(config)
    check_ports_free(config.host_maddrs)
    install_fork_hooks()  # the DHT's process (and its p2pd) must not outlive this one, even SIGKILLed
    if moderation is None:
        moderation = network_moderation(config)
    options = dict(
        initial_peers=list(config.initial_peers),
        host_maddrs=list(config.host_maddrs),
        announce_maddrs=list(config.announce_maddrs) or None,
        client_mode=client_mode,
        record_validators=swarm_validators(keys, private_key),
        start=True,
        await_ready=True,
    )
    if relay == "serve":
        options["force_reachability"] = "public"
    elif relay == "reserve":
        options.update(use_auto_relay=True, force_reachability="private")
    if restart:
        options["check_if_identity_free"] = False
    if config.identity is not None:
        identity = Path(config.identity).expanduser()
        prepare_identity(identity)
        options["identity_path"] = str(identity)
    if moderation is not None:
        options["authorizer"] = InviteAuthorizer(moderation)
    for attempt in range(1, JOIN_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            return DHT(**options)
        except P2PDaemonError as error:
            raise _daemon_error(config, error) from None
        except RuntimeError as error:
            if "none of the initial_peers responded" not in str(error):
                raise
            if not busy_not_refused(time.monotonic() - started, attempt):
                raise _refused_error(config, moderation, attempt) from None
            logger.warning("the initial peers did not answer within %.0f s (busy?): trying again", PING_TIMEOUT)
            time.sleep(attempt * 2.0)


def _refused_error(config: NetworkConfig, moderation: Moderation | None, attempts: int) -> UserError:
    """The initial peers are reachable but answered no DHT request: a moderated run refusing us, or
    (after ``attempts`` > 1 tries that timed out) peers too busy to answer."""
    peers = ", ".join(config.initial_peers)
    if attempts > 1:
        return UserError(
            f"the initial peers ({peers}) refused this node or did not answer its DHT requests in {attempts} tries",
            "check that they run and are not overloaded; if the run is moderated, this node needs the run "
            "owner's invite (--require-invite, --identity, --invite, --owner-public-key)",
        )
    if moderation is None:
        return UserError(
            f"the initial peers ({peers}) refused this node: the run is moderated and this node has no invite",
            "ask the run owner for an invite for your --identity's public key, then pass --require-invite, "
            "--identity, --invite and --owner-public-key",
        )
    return UserError(
        f"the initial peers ({peers}) refused this node's invite ({moderation.invite.name!r})",
        "check --run-id and --owner-public-key against the run owner's, or ask the owner for a new invite",
    )


def _daemon_error(config: NetworkConfig, error: P2PDaemonError) -> UserError:
    text = str(error)
    if "failed to connect to bootstrap peers" in text:
        return UserError(
            f"none of the initial peers is reachable ({', '.join(config.initial_peers)})",
            "check that a peer or bootstrap node is running at that address and that its port is open",
        )
    if "address already in use" in text.lower():
        return UserError(
            f"a listening port is already in use ({', '.join(config.host_maddrs)})",
            "pick another port in --host-maddrs or use port 0 for any free port",
        )
    reason = text.replace("Daemon failed to start:", "").strip().splitlines()[0] if text.strip() else "unknown"
    return UserError(f"could not start the p2p daemon ({reason[:200]})", "check --host-maddrs and --initial-peers")


def shut_down(*components) -> None:
    """Shut hivemind components (averagers, DHTs) down, tolerating ones already gone (after Ctrl-C)."""
    for component in components:
        if component is None:
            continue
        try:
            component.shutdown()
        except Exception as error:
            logger.debug("shutdown of %s failed: %r", type(component).__name__, error)
