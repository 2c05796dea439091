"""A network lab for tests and benchmarks: public hosts and NATed home networks in Linux network namespaces.

Peers on 127.0.0.1 all reach each other directly, so they never exercise what real users hit: home
routers that let nothing in, firewalls that let only TCP out, slow uplinks, cables pulled mid-round.
``NetLab`` builds that in network namespaces (root only, nothing outside its own namespaces is touched):

    internet namespace: a bridge, 11.77.0.0/24, no route to any 192.168.x network
      bootstrap  11.77.0.2        public hosts: reachable by everyone
      public     11.77.0.3
      home1-gw   11.77.0.11  --  LAN 192.168.1.1/24  --  home1  192.168.1.2 (default route: its router)
      home2-gw   11.77.0.12  --  LAN 192.168.2.1/24  --  home2  192.168.2.2
      ...        (strict homes are numbered after the plain ones)

Each router masquerades its LAN behind its WAN address (a port-preserving Linux NAT, like most home
routers, so TCP hole punching can succeed as it does in the wild) and forwards WAN→LAN only packets of
connections opened from inside. Nothing unsolicited reaches a home host or its router. A *strict*
home's router forwards only TCP out (no UDP, no ICMP): an outbound-only corporate firewall.

    with NetLab(strict_homes=("home3",), home_rate_mbit=20) as lab:
        home = lab.hosts["home1"]
        subprocess.run(home.command(["python3", "-c", "..."]), timeout=30)
        lab.cut("home1")     # the home's link drops everything, established connections too
        lab.repair("home1")

IPv6 is disabled in every lab namespace, so IPv4 (and its NAT) is the only way between hosts.
Namespace names carry the creating pid (``cfl-<pid>-<serial>-<role>``): concurrent labs never collide,
and ``sweep_stale_labs`` (run by every new lab) removes those whose creator died without closing them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache

NAMESPACE_PREFIX = "cfl"
_NAMESPACE_PATTERN = re.compile(rf"^{NAMESPACE_PREFIX}-(\d+)-(\d+)-([a-z0-9-]+)$")
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,15}$")
COMMAND_TIMEOUT = 20.0  # seconds for any one ip/tc/iptables call: they take milliseconds unless wedged
KILL_TIMEOUT = 10.0  # seconds close() waits for killed processes to leave a namespace

# The /24 the bridge, the public hosts and the routers' WAN sides share. It must be one libp2p counts as
# public (go-multiaddr's IsPublicAddr: not 10/8, 100.64/10, 172.16/12, 192.168/16, nor a documentation
# range): a relay only reserves slots with its public addresses, so on 10.x no peer ever got a relayed
# address. The addresses exist inside the lab's namespaces alone, which have no route anywhere else.
INTERNET = "11.77.0"
FIRST_PUBLIC = 2  # bootstrap 11.77.0.2, public 11.77.0.3, ...
FIRST_ROUTER = 11  # home routers' WAN addresses: 11.77.0.11, .12, ...
MAX_PUBLIC_HOSTS = FIRST_ROUTER - FIRST_PUBLIC
MAX_HOMES = 200

# tbf: a burst of ~4 ms of traffic (at least 16 KiB) lets TCP fill the link without the bucket's
# granularity showing; a 50 ms queue absorbs a window's worth without bufferbloat. tbf counts whole
# frames, so TCP's goodput is ~95.6% of the rate (1448 payload bytes per 1514-byte frame): measured
# here, 19.1 Mbit/s each way on a 20 Mbit/s link.
TBF_BURST_SECONDS = 0.004
TBF_MIN_BURST_BYTES = 16 * 1024
TBF_LATENCY_MS = 50

_serials = itertools.count()


class NetLabError(RuntimeError):
    """A lab command failed: the message names the command and its stderr."""


@dataclass(frozen=True)
class Host:
    """A machine of the lab: its own network namespace and IPv4 address (a home host's is private)."""

    name: str
    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (same filesystem and environment, own network)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _run(argv: list[str], *, check: bool = True, input: str | None = None, timeout: float = COMMAND_TIMEOUT):
    """Run one command, bounded in time; a failure raises with the command and its stderr."""
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise NetLabError(f"{' '.join(argv)}: no answer within {timeout:.0f}s") from error
    except OSError as error:
        raise NetLabError(f"{' '.join(argv)}: {error}") from error
    if check and result.returncode != 0:
        raise NetLabError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _in(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


_iptables = "iptables"  # the variant the probe found working (nft or legacy); set by lab_unavailable_reason


def iptables_variant() -> str:
    """The iptables the lab uses ("iptables", "iptables-nft" or "iptables-legacy": the first that works in
    a namespace), for reading its rules with ``<variant>-save``. Valid once ``lab_unavailable_reason()`` ran."""
    return _iptables


def _iptables_command(namespace: str, *rule: str) -> list[str]:
    return _in(namespace, _iptables, "-w", "5", *rule)  # -w: legacy iptables' lock is machine-wide


@cache
def lab_unavailable_reason() -> str | None:
    """None when this machine can run a lab (root, ``ip``, ``tc``, a working ``iptables`` with NAT and
    conntrack in a namespace); else a one-line reason, for ``pytest.skip``. Probes once per process."""
    global _iptables
    if not sys.platform.startswith("linux"):
        return "network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "network lab needs root (network namespaces, iptables, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network lab needs `{tool}` (iproute2)"
    variants = [name for name in ("iptables", "iptables-nft", "iptables-legacy") if shutil.which(name)]
    if not variants:
        return "network lab needs iptables (apt-get install -y iptables)"
    probe = f"{NAMESPACE_PREFIX}-{os.getpid()}-{next(_serials)}-probe"
    failures = []
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "probea", "type", "veth", "peer", "name", "probeb"])
        _run(["ip", "-n", probe, "link", "set", "probea", "up"])
        _run(f"tc -n {probe} qdisc replace dev probea root tbf rate 1mbit burst 16k latency 50ms".split())
        for variant in variants:
            try:  # the router's own rule set, as the lab loads it, and one rule the way cut() adds them
                _run(_in(probe, f"{variant}-restore", "-w", "5"), input=_router_rules("probea", "lo", strict=True))
                _run(f"ip netns exec {probe} {variant} -w 5 -I FORWARD 1 -m comment --comment probe -j DROP".split())
            except NetLabError as error:
                failures.append(str(error))
                continue
            _iptables = variant
            return None
        return "network lab: iptables does not work in a namespace: " + failures[-1].splitlines()[0]
    except NetLabError as error:
        return "network lab unavailable: " + str(error).splitlines()[0]
    finally:
        with contextlib.suppress(NetLabError):
            _destroy_namespaces([probe])


def _lab_namespaces() -> list[str]:
    """Every namespace on this machine named like a lab's (any process's)."""
    listing = _run(["ip", "netns", "list"]).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if _NAMESPACE_PATTERN.match(name)]


def _process_start(pid: int) -> float | None:
    """Wall-clock start of ``pid``, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as stat:
            boot = next(float(line.split()[1]) for line in stat if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def sweep_stale_labs() -> None:
    """Delete namespaces (and the processes still inside) left by labs whose creating process is dead:
    a test killed by a timeout or SIGKILL never ran its ``finally``. A pid reused since counts as dead
    (the process started after the namespace was made); live labs of other processes are left alone."""
    stale = []
    for name in _lab_namespaces():
        pid = int(_NAMESPACE_PATTERN.match(name).group(1))
        if pid == os.getpid():
            continue
        started = _process_start(pid)
        try:
            created = os.stat(f"/run/netns/{name}").st_mtime
        except OSError:
            continue  # deleted meanwhile
        if started is None or started > created + 1.0:  # /proc start times have a 1 s resolution (btime)
            stale.append(name)
    _destroy_namespaces(stale)


def _namespace_pids(namespace: str) -> list[int]:
    result = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _destroy_namespaces(namespaces: list[str]) -> None:
    """Kill every process inside ``namespaces`` (a namespace outlives its deletion while one is left,
    and its veths with it), then delete them, which removes their veths and the bridge. Tries all,
    then raises the first failure."""
    existing = set(_lab_namespaces()) | {name for name in namespaces if os.path.exists(f"/run/netns/{name}")}
    namespaces = [name for name in namespaces if name in existing]
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        pids = {pid for name in namespaces for pid in _namespace_pids(name)} - {os.getpid()}
        if not pids:
            break
        if time.monotonic() > deadline:
            raise NetLabError(f"processes {sorted(pids)} still inside {namespaces} after SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    failures = []
    for name in namespaces:
        try:
            _run(["ip", "netns", "delete", name])
        except NetLabError as error:
            failures.append(error)
    if failures:
        raise failures[0]


def _base36(number: int, width: int) -> str:
    digits = ""
    while number or len(digits) < width:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
    return digits


@dataclass(frozen=True)
class _Home:
    router: Host
    host: Host
    wan: str  # the router's interface on the internet bridge: its egress is the home's upload
    lan: str  # the router's interface toward the home host: its egress is the home's download
    strict: bool


class NetLab:
    """Public hosts and NATed homes in network namespaces; a context manager that always tears down.

    ``hosts``: "bootstrap", "public" (or ``public_hosts``) and every home, by name; ``routers``: each
    home's router (its ``address`` is the home's public, WAN address: what a public peer sees).
    ``home_rate_mbit``: shape every home link to that rate, both ways, from the start (None: unshaped);
    ``home_upload_mbit``: its upload to that rate instead (an asymmetric line).
    """

    def __init__(
        self,
        homes: tuple[str, ...] = ("home1", "home2"),
        strict_homes: tuple[str, ...] = (),
        home_rate_mbit: float | None = None,
        home_upload_mbit: float | None = None,
        public_hosts: tuple[str, ...] = ("bootstrap", "public"),
    ):
        names = [*public_hosts, *homes, *strict_homes]
        bad = [name for name in names if not _NAME_PATTERN.match(name)]
        if bad:
            raise ValueError(f"host names must be a lowercase letter then up to 15 letters/digits: {bad}")
        if "internet" in names:
            raise ValueError("'internet' names the lab's bridge namespace; pick another host name")
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        if len(public_hosts) > MAX_PUBLIC_HOSTS or len(homes) + len(strict_homes) > MAX_HOMES:
            raise ValueError(f"at most {MAX_PUBLIC_HOSTS} public hosts and {MAX_HOMES} homes")
        reason = lab_unavailable_reason()
        if reason is not None:
            raise NetLabError(reason)
        serial = next(_serials)
        pid = os.getpid()
        self.id = f"{pid}-{serial}"
        self._prefix = f"{NAMESPACE_PREFIX}-{self.id}-"
        # Interface names (15 characters at most) start with this lab's tag, unique among live labs.
        self._tag = f"c{_base36(pid, 5)}{_base36(serial % 36**2, 2)}"
        self._namespaces: list[str] = []
        self._homes: dict[str, _Home] = {}
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Host] = {}
        self._closed = False
        atexit.register(self.close)  # a test process that exits without closing still cleans up
        try:
            sweep_stale_labs()
            self._internet = self._add_namespace("internet")
            _run(["ip", "-n", self._internet, "link", "add", "bridge", "type", "bridge"])
            _run(["ip", "-n", self._internet, "link", "set", "bridge", "up"])
            for index, name in enumerate(public_hosts):
                self._add_public(index, name)
            for index, name in enumerate([*homes, *strict_homes]):
                self._add_home(index, name, strict=name in strict_homes)
            if home_rate_mbit is not None:
                for name in self._homes:
                    self.shape(name, home_rate_mbit, home_upload_mbit)
        except BaseException:
            self.close()
            raise

    @property
    def homes(self) -> tuple[str, ...]:
        """Every home's name, plain and strict, in creation order."""
        return tuple(self._homes)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _add_namespace(self, role: str) -> str:
        name = self._prefix + role
        self._namespaces.append(name)  # before creating: close() removes it even if a later step fails
        _run(["ip", "netns", "add", name])
        settings = []
        if os.path.exists("/proc/sys/net/ipv6"):
            settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if role.endswith("-gw"):
            settings.append("net.ipv4.ip_forward=1")
        if settings:
            _run(_in(name, "sysctl", "-q", "-w", *settings))
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def _veth(self, namespace: str, interface: str, peer_namespace: str, peer: str) -> None:
        """A veth pair made directly in its two namespaces: it never appears in the machine's own."""
        _run(f"ip link add {interface} netns {namespace} type veth peer name {peer} netns {peer_namespace}".split())
        _run(["ip", "-n", namespace, "link", "set", interface, "up"])
        _run(["ip", "-n", peer_namespace, "link", "set", peer, "up"])

    def _attach(self, namespace: str, interface: str, address: str) -> None:
        """A veth from ``namespace`` to the internet bridge, ``address`` on its end."""
        bridge_port = f"{interface}b"
        self._veth(namespace, interface, self._internet, bridge_port)
        _run(["ip", "-n", self._internet, "link", "set", bridge_port, "master", "bridge"])
        _run(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface])

    def _add_public(self, index: int, name: str) -> None:
        namespace = self._add_namespace(name)
        address = f"{INTERNET}.{FIRST_PUBLIC + index}"
        self._attach(namespace, f"{self._tag}p{index}", address)
        self.hosts[name] = Host(name, namespace, address)

    def _add_home(self, index: int, name: str, strict: bool) -> None:
        router_namespace = self._add_namespace(f"{name}-gw")
        namespace = self._add_namespace(name)
        wan, lan, inside = f"{self._tag}w{index}", f"{self._tag}l{index}", f"{self._tag}h{index}"
        router_address = f"{INTERNET}.{FIRST_ROUTER + index}"
        lan_prefix = f"192.168.{index + 1}"
        self._attach(router_namespace, wan, router_address)
        self._veth(router_namespace, lan, namespace, inside)
        _run(["ip", "-n", router_namespace, "addr", "add", f"{lan_prefix}.1/24", "dev", lan])
        _run(["ip", "-n", namespace, "addr", "add", f"{lan_prefix}.2/24", "dev", inside])
        _run(["ip", "-n", namespace, "route", "add", "default", "via", f"{lan_prefix}.1"])
        _run(_in(router_namespace, f"{_iptables}-restore", "-w", "5"), input=_router_rules(wan, lan, strict))
        self.routers[name] = Host(f"{name}-gw", router_namespace, router_address)
        self.hosts[name] = Host(name, namespace, f"{lan_prefix}.2")
        self._homes[name] = _Home(self.routers[name], self.hosts[name], wan, lan, strict)

    def _home(self, name: str) -> _Home:
        if self._closed:
            raise NetLabError("the lab is closed")
        if name not in self._homes:
            raise KeyError(f"no home {name!r} in this lab (homes: {', '.join(self._homes)})")
        return self._homes[name]

    def _cut_rules(self, home: _Home) -> list[list[str]]:
        return [
            ["-i", home.lan, "-o", home.wan, "-m", "comment", "--comment", "netlab-cut", "-j", "DROP"],
            ["-i", home.wan, "-o", home.lan, "-m", "comment", "--comment", "netlab-cut", "-j", "DROP"],
        ]

    def _has_rule(self, namespace: str, rule: list[str]) -> bool:
        result = _run(_iptables_command(namespace, "-C", "FORWARD", *rule), check=False)
        if result.returncode not in (0, 1):
            raise NetLabError(f"iptables -C FORWARD {' '.join(rule)} in {namespace}: {result.stderr.strip()}")
        return result.returncode == 0

    def cut(self, home: str) -> None:
        """Pull the home's cable: its router drops everything it would forward, both ways, ahead of every
        other rule, so established connections stall too (their conntrack entries survive, so TCP resumes
        after ``repair`` if it has not given up). Idempotent."""
        entry = self._home(home)
        for rule in self._cut_rules(entry):
            if not self._has_rule(entry.router.namespace, rule):
                _run(_iptables_command(entry.router.namespace, "-I", "FORWARD", "1", *rule))

    def repair(self, home: str) -> None:
        """Undo ``cut``. Idempotent."""
        entry = self._home(home)
        for rule in self._cut_rules(entry):
            while self._has_rule(entry.router.namespace, rule):
                _run(_iptables_command(entry.router.namespace, "-D", "FORWARD", *rule))

    def shape(self, home: str, rate_mbit: float | None, upload_mbit: float | None = None) -> None:
        """Limit the home's link to ``rate_mbit`` Mbit/s each way, or its upload to ``upload_mbit`` (an
        asymmetric home line; tbf on the router: WAN egress is the upload, LAN egress the download);
        None removes the limit."""
        entry = self._home(home)
        namespace = entry.router.namespace
        for interface in (entry.wan, entry.lan):
            rate = upload_mbit if interface == entry.wan and upload_mbit is not None else rate_mbit
            if rate is None:
                shown = _run(["tc", "-n", namespace, "qdisc", "show", "dev", interface, "root"]).stdout
                if "tbf" in shown:
                    _run(["tc", "-n", namespace, "qdisc", "del", "dev", interface, "root"])
                continue
            if rate <= 0:
                raise ValueError(f"rates must be positive or None, not {rate}")
            rate_bits = round(rate * 1e6)
            burst = max(TBF_MIN_BURST_BYTES, round(rate_bits / 8 * TBF_BURST_SECONDS))
            tbf = f"tbf rate {rate_bits}bit burst {burst} latency {TBF_LATENCY_MS}ms"
            _run(f"tc -n {namespace} qdisc replace dev {interface} root {tbf}".split())

    def close(self) -> None:
        """Kill every process still inside the lab's namespaces and delete them (their veths and the
        bridge go with them). Idempotent; safe after a set-up that failed half-way."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        leftovers = [name for name in _lab_namespaces() if name.startswith(self._prefix)]
        _destroy_namespaces(list(dict.fromkeys([*self._namespaces, *leftovers])))


def _router_rules(wan: str, lan: str, strict: bool) -> str:
    """A home router's whole firewall, for iptables-restore: masquerade the LAN behind the WAN address;
    let out what the LAN opens (only TCP when ``strict``) and back in only its replies; nothing
    unsolicited reaches the LAN or the router itself."""
    outbound = f"-A FORWARD -i {lan} -o {wan} -p tcp -j ACCEPT" if strict else f"-A FORWARD -i {lan} -o {wan} -j ACCEPT"
    return "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            f"-A POSTROUTING -o {wan} -j MASQUERADE",
            "COMMIT",
            "*filter",
            ":INPUT DROP [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A INPUT -i lo -j ACCEPT",
            f"-A INPUT -i {lan} -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A FORWARD -i {wan} -o {lan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            outbound,
            "COMMIT",
            "",
        ]
    )
