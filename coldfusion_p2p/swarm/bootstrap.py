"""The bootstrap node: a long-lived DHT entry point with a stable identity, and the archivist.

It holds no data and trains nothing. Its private key (``--identity``) fixes its peer id, so the
``--initial-peers`` value it prints stays valid across restarts; several bootstrap nodes can serve
one swarm (peers list them all, and keep fusing through the others and through peers they
already know when one dies). With ``--archive-dir`` it also keeps every round's fused base.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from hivemind import DHT

from coldfusion_p2p.config import BootstrapConfig
from coldfusion_p2p.contributor.checkpoints import ensure_writable_dir
from coldfusion_p2p.swarm import reachability
from coldfusion_p2p.swarm.archive import RoundArchiver
from coldfusion_p2p.swarm.console import PeerConsole
from coldfusion_p2p.swarm.network import network_moderation, shut_down
from coldfusion_p2p.swarm.records import RunKeys

logger = logging.getLogger(__name__)

DEFAULT_PEERS_FILE = "initial_peers.txt"


class BootstrapNode:
    """Runs until stopped; ``start()`` then ``run()``, ``shutdown()`` in a ``finally``.

    >>> node = BootstrapNode(build_config({"identity": "bootstrap.key"}, config_type=BootstrapConfig))
    >>> node.start()            # prints the --initial-peers value for peers
    >>> node.run()              # until SIGINT/SIGTERM (stop_event)
    """

    def __init__(self, config: BootstrapConfig, stop_event: threading.Event | None = None):
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.keys = RunKeys.from_run_id(config.network.run_id)
        self.console = PeerConsole(quiet=config.logging.quiet, log_format=config.logging.log_format)
        self.dht: DHT | None = None
        self.archiver: RoundArchiver | None = None
        self.initial_peers: list[str] = []

    def start(self) -> list[str]:
        settings = self.config.bootstrap
        moderation = network_moderation(self.config.network)  # a bad invite fails before anything starts
        if settings.archive_dir is not None:
            ensure_writable_dir(Path(settings.archive_dir), "--archive-dir")  # fail before joining anything
        self.dht, mode = reachability.join(
            self.config.network, self.keys, moderation=moderation, serve_relay=settings.relay
        )
        if mode.name != "public":
            self.console.warning(
                f"{mode.line()}. Peers elsewhere cannot join through this node: give it a public address "
                "(or forward its port and pass --announce-maddrs)"
            )
        if settings.archive_dir is not None:  # before announcing: peers leaving early must already see it
            self.archiver = RoundArchiver(
                self.dht,
                self.keys,
                archive_dir=settings.archive_dir,
                model_name=settings.base_model,
                local_modules=settings.local_modules,
                keep=settings.keep,
                moderation=moderation,
                push_to_hub=settings.push_to_hub,
                download_timeout=settings.download_timeout,
            )
        self.initial_peers = [str(address) for address in self.dht.get_visible_maddrs()]
        peers_file = Path(settings.peers_file or DEFAULT_PEERS_FILE)
        peers_file.write_text(" ".join(self.initial_peers) + "\n")
        self.console.bootstrap_ready(self.dht.peer_id.to_base58(), self.initial_peers, peers_file)
        self.console.reachability(mode)
        if settings.relay:
            self.console.info("serving libp2p circuit relays for peers behind NAT (--relay)")
        return self.initial_peers

    def run(self) -> None:
        while not self.stop_event.wait(self.config.bootstrap.poll_period):
            if self.archiver is None:
                continue
            archived = self.archiver.poll()
            if archived is not None:
                names = [c["dataset_name"] for c in archived.metadata["contributors"]]
                self.console.info(f"archived round {archived.round} ({', '.join(map(str, names))}) in {archived.path}")

    def shutdown(self) -> None:
        self.stop_event.set()
        shut_down(self.archiver, self.dht)
