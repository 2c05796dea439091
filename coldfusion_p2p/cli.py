"""``coldfusion-peer``: parse flags into a config, call one library function, map errors to exit codes.

Flags are generated from the config dataclasses (one flag per field, help text from the field's
comment), so a flag and its ``--config`` key can never drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

from coldfusion_p2p import __version__
from coldfusion_p2p.config import (
    BootstrapConfig,
    DemoConfig,
    EvaluateConfig,
    IdentityConfig,
    InviteConfig,
    MonitorConfig,
    PeerConfig,
    SimulateConfig,
    build_config,
    config_fields,
    field_help,
    read_config_file,
)
from coldfusion_p2p.errors import UserError

EXIT_OK, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 2, 130


def add_config_flags(parser: argparse.ArgumentParser, config_type: type = PeerConfig) -> None:
    """One flag per config field; unset flags stay absent so the config file and defaults apply."""
    section_types = get_type_hints(config_type)
    for section, name, hint in config_fields(config_type):
        flag = "--" + name.replace("_", "-")
        help_text = field_help(name, section_types[section])
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        optional_args = [arg for arg in get_args(hint) if arg is not type(None)]
        base = optional_args[0] if type(None) in get_args(hint) else hint  # X | None -> X
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            options.update(action="extend", nargs="+", metavar="MULTIADDR" if section == "network" else "VALUE")
        elif get_origin(base) is Literal:
            options["choices"] = list(get_args(base))
        parser.add_argument(flag, *SHORT_FLAGS.get(name, ()), **options)


SHORT_FLAGS = {"gradient_accumulation": ("--grad-accum",)}  # the names users know from other trainers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coldfusion-peer",
        description="Collaborative finetuning (ColD Fusion) over a hivemind peer-to-peer swarm.",
    )
    parser.add_argument("--version", action="version", version=f"coldfusion-p2p {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_type, _, summary, description) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        command.add_argument("--config", help="TOML or YAML file whose keys mirror these flags (flags win)")
        add_config_flags(command, config_type)
    return parser


def parse_config(arguments: argparse.Namespace, config_type: type = PeerConfig):
    """Defaults, then ``--config``, then the flags given on the command line."""
    values = vars(arguments).copy()
    values.pop("command", None)
    config_path = values.pop("config", None)
    file_values = read_config_file(config_path) if config_path else {}
    return build_config(file_values, values, config_type)


def check_inputs_early(config) -> None:
    """Input errors fixed in a second (a mistyped --dataset path), found before the seconds of
    torch, transformers and hivemind imports that logging and the commands need."""
    if isinstance(config, PeerConfig):
        from coldfusion_p2p.contributor.sources import check_local_dataset

        check_local_dataset(config.data.dataset)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import hivemind  # noqa: F401  (sets its own log level on import: override it afterwards)
    import transformers

    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.CRITICAL)

    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def install_stop_handlers(stop_event: threading.Event) -> dict:
    """SIGINT/SIGTERM ask for a clean stop; a second signal stops at once (checkpoints are atomic).

    Returns the previous handlers, for :func:`restore_handlers`.
    """

    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked hivemind child: its parent shuts it down cleanly
            return
        if stop_event.is_set():
            raise KeyboardInterrupt
        stop_event.set()
        print(f"received {signal.Signals(signum).name}: stopping after the current step", file=sys.stderr, flush=True)

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT/SIGTERM set, with the previous handlers restored afterwards."""
    stop_event = threading.Event()
    previous_handlers = install_stop_handlers(stop_event)
    try:
        yield stop_event
    finally:
        restore_handlers(previous_handlers)


def run_join(config: PeerConfig) -> int:
    with stop_on_signals() as stop_event:  # before the seconds of torch/hivemind imports: SIGTERM then still exits 0
        from coldfusion_p2p.swarm.peer import Peer

        peer = Peer(config, stop_event=stop_event)
        try:
            peer.run()
        finally:
            peer.shutdown()
    return EXIT_OK


def run_bootstrap(config: BootstrapConfig) -> int:
    from coldfusion_p2p.swarm.bootstrap import BootstrapNode

    with stop_on_signals() as stop_event:
        node = BootstrapNode(config, stop_event=stop_event)
        try:
            node.start()
            node.run()
        finally:
            node.shutdown()
    return EXIT_OK


def run_monitor(config: MonitorConfig) -> int:
    from coldfusion_p2p.swarm.monitor import monitor_swarm

    monitor_swarm(config)
    return EXIT_OK


def run_identity(config: IdentityConfig) -> int:
    from coldfusion_p2p.swarm.auth import load_identity, prepare_identity, public_key_text

    path = config.key.identity
    existed = os.path.exists(path)
    prepare_identity(path)
    peer_id, key = load_identity(path)
    if not existed:
        print(f"created {path} (keep it private and back it up)", file=sys.stderr)
    print(f"peer id:    {peer_id.to_base58()}")
    print(f"public key: {public_key_text(key)}")
    return EXIT_OK


def run_invite(config: InviteConfig) -> int:
    from coldfusion_p2p.swarm.auth import issue_invite

    settings = config.invite
    invite = issue_invite(
        owner_key=settings.owner_key,
        public_key=settings.public_key,
        run_id=settings.run_id,
        name=settings.name,
        valid_days=settings.valid_days,
    )
    token = invite.encode()
    if settings.output:
        try:
            with open(os.open(settings.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                file.write(token + "\n")
        except OSError as error:
            raise UserError(f"cannot write {settings.output} ({error.strerror})", "pass a writable --output") from None
    print(
        f"invite for {invite.name!r} (peer id {invite.peer_id.to_base58()}) to run {invite.run_id!r}, "
        f"valid until {invite.expires_text}; the invitee passes it as --invite",
        file=sys.stderr,
    )
    print(token)
    return EXIT_OK


def run_evaluate(config: EvaluateConfig) -> int:
    from coldfusion_p2p.evaluation.evaluate import run_evaluation

    run_evaluation(config)
    return EXIT_OK


def run_simulate(config: SimulateConfig) -> int:
    from coldfusion_p2p.apps.simulate import run_simulation

    run_simulation(config)
    return EXIT_OK


def run_demo_command(config: DemoConfig) -> int:
    from coldfusion_p2p.apps.demo import run_demo

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # unwinds through the demo's finally, which stops its peers

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_demo(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


COMMANDS = {  # name: (config class, runner, one-line help, description)
    "demo": (
        DemoConfig,
        run_demo_command,
        "the main job: a local swarm on bundled data, a live dashboard, then evidence that fusion helps",
        "Start a bootstrap node and one peer per bundled contributor on 127.0.0.1, run the rounds, then evaluate "
        "the original and the fused base and write a report (Markdown, CSV/JSON, PNG).",
    ),
    "join": (
        PeerConfig,
        run_join,
        "finetune on a private dataset and fuse the shared body with the swarm",
        "Join a swarm: finetune locally on --dataset, fuse body weights with the other peers each round.",
    ),
    "bootstrap": (
        BootstrapConfig,
        run_bootstrap,
        "run a long-lived DHT entry point (stable identity) that can archive every fused base",
        "Run a bootstrap node: no data, no training; prints the --initial-peers value for peers.",
    ),
    "monitor": (
        MonitorConfig,
        run_monitor,
        "watch a live swarm in a terminal dashboard (q or Ctrl-C quits)",
        "Join as a DHT client and show peers, datasets, rounds, loss, accuracy and alerts.",
    ),
    "identity": (
        IdentityConfig,
        run_identity,
        "create (if absent) a key file and print its peer id and public key: what the run owner needs to invite you",
        "Every node's --identity, and the run owner's key that signs invites, are such key files.",
    ),
    "invite": (
        InviteConfig,
        run_invite,
        "moderated runs: as the run owner, sign an invite for a peer's public key",
        "Print (and with --output write) an invite token binding the invitee's public key (hence its peer id), "
        "the run id and an expiry, signed with --owner-key. Nodes of a run started with --require-invite and "
        "--owner-public-key refuse DHT and averaging requests of nodes without a valid one.",
    ),
    "simulate": (
        SimulateConfig,
        run_simulate,
        "run ColD Fusion in one process (no network): fast sweeps, or a try before running a swarm",
        "Build every contributor from its peer config (bundled name or .toml), train them in turn, fuse their bodies "
        "with the same rule as a swarm, re-fit each head; writes each fused base and rounds.csv/png.",
    ),
    "evaluate": (
        EvaluateConfig,
        run_evaluate,
        "compare base models (e.g. original vs fused) by finetuning and linear probing on seen/unseen datasets",
        "ColD Fusion's evaluation: finetune and linear-probe every --base on every dataset and seed, with the same "
        "budget, and report accuracy on held-out test splits (seen and unseen datasets apart).",
    ),
}


@contextlib.contextmanager
def _stop_during_imports() -> Iterator[None]:
    """SIGTERM while hivemind, torch and transformers load (seconds) is a clean stop with nothing
    to save, not a default-action kill; each command installs its own handlers afterwards."""

    def stop(signum, frame):
        raise SystemExit(EXIT_OK)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a node hangs
    with contextlib.suppress(AttributeError, OSError, ValueError):  # stderr without a file descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        config_type, run, _, _ = COMMANDS[arguments.command]
        config = parse_config(arguments, config_type)
        check_inputs_early(config)
        with _stop_during_imports():
            configure_logging(config.logging.verbose)
        return run(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
