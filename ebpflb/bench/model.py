"""The Services a benchmark installs, as plain data that every mode (ebpflb, netfilter) reads."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

MODES = ("direct", "ebpflb", "ebpflb-tc", "iptables-legacy", "iptables-nft", "nftables")
"""Every way of reaching the Services the benchmark knows, in the order rounds take them.
ebpflb: the agent with socket-level load balancing for the node's pods (a Service is
translated at connect(), the tc programs stay attached for everything else); ebpflb-tc: the
tc programs alone (every packet of a flow DNATed and reverse-NATed)."""
EBPFLB_MODES = {"ebpflb": True, "ebpflb-tc": False}
"""ebpflb's modes: whether socket-level load balancing is on."""
NETFILTER_MODES = ("iptables-legacy", "iptables-nft", "nftables")
PARTS = ("perpacket", "control", "dataplane")
"""The benchmark's parts, in the order they run."""
INTERLEAVE_STEPS = "steps, back and forth"
"""settings["interleave"] of runs whose rounds take each step in every mode before the next,
the modes backwards in odd rounds (runner.Runner._round); older runs have no such key."""

NAMESPACE = "default"
CLUSTER_CIDR = "10.244.0.0/16"
"""kube-proxy's --cluster-cidr: sources outside it are masqueraded."""
SERVICE_CIDR = "10.96.0.0/12"
"""The registry's default service range; every VIP below is inside it."""

HTTP_VIP, IPERF_VIP = "10.96.0.100", "10.96.0.101"
"""The measured Services (HTTP for connection rate and latency, iperf3 for throughput)."""
HTTP_PORT, IPERF_PORT = 80, 5201

FILLER_BASE = int(ipaddress.IPv4Address("10.97.0.0"))
"""Filler Service i has VIP FILLER_BASE + 1 + i (10.97.0.1 ...): up to 10.103.x for 400k."""
CHURN_BASE = int(ipaddress.IPv4Address("10.104.0.0"))
"""Control-plane test Services (10.104.0.1 ...)."""
FAKE_POD_BASE = int(ipaddress.IPv4Address("10.244.128.0"))
"""Backends of filler Services: Pod objects with these IPs, and no namespace behind them."""
MAX_FAKE_PODS = 32 * 1024


@dataclass(frozen=True)
class Endpoint:
    """One backend of a Service port: a pod's IP and target port, and its readiness."""

    ip: str
    port: int
    ready: bool = True

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServicePort:
    """One ClusterIP port of one Service with its endpoints: what kube-proxy programs."""

    name: str
    vip: str
    port: int
    endpoints: tuple[Endpoint, ...]
    port_name: str = "http"
    protocol: str = "TCP"
    namespace: str = NAMESPACE
    group: int = -1
    """Which fake-pod group the Service selects (-1: its own, real pods)."""

    @property
    def service_port_name(self) -> str:
        """kube-proxy's ServicePortName.String(): "namespace/name:port"."""
        return f"{self.namespace}/{self.name}:{self.port_name}"

    @property
    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.ready)

    def with_ready(self, ip: str, ready: bool) -> ServicePort:
        """The same Service with the endpoint at `ip` made ready or not."""
        return replace(
            self,
            endpoints=tuple(replace(e, ready=ready) if e.ip == ip else e for e in self.endpoints),
        )


def nth_ip(base: int, n: int) -> str:
    return str(ipaddress.IPv4Address(base + n))


def filler_vip(i: int) -> str:
    return nth_ip(FILLER_BASE, 1 + i)


def fake_pod_ip(j: int) -> str:
    """Fake pod j's IP: 10.244.128.2 ... (skipping .0, .1 and .255 of every /24)."""
    if not 0 <= j < MAX_FAKE_PODS:
        raise ValueError(f"fake pod {j} out of range (0..{MAX_FAKE_PODS - 1})")
    block, k = divmod(j, 250)
    return nth_ip(FAKE_POD_BASE, block * 256 + 2 + k)


@dataclass(frozen=True)
class FakePods:
    """`groups` groups of `per_group` Pod objects each; a filler Service selects one group."""

    groups: int
    per_group: int
    label: str = "bench-group"
    first: int = 0
    """Index of the first fake pod IP (so two sets of fake pods never share an IP)."""
    prefix: str = "fake"
    """Pod names are <prefix>-g<group>-<k>."""

    def __post_init__(self) -> None:
        if self.groups < 1 or self.per_group < 1:
            raise ValueError("groups and per_group must be at least 1")
        fake_pod_ip(self.first + self.groups * self.per_group - 1)  # range check

    def ip(self, group: int, k: int) -> str:
        return fake_pod_ip(self.first + group * self.per_group + k)

    def name(self, group: int, k: int) -> str:
        return f"{self.prefix}-g{group}-{k}"

    def pods(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(name, ip, labels) of every pod."""
        for g in range(self.groups):
            for k in range(self.per_group):
                yield self.name(g, k), self.ip(g, k), {self.label: str(g)}

    def endpoints(self, group: int, port: int) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(self.ip(group, k), port) for k in range(self.per_group))


def filler_services(
    count: int, pods: FakePods, *, start: int = 0, base: int = FILLER_BASE, prefix: str = "filler"
) -> list[ServicePort]:
    """Services start..start+count-1: VIP base+1+i port 80, selecting group i % pods.groups."""
    if base + start + count >= int(ipaddress.IPv4Address("10.111.255.255")):
        raise ValueError(f"{count} Services do not fit in the service CIDR {SERVICE_CIDR}")
    out = []
    for i in range(start, start + count):
        group = i % pods.groups
        out.append(
            ServicePort(
                name=f"{prefix}-{i:06d}",
                vip=nth_ip(base, 1 + i),
                port=80,
                endpoints=pods.endpoints(group, 80),
                group=group,
            )
        )
    return out


def measured_services(
    http_backends: Sequence[str], iperf_backend: str
) -> tuple[ServicePort, ServicePort]:
    """The two Services the data-plane figures are measured through (real pods behind them)."""
    http = ServicePort(
        name="bench-http",
        vip=HTTP_VIP,
        port=HTTP_PORT,
        endpoints=tuple(Endpoint(ip, HTTP_PORT) for ip in http_backends),
    )
    iperf = ServicePort(
        name="bench-iperf",
        vip=IPERF_VIP,
        port=IPERF_PORT,
        port_name="iperf",
        endpoints=(Endpoint(iperf_backend, IPERF_PORT),),
    )
    return http, iperf
