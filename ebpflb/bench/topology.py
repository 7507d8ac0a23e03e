"""One fresh namespace cluster per benchmark mode, each with the same pods, servers and Services.

Every mode gets its own node namespace: a legacy iptables `nat` table cannot be
removed from a namespace once made, and keeps conntrack's hooks on, so eBPF and
direct figures must never share a namespace with netfilter rules. The node's
bridge passes bridged IPv4 through netfilter (br_netfilter) only where a
netfilter mode needs it (the reply from a backend to a client on the same bridge
is un-DNATed there, as on a real kube-proxy node); everywhere else
net.bridge.bridge-nf-call-iptables is 0.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ebpflb.bench import iptables, nftables
from ebpflb.bench.manifests import apply_all, fake_pod_objects, filler_objects, service_object
from ebpflb.bench.model import (
    EBPFLB_MODES,
    HTTP_PORT,
    IPERF_PORT,
    NETFILTER_MODES,
    FakePods,
    ServicePort,
    filler_services,
    measured_services,
)
from ebpflb.bench.probe import MapProbe, read_status
from ebpflb.client import RegistryClient
from ebpflb.cluster import Cluster, Netns, Node, Pod
from ebpflb.cluster.cgroups import attached_programs
from ebpflb.cluster.clients import ClientError, tcp_request
from ebpflb.cluster.netns import in_netns

BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
MEASURED = 2  # Services the figures go through (HTTP and iperf3), counted in a scale
FILLER_PODS = FakePods(groups=256, per_group=1)
"""Backends of the data-plane filler Services: which endpoints they have does not change
the cost of reaching the measured Service (kube-proxy never enters their chains)."""
NFT_BATCH = 1000  # Services per `nft -f` transaction (one big one is slower than batches)
HTTP_LABEL = {"bench-http": "yes"}
IPERF_LABEL = {"bench-iperf": "yes"}

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_timeout 0;
    default_type text/plain;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port} backlog=4096;
        location / {{
            return 200 "{name}\\n";
        }}
    }}
}}
"""


class ModeError(RuntimeError):
    """A mode's cluster could not be built or its Services installed."""


class BudgetExceeded(ModeError):
    """Installing the Services took longer than the run allows for it."""


def set_bridge_netfilter(ns: Netns, on: bool) -> bool:
    """Turn br_netfilter for IPv4 on or off in ns; False if the kernel has no such sysctl."""
    try:
        ns.set_sysctls({BRIDGE_NF: 1 if on else 0})
    except FileNotFoundError:
        return False
    return True


def bridge_netfilter(ns: Netns) -> str:
    """The sysctl's value in ns, or "absent"."""
    try:
        return ns.sysctl(BRIDGE_NF)
    except FileNotFoundError:
        return "absent"


def wait_listening(ns: Netns, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until a TCP socket listens on `port` in ns (checked with ss: no probe connection)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ModeError(f"server for port {port} in {ns.name} exited ({proc.returncode})")
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], timeout=10).stdout
        if out.strip():
            return
        if time.monotonic() > deadline:
            raise ModeError(f"nothing listens on port {port} in {ns.name} after {timeout}s")
        time.sleep(0.05)


def http_get(ns: Netns, ip: str, port: int, timeout: float = 2.0) -> str:
    """One HTTP/1.0 GET from ns; the body (the backend's name)."""
    answer = tcp_request(ns, ip, port, b"GET / HTTP/1.0\r\n\r\n", timeout=timeout)
    head, _, body = answer.partition("\r\n\r\n")
    if not head.startswith("HTTP/1.1 200"):
        raise ClientError(f"unexpected answer from {ip}:{port}: {head[:60]!r}")
    return body.strip()


def until_http(ns: Netns, ip: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(ns, ip, port)
            return
        except (OSError, ClientError) as e:
            if time.monotonic() > deadline:
                raise ModeError(f"{ip}:{port} does not answer from {ns.name}: {e}") from e
        time.sleep(0.1)


@dataclass(frozen=True)
class BenchPods:
    """Two HTTP backends (the first also runs iperf3) and a client pod."""

    servers: tuple[Pod, Pod]
    client: Pod

    @property
    def iperf(self) -> Pod:
        return self.servers[0]


def start_servers(cluster: Cluster, node: Node, timeout: float = 30.0) -> BenchPods:
    """The pods, with nginx (one worker each, no access log) and iperf3 -s running."""
    servers = (cluster.add_pod(node, "server-0"), cluster.add_pod(node, "server-1"))
    client = cluster.add_pod(node, "client")
    for pod in servers:
        ns = cluster.ns(pod)
        d = Path(tempfile.mkdtemp(prefix=f"nginx-{pod.name}-", dir=cluster.workdir))
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=HTTP_PORT, name=pod.name))
        proc = ns.popen(
            [
                "/usr/sbin/nginx",
                "-e",
                str(d / "error.log"),
                "-p",
                str(d),
                "-c",
                str(d / "nginx.conf"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(ns, HTTP_PORT, proc, timeout)
    ns = cluster.ns(servers[0])
    proc = ns.popen(
        ["iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(ns, IPERF_PORT, proc, timeout)
    # The client opens tens of thousands of connections a second: all the ports there are.
    cluster.ns(client).set_sysctls({"net.ipv4.ip_local_port_range": "1024 65535"})
    return BenchPods(servers, client)


class Mode(ABC):
    """A benchmark mode: its own cluster, the same pods, Services installed in its own way."""

    name: str
    cluster: Cluster
    pods: BenchPods
    http: ServicePort
    iperf: ServicePort

    def __init__(self) -> None:
        self.services = 0
        self.install_log: list[dict[str, float | int | str]] = []

    @property
    def node(self) -> Node:
        return self.cluster.nodes[0]

    @property
    def client_ns(self) -> Netns:
        return self.cluster.ns(self.pods.client)

    def _measured(self) -> None:
        self.http, self.iperf = measured_services(
            [p.ip for p in self.pods.servers], self.pods.iperf.ip
        )

    def http_targets(self) -> list[tuple[str, int]]:
        return [(self.http.vip, self.http.port)]

    def iperf_target(self) -> tuple[str, int]:
        return self.iperf.vip, self.iperf.port

    def check(self) -> None:
        """One request through the measured Service, from the client pod."""
        for ip, port in self.http_targets():
            until_http(self.client_ns, ip, port, timeout=30)

    @abstractmethod
    def install(self, total: int, budget: float) -> dict[str, float | int | str]:
        """Make `total` Services exist (the measured ones and total - MEASURED fillers)."""

    def memory(self) -> dict[str, dict[str, int]]:
        """Peak and current RSS (KiB) of the mode's control-plane processes."""
        return {}

    def describe(self) -> dict[str, str]:
        return {"bridge-nf-call-iptables": bridge_netfilter(self.cluster.ns(self.node))}

    @abstractmethod
    def close(self) -> None: ...


class DirectMode(Mode):
    """No load balancer: the client dials the backends' pod IPs (the ceiling)."""

    name = "direct"

    def __init__(self) -> None:
        super().__init__()
        self.cluster = Cluster(1, external=False)
        try:
            set_bridge_netfilter(self.cluster.ns(self.node), False)
            set_bridge_netfilter(self.cluster.ns(self.cluster.underlay), False)
            self.pods = start_servers(self.cluster, self.node)
            self._measured()
            self.check()
        except BaseException:
            self.close()
            raise

    def http_targets(self) -> list[tuple[str, int]]:
        return [(p.ip, HTTP_PORT) for p in self.pods.servers]

    def iperf_target(self) -> tuple[str, int]:
        return self.pods.iperf.ip, IPERF_PORT

    def install(self, total: int, budget: float) -> dict[str, float | int | str]:
        self.services = total
        return {"services": total, "seconds": 0.0}

    def close(self) -> None:
        self.cluster.close()


class EbpflbMode(Mode):
    """ebpflb: the registry and an agent in the node; Services applied through the registry.
    socket_lb: the agent also balances the node's pods at connect() (cgroup programs)."""

    def __init__(self, name: str = "ebpflb") -> None:
        from ebpflb.harness import LbCluster

        super().__init__()
        self.name = name
        self.socket_lb = EBPFLB_MODES[name]
        self.probe: MapProbe | None = None
        self.lb = LbCluster(1, socket_lb=self.socket_lb)
        self.cluster = self.lb.cluster
        self.fillers = 0
        try:
            set_bridge_netfilter(self.cluster.ns(self.node), False)
            set_bridge_netfilter(self.cluster.ns(self.cluster.underlay), False)
            self.pods = start_servers(self.cluster, self.node)
            self._measured()
            s0, s1 = self.pods.servers
            ports = [{"name": "http", "containerPort": HTTP_PORT}]
            self.lb.register_pod(
                s0,
                {**HTTP_LABEL, **IPERF_LABEL},
                [*ports, {"name": "iperf", "containerPort": IPERF_PORT}],
            )
            self.lb.register_pod(s1, HTTP_LABEL, ports)
            self.client = RegistryClient(self.lb.address, timeout=600)
            apply_all(self.client, fake_pod_objects(FILLER_PODS, self.node.name))
            apply_all(
                self.client,
                [service_object(self.http, HTTP_LABEL), service_object(self.iperf, IPERF_LABEL)],
            )
            for pod in (*self.pods.servers, self.pods.client):
                self.lb.wait_attached(pod)
            self.probe = MapProbe.wait(self.lb.pin_dir(self.node))
            self._wait_frontends([(self.http, 2), (self.iperf, 1)], timeout=60)
            self.check()
        except BaseException:
            self.close()
            raise

    def _wait_frontends(self, wanted: list[tuple[ServicePort, int]], timeout: float) -> None:
        assert self.probe is not None
        deadline = time.monotonic() + timeout
        while any(self.probe.backend_count(s.vip, s.port) != n for s, n in wanted):
            if time.monotonic() > deadline:
                raise ModeError(f"the agent did not program {[s.name for s, _ in wanted]}")
            time.sleep(0.05)

    def install(self, total: int, budget: float) -> dict[str, float | int | str]:
        assert self.probe is not None
        need = max(total - MEASURED, 0)
        if need < self.fillers:
            raise ModeError("the benchmark only adds Services")
        new = filler_services(need - self.fillers, FILLER_PODS, start=self.fillers)
        t0 = time.perf_counter()
        took = apply_all(self.client, filler_objects(new, FILLER_PODS))
        applied = time.perf_counter() - t0
        wanted = need + MEASURED
        deadline = t0 + budget
        while self.probe.frontends() < wanted:
            if time.perf_counter() > deadline:
                raise BudgetExceeded(
                    f"ebpflb: {self.probe.frontends()} of {wanted} frontends in the maps "
                    f"after {budget:.0f}s"
                )
            time.sleep(0.2)
        self.fillers = need
        self.services = total
        result: dict[str, float | int | str] = {
            "services": total,
            "applies": len(took),
            "apply_seconds": applied,
            "seconds": time.perf_counter() - t0,
        }
        self.install_log.append(result)
        return result

    def program_ids(self) -> dict[str, int]:
        """{program name: id} of what tc runs on the client's host veth (both directions) and,
        with socket-level load balancing, of the programs on the node's cgroup."""
        from ebpflb.datapath.loader import tc_programs

        ns = self.cluster.ns(self.node)
        out: dict[str, int] = {}
        for direction in ("ingress", "egress"):
            where = partial(tc_programs, self.pods.client.host_veth, direction)
            out.update(in_netns(ns.name, where))
        cgroup = self.node.cgroup
        if self.socket_lb and cgroup is not None:  # and the node's socket-level programs
            out.update({p.name: p.id for p in attached_programs(cgroup)})
        return out

    def memory(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, proc in self.lb.agents.items():
            out[f"agent {name}"] = read_status(proc.pid)
        if self.lb.registry_proc is not None:
            out["registry"] = read_status(self.lb.registry_proc.pid)
        return out

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        with contextlib.suppress(AttributeError):
            self.client.close()
        self.lb.close()


class NetfilterMode(Mode):
    """kube-proxy's rules (iptables-legacy, iptables-nft or nftables) in the node namespace."""

    RESTORE = {"iptables-legacy": "iptables-legacy-restore", "iptables-nft": "iptables-nft-restore"}

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in NETFILTER_MODES:
            raise ValueError(name)
        self.name = name
        self.cluster = Cluster(1, external=False)
        self.fillers = 0
        self.nft_batches: list[tuple[int, float]] = []  # (Services in the table before, s)
        try:
            node_ns = self.cluster.ns(self.node)
            if not set_bridge_netfilter(node_ns, True):
                raise ModeError(
                    f"{name}: no {BRIDGE_NF} in the node namespace: replies between pods on one "
                    "bridge would bypass conntrack (the kernel needs br_netfilter)"
                )
            self.pods = start_servers(self.cluster, self.node)
            self._measured()
            if name == "nftables":
                self._nft(
                    "\n".join(nftables.base_rules(self.node.ip))
                    + "\n"
                    + nftables.ruleset_fragment([self.iperf, self.http])
                )
            else:
                self._restore(iptables.ruleset([self.iperf, self.http]))
            self.services = MEASURED
            self.check()
        except BaseException:
            self.close()
            raise

    def _run(self, argv: list[str], text: str, timeout: float) -> float:
        t0 = time.perf_counter()
        try:
            done = self.cluster.ns(self.node).run(argv, timeout=timeout, input=text)
        except subprocess.TimeoutExpired:
            raise BudgetExceeded(f"{self.name}: {argv[0]} took over {timeout:.0f}s") from None
        if done.returncode != 0:
            raise ModeError(f"{self.name}: {' '.join(argv)}: {done.stderr.strip()[:500]}")
        return time.perf_counter() - t0

    def _restore(self, text: str, timeout: float = 600.0) -> float:
        return self._run([self.RESTORE[self.name]], text, timeout)

    def _nft(self, text: str, timeout: float = 600.0) -> float:
        return self._run(["nft", "-f", "-"], text, timeout)

    def _nft_rest_seconds(self, need: int) -> float:
        """A low estimate of the seconds the fillers still missing (of `need`) would take in
        transactions of NFT_BATCH: each transaction's seconds per Service in the table,
        the least of the last five transactions', times the table's size at each one
        still to come. 0 before the table holds NFT_BATCH Services."""
        recent = [sec / size for size, sec in self.nft_batches[-5:] if size >= NFT_BATCH]
        if not recent:
            return 0.0
        sizes = range(self.fillers + MEASURED, need + MEASURED, NFT_BATCH)
        return min(recent) * sum(sizes)

    def install(self, total: int, budget: float) -> dict[str, float | int | str]:
        need = max(total - MEASURED, 0)
        if need < self.fillers:
            raise ModeError("the benchmark only adds Services")
        t0 = time.perf_counter()
        result: dict[str, float | int | str] = {"services": total}
        if self.name == "nftables":
            # Added in transactions of NFT_BATCH Services, as kube-proxy's partial syncs
            # would. Each costs more the more the table holds (perf: nf_tables_newset and
            # nft_set_lookup_global scan all of the table's sets, one anonymous verdict map
            # per Service), so the whole install grows with the square of the count.
            batches = 0
            while self.fillers < need:
                elapsed = time.perf_counter() - t0
                rest = self._nft_rest_seconds(need)
                if elapsed >= budget or elapsed + rest > budget:
                    loaded = self.fillers + MEASURED
                    raise BudgetExceeded(
                        f"nftables: {loaded:,} of {total:,} Services loaded after "
                        f"{elapsed:.0f}s"
                        + (
                            f"; the rest would take at least {rest:.0f}s more, at the cost "
                            f"per Service of its last transactions (over the {budget:.0f}s "
                            "budget)"
                            if elapsed < budget
                            else ""
                        )
                    )
                n = min(NFT_BATCH, need - self.fillers)
                batch = filler_services(n, FILLER_PODS, start=self.fillers)
                try:
                    seconds = self._nft(nftables.ruleset_fragment(batch), timeout=budget - elapsed)
                except BudgetExceeded:
                    raise BudgetExceeded(
                        f"nftables: {self.fillers + MEASURED:,} of {total:,} Services loaded "
                        f"after {budget:.0f}s"
                    ) from None
                self.nft_batches.append((self.fillers + MEASURED, seconds))
                self.fillers += n
                self.services = self.fillers + MEASURED
                batches += 1
            result["transactions"] = batches
        else:
            # A full sync: the whole ruleset in one iptables-restore, the measured Services
            # last in KUBE-SERVICES (what a packet to them walks past).
            fillers = filler_services(need, FILLER_PODS)
            text = iptables.ruleset([*fillers, self.iperf, self.http])
            result["rules"] = iptables.rule_count(text)
            self._restore(text, timeout=budget)
            self.fillers = need
        self.services = total
        result["seconds"] = time.perf_counter() - t0
        self.check()
        self.install_log.append(result)
        return result

    def close(self) -> None:
        self.cluster.close()


def make_mode(name: str) -> Mode:
    if name == "direct":
        return DirectMode()
    if name in EBPFLB_MODES:
        return EbpflbMode(name)
    return NetfilterMode(name)
