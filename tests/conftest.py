"""Shared fixtures: a tiny model, a tiny dataset, and a local swarm of real peer processes.

Multi-process tests start each peer as its own ``coldfusion-peer join`` process on 127.0.0.1 with
one torch thread (two cores shared by several peers would otherwise starve hivemind's short
test timeouts) and ``HF_HUB_OFFLINE=1``. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).parent))
# hivemind switches torch to the "file_system" sharing strategy, whose torch_shm_manager helper dies
# with the children this session reaps, aborting the test process on a later garbage collection.
# The test process itself (its in-process DHT entry point) shares by file descriptors instead.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from coldfusion_p2p.cli import main as cli_main
from coldfusion_p2p.config import as_flags
from coldfusion_p2p.contributor.checkpoints import load_body_state
from coldfusion_p2p.swarm.round_store import PRE_FUSION_FILE

from tiny_models import build_tiny_model, sentiment_rows, write_csv

# Every process this pytest process starts inherits this marker (peers get os.environ, p2pd a copy of
# theirs), so the per-test reaper below finds them by /proc/<pid>/environ even once re-parented, and
# never touches the processes of another pytest run on the same machine.
TEST_SESSION_ENV = "COLDFUSION_TEST_SESSION"
TEST_SESSION = uuid.uuid4().hex
os.environ[TEST_SESSION_ENV] = TEST_SESSION

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small timeouts that are still safe on 2 busy cores; the window closes early once all are ready.
REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: peers/, bootstrap/, benchmarks/

FAST_SWARM_SETTINGS = {
    "local_steps": 3,
    "batch_size": 8,
    "max_length": 16,
    "max_eval_examples": 64,
    "lr": 3e-3,
    "torch_threads": 1,
    "matchmaking_time": 1.5,
    # a follower waits this long for its leader's "accepted"; a leader whose group is complete starts at once,
    # so one that gave up still counts as a member and the round is lost. 0.5 s was too short with a dozen
    # processes on 2 busy cores (groups of 3 lost a sender now and then)
    "request_timeout": 1.0,
    "fusion_window": 60.0,  # closed early once min_group_size peers are ready: only a slow start waits
    "allreduce_timeout": 20.0,
    "next_chunk_timeout": 10.0,  # 5 s: CI dropped a sender of a 2-peer group on loopback now and then
    "state_download_timeout": 30.0,
    "record_period": 0.5,
    "host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
}
PROCESS_TIMEOUT = 180.0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(160, seed=0))


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory) -> list[Path]:
    """Three peers' private datasets: same kind of task, different rows and label names."""
    folder = tmp_path_factory.mktemp("peer-data")
    label_sets = [("negative", "positive"), ("bad", "good"), ("0", "1")]
    return [
        write_csv(folder / f"peer{index}.csv", sentiment_rows(120, seed=index + 1, labels=labels))
        for index, labels in enumerate(label_sets)
    ]


def peer_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.pop("HIVEMIND_MEMORY_SHARING_STRATEGY", None)  # peers run exactly as users run them
    environment.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return environment


def peer_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "coldfusion_p2p.cli", *arguments]


class PeerProcess:
    """A ``coldfusion-peer <command>`` child process (``join`` by default) with its output in a log file."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        settings: dict,
        command: str = "join",
        wrap: Sequence[str] = (),
        environment: dict[str, str] | None = None,
    ):
        """``wrap`` prefixes the command line: ``ip netns exec <namespace>`` runs it on a lab host.
        ``environment``: more variables for this process alone (test faults: ``swarm/faults.py``)."""
        self.name = name
        self.output_dir = Path(settings.get("output_dir", workdir / name))
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(
            [*wrap, *peer_command(command, *as_flags(settings))],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**peer_environment(), **(environment or {})},
            start_new_session=True,
        )

    def wait(self, timeout: float = PROCESS_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGUSR1)  # the CLI dumps every thread's stack into the log
                time.sleep(1.0)
            self.kill()
            raise AssertionError(f"peer {self.name} did not finish within {timeout}s:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def freeze(self) -> None:
        """SIGSTOP the whole process group (peer, averager, DHT and p2pd): a peer cut off the network."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log.close()

    def rounds_written(self) -> list[int]:
        rounds_dir = self.output_dir / "rounds"
        if not rounds_dir.exists():
            return []
        return sorted(int(path.name.split("_")[1]) for path in rounds_dir.glob("round_*"))

    def round_info(self, round_number: int) -> dict:
        return json.loads((self.output_dir / "rounds" / f"round_{round_number:05d}" / "round.json").read_text())


class BootstrapProcess(PeerProcess):
    """A ``coldfusion-peer bootstrap`` process; ``initial_peers`` once it has written its peers file."""

    def __init__(self, name: str, workdir: Path, wrap: Sequence[str] = (), **settings):
        self.peers_file = workdir / f"{name}.peers"
        self.peers_file.unlink(missing_ok=True)
        settings = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "peers_file": str(self.peers_file), **settings}
        super().__init__(name, workdir, settings, command="bootstrap", wrap=wrap)

    def wait_ready(self, timeout: float = 60.0) -> list[str]:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"bootstrap {self.name} exited with {self.process.returncode}:\n{self.log()}")
            return self.peers_file.exists() and bool(self.peers_file.read_text().strip())

        wait_until(ready, timeout, message=f"bootstrap {self.name} to start")
        return self.peers_file.read_text().split()

    @property
    def peer_id(self) -> str:
        return self.peers_file.read_text().split()[0].rsplit("/p2p/", 1)[1]


class LocalSwarm:
    """A DHT entry point in the test process plus peer processes that join through it."""

    def __init__(self, workdir: Path, run_id: str):
        from hivemind import DHT

        from coldfusion_p2p.swarm.records import RunKeys, swarm_validators

        self.workdir, self.run_id = workdir, run_id
        self.dht = DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=swarm_validators(RunKeys.from_run_id(run_id)),
        )
        self.initial_peers = [str(address) for address in self.dht.get_visible_maddrs()]
        self.peers: list[PeerProcess] = []

    def start_bootstrap(self, name: str, **settings) -> BootstrapProcess:
        """A bootstrap node of this swarm's run, killed with the swarm at the end of the test."""
        node = BootstrapProcess(name, self.workdir, **{"run_id": self.run_id, **settings})
        self.peers.append(node)
        return node

    def start_peer(
        self, name: str, dataset: Path, model: Path, environment: dict[str, str] | None = None, **overrides
    ) -> PeerProcess:
        """A peer with the fast test settings and ``overrides`` (flags); ``environment``: see PeerProcess."""
        settings = {
            **FAST_SWARM_SETTINGS,
            "dataset": str(dataset),
            "model": str(model),
            "run_id": self.run_id,
            "initial_peers": self.initial_peers,
            "output_dir": str(self.workdir / name),
            "quiet": True,
            **overrides,
        }
        peer = PeerProcess(name, self.workdir, settings, environment=environment)
        self.peers.append(peer)
        return peer

    def wait_all(self, timeout: float = PROCESS_TIMEOUT) -> None:
        """Wait for every peer (not bootstrap nodes, which run until stopped) to exit with code 0."""
        deadline = time.monotonic() + timeout
        for peer in self.peers:
            if isinstance(peer, BootstrapProcess):
                continue
            code = peer.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, f"peer {peer.name} exited with {code}:\n{peer.log()}"

    def close(self) -> None:
        for peer in self.peers:
            peer.kill()
        self.dht.shutdown()


@pytest.fixture
def local_swarm(tmp_path, request) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(tmp_path, run_id=f"test.{request.node.name}")
    try:
        yield swarm
    finally:
        swarm.close()


class LabSwarm:
    """Peer processes on the hosts of a :class:`netlab.NetLab`, joined through a bootstrap node on
    its public side (the test process itself sits outside the lab's networks)."""

    def __init__(self, lab, workdir: Path, run_id: str):
        self.lab, self.workdir, self.run_id = lab, workdir, run_id
        self.peers: list[PeerProcess] = []
        self.initial_peers: list[str] = []

    def _maddrs(self, host: str) -> list[str]:
        return [f"/ip4/{self.lab.hosts[host].address}/tcp/0"]

    def start_bootstrap(self, name: str = "bootstrap", host: str = "bootstrap", **settings) -> BootstrapProcess:
        node = BootstrapProcess(
            name,
            self.workdir,
            wrap=self.lab.hosts[host].command([]),
            **{"run_id": self.run_id, "host_maddrs": self._maddrs(host), **settings},
        )
        self.peers.append(node)
        address = f"/ip4/{self.lab.hosts[host].address}/"
        self.initial_peers = [peer for peer in node.wait_ready() if peer.startswith(address)]
        return node

    def start_peer(
        self, name: str, host: str, dataset: Path, model: Path, environment: dict[str, str] | None = None, **overrides
    ) -> PeerProcess:
        settings = {
            **FAST_SWARM_SETTINGS,
            "dataset": str(dataset),
            "model": str(model),
            "run_id": self.run_id,
            "initial_peers": self.initial_peers,
            "output_dir": str(self.workdir / name),
            "host_maddrs": self._maddrs(host),
            **overrides,
        }
        peer = PeerProcess(name, self.workdir, settings, wrap=self.lab.hosts[host].command([]), environment=environment)
        self.peers.append(peer)
        return peer

    def start_peers(self, hosts: Sequence[str], datasets: Sequence[Path], model: Path, **settings) -> list[PeerProcess]:
        """One peer per host, named after it, with the host's index as its dataset and seed."""
        return [
            self.start_peer(host, host, datasets[index], model, seed=index, **settings)
            for index, host in enumerate(hosts)
        ]

    def close(self) -> None:
        for peer in self.peers:
            peer.kill()


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds (every loop is bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


LEAK_GRACE = 15.0  # seconds a test's processes get to exit on their own after its teardown


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


_BOOT_TIME = _boot_time()
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_processes(since: float) -> dict[int, str]:
    """``pid -> command line`` of live processes that this pytest process started at or after ``since``
    (wall clock): those carrying this session's marker in their environment (re-parented or not),
    and descendants of this process (forked children, whose /proc environ is the parent's initial one)."""
    marker = f"{TEST_SESSION_ENV}={TEST_SESSION}".encode()
    me = os.getpid()
    parents: dict[int, int] = {}
    candidates: dict[int, tuple[bool, float, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):  # exited, only not reaped yet
                continue
            parents[pid] = int(fields[1])
            started = _BOOT_TIME + int(fields[19]) / _CLOCK_TICKS
            try:
                marked = marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except PermissionError:  # another user's process: never ours
                marked = False
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        candidates[pid] = (marked, started, command.strip())

    def descends_from_me(pid: int) -> bool:
        for _ in range(64):  # bounded walk up the parent chain
            pid = parents.get(pid, 0)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    return {
        pid: command
        for pid, (marked, started, command) in candidates.items()
        if started >= since - 1.0 and (marked or descends_from_me(pid))  # btime has a 1 s resolution
    }


@pytest.fixture(autouse=True)
def reap_leftover_processes(request):
    """After each test (and its other fixtures' teardown): processes it started that are still alive
    (p2pd daemons, hivemind helpers, peers), re-parented or not, are killed and fail the test."""
    began = time.time()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    leftovers = session_processes(began)
    while leftovers and time.monotonic() < deadline:  # a shut-down p2pd may take a moment to go
        time.sleep(0.2)
        leftovers = session_processes(began)
    if not leftovers:
        return
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    listing = "\n".join(f"  {pid}: {command[:160]}" for pid, command in sorted(leftovers.items()))
    test = request.node.nodeid
    pytest.fail(f"{len(leftovers)} process(es) outlived {test} by {LEAK_GRACE:.0f}s (killed):\n{listing}")


@pytest.fixture
def make_trainer(tiny_model_dir, tiny_dataset):
    """A factory of LocalTrainers on the tiny model and dataset; keyword arguments override TrainingConfig."""
    from coldfusion_p2p.config import DataConfig, TrainingConfig
    from coldfusion_p2p.contributor.data import load_task_data
    from coldfusion_p2p.contributor.model import load_classifier, load_tokenizer
    from coldfusion_p2p.contributor.trainer import LocalTrainer

    data = load_task_data(DataConfig(dataset=str(tiny_dataset)))
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def make(**overrides):
        torch.set_num_threads(1)
        model = load_classifier(str(tiny_model_dir), data.label_names, seed=0)
        config = TrainingConfig(**{"local_steps": 30, "lr": 3e-3, "batch_size": 16, **overrides})
        return LocalTrainer(model, tokenizer, data.train, data.validation, config, max_length=16)

    return make


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``folder``, as TensorBoard itself reads event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file the code under test wrote, as dicts."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_model_card(folder: Path, round_number: int, datasets: list[str], license: str) -> None:
    """``folder`` (a fused base) carries a Hugging Face model card that the Hub's own parser reads,
    with the metadata and the contributors of that round."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(folder) / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == license, card.data
    assert "coldfusion-p2p" in card.data.tags, card.data
    assert f"# ColD Fusion base, round {round_number}" in card.text, card.text
    for dataset in datasets:
        assert f"| {dataset} |" in card.text, (dataset, card.text)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A user error: exit code 2 and one ``error: ...`` line naming each fragment, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def round_dir(peer, round_number: int) -> Path:
    """The checkpoint folder a peer wrote for ``round_number``."""
    return peer.output_dir / "rounds" / f"round_{round_number:05d}"


def assert_outcomes(peers, round_number: int, expected: str = "fused") -> None:
    """Every peer's ``round_number`` ended with ``expected``; on failure the message names each peer's
    outcome, group size and reason (what CI's short summary shows)."""
    reports = {peer.name: peer.round_info(round_number)["report"] for peer in peers}
    outcomes = {
        name: (report["outcome"], report.get("group_size"), report.get("reason", ""))
        for name, report in reports.items()
    }
    assert {outcome for outcome, _, _ in outcomes.values()} == {expected}, outcomes


def swarm_diagnosis(peers: Sequence[PeerProcess], log_lines: int = 25) -> str:
    """Each peer's round outcomes with their reasons and the tail of its log: what a failed swarm
    test needs to be understood from CI's output alone."""
    sections = []
    for peer in peers:
        rounds = []
        for round_number in peer.rounds_written():
            with contextlib.suppress(OSError, ValueError, KeyError):
                report = peer.round_info(round_number)["report"]
                rounds.append(f"  round {round_number}: {report['outcome']} {report.get('reason', '')}".rstrip())
        tail = peer.log_path.read_text(errors="replace").splitlines()[-log_lines:] if peer.log_path.exists() else []
        sections.append("\n".join([f"{peer.name}:", *rounds, "  log tail:", *(f"    {line}" for line in tail)]))
    return "\n".join(sections)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed swarm test's report carries :func:`swarm_diagnosis` of its peers (before teardown kills them)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    swarm = getattr(item, "funcargs", {}).get("local_swarm")  # lab swarms print theirs (test_nat.lab_swarm)
    if swarm is not None and swarm.peers:
        report.sections.append(("swarm peers: rounds and log tails", swarm_diagnosis(swarm.peers)))


def pre_fusion(peer, round_number: int, part: str) -> dict:
    """The ``body`` or ``head`` tensors a peer saved before fusing ``round_number`` (save_local_body)."""
    tensors = load_file(round_dir(peer, round_number) / PRE_FUSION_FILE)
    prefix = f"{part}."
    return {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


@dataclasses.dataclass(frozen=True)
class AttackDrift:
    """How far a fused base sits from the honest peers' mean, in typical honest updates."""

    plain: float  # where the plain mean of what everyone sent would sit
    fused: float  # where the honest peers' fused base sits (they all hold the same one)
    learned: float  # how far the fused base moved from the start, as a share of the honest mean's move


def attack_drift(model_dir: Path, honest: Sequence, attacker, scale: float, round_number: int = 1) -> AttackDrift:
    """Measure a round in which ``attacker`` sent ``scale`` times its update (``SCALE_UPDATE_ENV``);
    asserts the honest peers fused one finite body (each member adds ``average - own part``)."""
    start_state = AutoModel.from_pretrained(model_dir).state_dict()
    fused_states = [load_body_state(round_dir(peer, round_number)) for peer in honest]
    names = sorted(fused_states[0])

    def flat(state: dict) -> torch.Tensor:
        return torch.cat([state[name].float().reshape(-1) for name in names])

    start = flat(start_state)
    fused = [flat(state) for state in fused_states]
    assert all(torch.isfinite(body).all() for body in fused)
    assert all(torch.allclose(body, fused[0], atol=1e-6) for body in fused), "the honest members disagree"
    trained = [flat(pre_fusion(peer, round_number, "body")) for peer in [*honest, attacker]]
    sent = [*trained[:-1], start + scale * (trained[-1] - start)]
    honest_mean = torch.stack(trained[:-1]).mean(0)
    typical = float(torch.stack([(body - start).norm() for body in trained[:-1]]).median())
    return AttackDrift(
        plain=float((torch.stack(sent).mean(0) - honest_mean).norm()) / typical,
        fused=float((fused[0] - honest_mean).norm()) / typical,
        learned=float((fused[0] - start).norm()) / float((honest_mean - start).norm()),
    )


def cli_output(*arguments: str) -> str:
    """A quick ``coldfusion-peer`` command (identity, invite) run in this process; it must succeed.
    A process each would cost ~5 s of imports on 2 cores, and a moderated swarm needs several."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main(list(arguments))
    assert code == 0, printed.getvalue()
    return printed.getvalue()
