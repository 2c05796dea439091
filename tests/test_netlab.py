"""The network lab's self-test: NAT, unreachable homes, the strict firewall, shaping, cuts and teardown,
each checked with real TCP/UDP traffic between small Python processes inside the lab's namespaces."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

import pytest
from netlab import INTERNET, NAMESPACE_PREFIX, NetLab, iptables_variant, lab_unavailable_reason, sweep_stale_labs

REASON = lab_unavailable_reason()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

STEP_TIMEOUT = 10.0  # seconds for any one expected line of a helper's output

# One helper for every server and client: `python -c AGENT <role> ...`. It kills itself (SIGALRM) after
# a minute, so a crashed test never leaves it behind, and reports on stdout, one line per event.
AGENT = r"""
import signal, socket, sys, time
signal.alarm(60)
role, args = sys.argv[1], sys.argv[2:]
say = lambda *words: print(*words, flush=True)

def receive(connection, total):
    got, first = 0, None
    while got < total:
        chunk = connection.recv(1 << 16)
        if not chunk:
            break
        if first is None:
            first, got = time.monotonic(), got + len(chunk)  # the clock starts at the first byte
            head = len(chunk)
        else:
            got += len(chunk)
    elapsed = time.monotonic() - first
    return got, (got - head) * 8 / elapsed

if role == "tcp-server":  # tcp-server echo|sink N|source N
    mode = args[0]
    listener = socket.create_server(("0.0.0.0", 0))
    say("listening", listener.getsockname()[1])
    while True:
        connection, peer = listener.accept()
        say("peer", peer[0])
        if mode == "sink":
            got, rate = receive(connection, int(args[1]))
            connection.sendall(b"done")
            say("rate", got, rate)
        elif mode == "source":
            connection.sendall(b"x" * int(args[1]))
            connection.close()
        else:
            import threading
            def echo(connection=connection):
                while data := connection.recv(4096):
                    connection.sendall(data)
            threading.Thread(target=echo, daemon=True).start()
elif role == "udp-server":
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 0))
    say("listening", server.getsockname()[1])
    while True:
        data, peer = server.recvfrom(4096)
        say("peer", peer[0])
        server.sendto(data, peer)
elif role == "connect":  # connect HOST PORT TIMEOUT: open, echo one line, report
    try:
        connection = socket.create_connection((args[0], int(args[1])), timeout=float(args[2]))
        connection.sendall(b"hello")
        say("echo", connection.recv(100).decode())
    except OSError as error:
        say("failed", type(error).__name__)
elif role == "udp":  # udp HOST PORT TIMEOUT
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(float(args[2]))
    try:
        client.sendto(b"hello", (args[0], int(args[1])))
        say("echo", client.recv(100).decode())
    except OSError as error:
        say("failed", type(error).__name__)
elif role == "send":  # send HOST PORT N: upload N bytes to a sink
    connection = socket.create_connection((args[0], int(args[1])), timeout=10)
    connection.sendall(b"x" * int(args[2]))
    say("sent", connection.recv(100).decode())
elif role == "receive":  # receive HOST PORT N: download N bytes from a source
    connection = socket.create_connection((args[0], int(args[1])), timeout=10)
    got, rate = receive(connection, int(args[2]))
    say("rate", got, rate)
elif role == "session":  # session HOST PORT: one connection, driven by stdin lines `send WORD` / `recv SECONDS`
    connection = socket.create_connection((args[0], int(args[1])), timeout=5)
    say("connected")
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "send":
            connection.sendall(argument.encode())
            say("sent")
        else:
            connection.settimeout(float(argument))
            try:
                say("got", connection.recv(100).decode())
            except TimeoutError:
                say("timeout")
"""


class Agent:
    """One AGENT process inside a host's namespace; ``line()`` waits (bounded) for its next output line."""

    def __init__(self, host, *args: str):
        self.process = subprocess.Popen(
            host.command([sys.executable, "-c", AGENT, *args]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def line(self, timeout: float = STEP_TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.process.args[-3:]} within {timeout}s") from None
        if line is None:
            raise AssertionError(f"agent exited: {self.process.wait(5)}: {self.process.stderr.read()}")
        return line

    def tell(self, text: str) -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture
def agents():
    """``agents(host, *args)`` starts an Agent; all are killed and waited for at the test's end."""
    started: list[Agent] = []

    def start(host, *args: str) -> Agent:
        started.append(Agent(host, *args))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def lab():
    with NetLab(strict_homes=("home3",)) as lab:
        yield lab


def server(agents, host, *args: str) -> tuple[Agent, int]:
    """A server Agent on ``host`` (a TCP echo server unless ``args`` say otherwise) and its port."""
    agent = agents(host, *(args or ("tcp-server", "echo")))
    word, port = agent.line().split()
    assert word == "listening"
    return agent, int(port)


def attempt(host, role: str, address: str, port: int, timeout: float = 1.0) -> str:
    """One ``connect``/``udp`` try from ``host``: "echo hello" on success, else "failed <error>"."""
    argv = host.command([sys.executable, "-c", AGENT, role, address, str(port), str(timeout)])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + STEP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def lab_names() -> tuple[list[str], str]:
    """This process's lab namespaces, and the machine's interface listing."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, timeout=10).stdout
    mine = f"{NAMESPACE_PREFIX}-{os.getpid()}-"
    return [line.split()[0] for line in namespaces.splitlines() if line.startswith(mine)], links


def test_homes_reach_the_public_host_through_nat(lab, agents):
    echo, port = server(agents, lab.hosts["public"])
    for home in ("home1", "home2", "home3"):
        assert attempt(lab.hosts[home], "connect", f"{INTERNET}.3", port) == "echo hello"
        assert echo.line() == f"peer {lab.routers[home].address}"  # the router's WAN address: NAT happened
    assert lab.hosts["home1"].address == "192.168.1.2" and lab.routers["home1"].address == f"{INTERNET}.11"


def test_nothing_reaches_a_home_from_outside(lab, agents):
    home1, router1 = lab.hosts["home1"], lab.routers["home1"]
    _, port = server(agents, home1)
    assert attempt(router1, "connect", home1.address, port) == "echo hello"  # it listens, on its LAN
    public = lab.hosts["public"]
    began = time.monotonic()
    assert attempt(public, "connect", home1.address, port).startswith("failed")  # no route to 192.168.x
    assert attempt(public, "connect", router1.address, port) == "failed TimeoutError"  # dropped, not even refused
    # Even a public host that knows the way (a route via the router) is dropped at the router:
    subprocess.run(public.command(["ip", "route", "add", "192.168.1.0/24", "via", router1.address]), timeout=10)
    assert attempt(public, "connect", home1.address, port) == "failed TimeoutError"
    for other in ("home2", "home3"):  # nor does another home, by the private or the public address
        assert attempt(lab.hosts[other], "connect", home1.address, port).startswith("failed")
        assert attempt(lab.hosts[other], "connect", router1.address, port) == "failed TimeoutError"
    assert time.monotonic() - began < 30


# An ICMP echo request from a raw socket (no `ping` binary needed): prints "reply" or "timeout".
PING = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(1.0)
packet = bytes([8, 0]) + b"\0\0" + b"\x12\x34\0\1"
checksum = sum(int.from_bytes(packet[i:i + 2], "big") for i in range(0, len(packet), 2))
checksum = ~((checksum & 0xFFFF) + (checksum >> 16)) & 0xFFFF
s.sendto(packet[:2] + checksum.to_bytes(2, "big") + packet[4:], (sys.argv[1], 0))
try:
    while True:
        reply = s.recv(100)
        if reply[20] == 0:
            print("reply"); break
except TimeoutError:
    print("timeout")
"""


def test_the_strict_home_gets_only_tcp_out(lab, agents):
    _, tcp_port = server(agents, lab.hosts["public"])
    udp, udp_port = server(agents, lab.hosts["public"], "udp-server")
    assert attempt(lab.hosts["home1"], "udp", f"{INTERNET}.3", udp_port) == "echo hello"  # a plain home: UDP works
    assert udp.line() == f"peer {INTERNET}.11"
    assert attempt(lab.hosts["home3"], "connect", f"{INTERNET}.3", tcp_port) == "echo hello"
    assert attempt(lab.hosts["home3"], "udp", f"{INTERNET}.3", udp_port) == "failed TimeoutError"
    ping = subprocess.run(  # ICMP neither: a raw echo request gets no reply
        lab.hosts["home3"].command([sys.executable, "-c", PING, f"{INTERNET}.3"]), capture_output=True, timeout=10
    )
    assert ping.stdout.split() == [b"timeout"], ping
    ping = subprocess.run(
        lab.hosts["home1"].command([sys.executable, "-c", PING, f"{INTERNET}.3"]), capture_output=True, timeout=10
    )
    assert ping.stdout.split() == [b"reply"], ping


RATE_BYTES = 4_000_000  # 1.6 s at 20 Mbit/s


def measured_mbit(agent: Agent) -> float:
    word, got, rate = agent.line(timeout=30).split()
    assert word == "rate" and int(got) == RATE_BYTES
    return float(rate) / 1e6


def test_shape_limits_both_directions(lab, agents):
    home, public = lab.hosts["home1"], lab.hosts["public"]
    lab.shape("home1", 20)
    sink, sink_port = server(agents, public, "tcp-server", "sink", str(RATE_BYTES))
    sender = agents(home, "send", public.address, str(sink_port), str(RATE_BYTES))
    assert sink.line() == f"peer {INTERNET}.11"
    upload = measured_mbit(sink)
    assert sender.line(timeout=30) == "sent done"
    _, source_port = server(agents, public, "tcp-server", "source", str(RATE_BYTES))
    download = measured_mbit(agents(home, "receive", public.address, str(source_port), str(RATE_BYTES)))
    assert 17 <= upload <= 23 and 17 <= download <= 23, (upload, download)
    lab.shape("home1", None)
    lab.shape("home1", None)  # idempotent
    unshaped = measured_mbit(agents(home, "receive", public.address, str(source_port), str(RATE_BYTES)))
    assert unshaped > 60, unshaped
    print(f"20 Mbit/s link: upload {upload:.1f}, download {download:.1f} Mbit/s; unshaped {unshaped:.0f} Mbit/s")


def test_cut_stalls_established_and_new_connections_until_repair(lab, agents):
    public = lab.hosts["public"]
    _, port = server(agents, public)
    session = agents(lab.hosts["home1"], "session", public.address, str(port))
    assert session.line() == "connected"
    session.tell("send one")
    session.tell("recv 5")
    assert session.line() == "sent" and session.line() == "got one"
    lab.cut("home1")
    lab.cut("home1")  # idempotent
    session.tell("send two")
    session.tell("recv 1")
    assert session.line() == "sent" and session.line() == "timeout"  # the established connection stalls
    assert attempt(lab.hosts["home1"], "connect", public.address, port) == "failed TimeoutError"
    assert attempt(lab.hosts["home2"], "connect", public.address, port) == "echo hello"  # only home1 is cut
    lab.repair("home1")
    lab.repair("home1")  # idempotent
    session.tell("recv 8")  # TCP retransmits "two" (its timer backs off: 0.2, 0.4, 0.8, 1.6 s...)
    assert session.line(timeout=15) == "got two"
    assert attempt(lab.hosts["home1"], "connect", public.address, port) == "echo hello"
    rules = subprocess.run(
        lab.routers["home1"].command([f"{iptables_variant()}-save"]), capture_output=True, text=True, timeout=10
    )
    assert "netlab-cut" not in rules.stdout


def test_close_removes_everything_even_when_the_body_raises():
    before, _ = lab_names()
    with pytest.raises(RuntimeError, match="the test body failed"), NetLab(strict_homes=("home3",)) as lab:
        sleeper = subprocess.Popen(lab.hosts["home1"].command(["sleep", "300"]))
        router_sleeper = subprocess.Popen(lab.routers["home3"].command(["sleep", "300"]))
        namespaces, _ = lab_names()
        assert len(namespaces) == len(before) + 9  # internet, bootstrap, public, 3 homes, 3 routers
        raise RuntimeError("the test body failed")
    assert sleeper.wait(timeout=5) == -9 and router_sleeper.wait(timeout=5) == -9  # killed by close()
    after, links = lab_names()
    assert after == before
    assert lab._tag not in links  # no veth of the lab in the machine's own namespace
    assert not any(lab._tag in line for line in links.splitlines())
    lab.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        lab.cut("home1")


def test_a_set_up_failing_half_way_leaves_nothing(monkeypatch):
    before, _ = lab_names()
    built = []
    add_home = NetLab._add_home

    def second_home_fails(self, index, name, strict):
        if built:
            raise OSError("set-up failed half-way")
        add_home(self, index, name, strict)
        built.append(name)

    monkeypatch.setattr(NetLab, "_add_home", second_home_fails)
    with pytest.raises(OSError, match="half-way"):
        NetLab()
    assert built == ["home1"]
    assert lab_names()[0] == before


LAB_CREATOR = r"""
import os, signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
from netlab import NetLab
lab = NetLab()
subprocess.Popen(lab.hosts["home1"].command(["sleep", "300"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(os.getpid(), flush=True)
if sys.argv[2] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: the lab stays behind
"""  # else it just exits without closing the lab: the atexit fallback removes it


def namespaces_of(pid: int) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{NAMESPACE_PREFIX}-{pid}-")]


def test_a_lab_left_by_a_dead_process_is_swept_and_an_exiting_one_closes_itself():
    tests = os.path.dirname(os.path.abspath(__file__))
    killed = subprocess.run([sys.executable, "-c", LAB_CREATOR, tests, "sigkill"], capture_output=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    dead = int(killed.stdout)
    assert len(namespaces_of(dead)) == 7
    live = f"{NAMESPACE_PREFIX}-{os.getpid()}-999999-home1"  # named as a lab of this process: alive
    subprocess.run(["ip", "netns", "add", live], check=True, timeout=10)
    try:
        sweep_stale_labs()
        assert namespaces_of(dead) == []  # its sleeper went with it (else the leak reaper fails this test)
        assert namespaces_of(os.getpid()) == [live]
    finally:
        subprocess.run(["ip", "netns", "delete", live], capture_output=True, timeout=10)
    exited = subprocess.run([sys.executable, "-c", LAB_CREATOR, tests, "exit"], capture_output=True, timeout=60)
    assert exited.returncode == 0, exited.stderr
    assert namespaces_of(int(exited.stdout)) == []


def test_constructor_options_shape_every_home():
    with NetLab(homes=("alpha",), strict_homes=("beta",), home_rate_mbit=8, public_hosts=("seed",)) as lab:
        assert sorted(lab.hosts) == ["alpha", "beta", "seed"] and lab.homes == ("alpha", "beta")
        assert lab.hosts["seed"].address == f"{INTERNET}.2" and lab.hosts["beta"].address == "192.168.2.2"
        for home in lab.homes:
            shown = subprocess.run(
                lab.routers[home].command(["tc", "qdisc", "show"]), capture_output=True, text=True, timeout=10
            ).stdout
            assert shown.count("tbf") == 2 and "rate 8Mbit" in shown, shown
    with NetLab(homes=("alpha",), home_rate_mbit=20, home_upload_mbit=5, public_hosts=("seed",)) as lab:
        router = lab.routers["alpha"]
        shown = subprocess.run(router.command(["tc", "qdisc", "show"]), capture_output=True, text=True, timeout=10)
        addresses = subprocess.run(router.command(["ip", "-o", "addr"]), capture_output=True, text=True, timeout=10)
        wan = next(line.split()[1] for line in addresses.stdout.splitlines() if f" {router.address}/" in line)
        rates = {line.split()[4]: line.split()[9] for line in shown.stdout.splitlines() if " tbf " in line}
        assert rates[wan] == "5Mbit" and sorted(rates.values()) == ["20Mbit", "5Mbit"], (rates, wan)
    with pytest.raises(ValueError, match="unique"):
        NetLab(homes=("home1", "home1"))
