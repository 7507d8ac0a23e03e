"""Nodes with pods, an underlay switch and external clients as network namespaces, for the
datapath's real-veth and FIB tests; always removed."""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the calling thread in network namespace ns for the block (sockets made meanwhile
    stay in it)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(target)


@dataclass
class Pod:
    ns: str
    ip: str
    host_veth: str  # its end in the node namespace, a port of cni0


@dataclass
class Node:
    """A node namespace with bridge cni0 (gateway .1) and pods on it, like the CNI bridge plugin
    makes; ip_forward on, rp_filter off, IPv6 off (no chatter on the veths)."""

    subnet: str = "10.244.0"
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    name: str = "n"
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"ebl-{self.name}-{self.tag}"

    def create(self) -> None:
        new_ns(self.ns, forward=True)
        sh("ip", "-n", self.ns, "link", "add", "cni0", "type", "bridge")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.subnet}.1/24", "dev", "cni0")
        sh("ip", "-n", self.ns, "link", "set", "cni0", "up")

    def add_pod(self, name: str, host: int) -> Pod:
        pod = Pod(f"ebl-{name}-{self.tag}", f"{self.subnet}.{host}", f"veth{name}{self.tag}")
        self.pods[name] = pod
        new_ns(pod.ns)
        sh("ip", "-n", self.ns, "link", "add", pod.host_veth, "type", "veth",
           "peer", "name", "eth0", "netns", pod.ns)  # fmt: skip
        sh("ip", "-n", self.ns, "link", "set", pod.host_veth, "master", "cni0", "up")
        sh("ip", "-n", pod.ns, "link", "set", "lo", "up")
        sh("ip", "-n", pod.ns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        sh("ip", "-n", pod.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", pod.ns, "route", "add", "default", "via", f"{self.subnet}.1")
        return pod

    def ifindex(self, ifname: str, ns: str | None = None) -> int:
        out = sh("ip", "-n", ns or self.ns, "-o", "link", "show", ifname)
        return int(out.split(":", 1)[0])

    def mac(self, ifname: str, ns: str | None = None) -> str:
        out = sh("ip", "-n", ns or self.ns, "-o", "link", "show", ifname)
        return out.split("link/ether ", 1)[1].split()[0]

    def python(self, pod: str, script: str, *args: str, timeout: float = 30) -> str:
        """Run a Python script in a pod; its stdout."""
        argv = ["ip", "netns", "exec", self.pods[pod].ns, sys.executable, "-c", script, *args]
        return subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=timeout
        ).stdout

    def start(self, pod: str, script: str, *args: str) -> subprocess.Popen[str]:
        """Start a Python script in a pod; returns once it printed its first line."""
        argv = ["ip", "netns", "exec", self.pods[pod].ns, sys.executable, "-u", "-c", script, *args]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        p.stdout.readline()
        return p

    def set_checksum_offload(self, on: bool) -> None:
        """Turn TX and RX checksum offload of every veth end on or off (off: every packet
        carries a full checksum and every receiver checks it)."""
        for pod in self.pods.values():
            for ns, ifname in ((pod.ns, "eth0"), (self.ns, pod.host_veth)):
                set_checksum_offload(ns, ifname, on)

    def check_partial_checksums(self) -> None:
        """Pods send partial checksums (TX offload on), which the programs on the host ends
        see; the host ends finish every checksum in software on the way into a pod (TX
        offload off: GSO segments too), and the pods check every one (RX offload off). A
        program that updates a partial checksum wrongly gets its packets dropped."""
        for pod in self.pods.values():
            set_checksum_offload(self.ns, pod.host_veth, False)
            set_checksum_offload(pod.ns, "eth0", True, rx=False)

    def destroy(self) -> None:
        for p in self.procs:
            p.kill()
            p.communicate()  # reaps it and closes its pipes
        for ns in [pod.ns for pod in self.pods.values()] + [self.ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def node() -> Iterator[Node]:
    n = Node()
    try:
        n.create()
        yield n
    finally:
        n.destroy()


def new_ns(ns: str, forward: bool = False) -> None:
    sh("ip", "netns", "add", ns)
    sysctls = [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        f"net.ipv4.ip_forward={int(forward)}",
    ]
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", *sysctls)
    sh("ip", "-n", ns, "link", "set", "lo", "up")


UNDERLAY = "192.168.50"  # node i is .10+i, the external client .200, as in ebpflb/cluster


@dataclass
class Lan:
    """Nodes and an external client on an underlay switch (a bridge in its own namespace),
    shaped like ebpflb/cluster: node i is 192.168.50.(10+i) on eth0 with pods 10.244.i.0/24
    on cni0, and routes to the other nodes' pod subnets; the client has none."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # client namespaces

    @property
    def switch(self) -> str:
        return f"ebl-sw-{self.tag}"

    @property
    def client(self) -> str:
        return f"ebl-ext-{self.tag}"

    @staticmethod
    def node_ip(i: int) -> str:
        return f"{UNDERLAY}.{10 + i}"

    @property
    def client_ip(self) -> str:
        return f"{UNDERLAY}.200"

    def port(self, i: int) -> str:
        """The switch's end of node i's eth0."""
        return f"n{i}-{self.tag}"

    def create(self, nodes: int = 2) -> None:
        new_ns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(nodes):
            n = Node(subnet=f"10.244.{i}", tag=self.tag, name=f"n{i}")
            self.nodes.append(n)
            n.create()
            self._plug(n.ns, self.port(i), f"{self.node_ip(i)}/24")
        for i, n in enumerate(self.nodes):
            for j in range(nodes):
                if j != i:
                    sh("ip", "-n", n.ns, "route", "add", f"10.244.{j}.0/24", "via",
                       self.node_ip(j))  # fmt: skip
        self.hosts.append(self.client)
        new_ns(self.client)
        self._plug(self.client, f"ext-{self.tag}", f"{self.client_ip}/24")

    def _plug(self, ns: str, port: str, cidr: str) -> None:
        sh("ip", "-n", self.switch, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", ns)  # fmt: skip
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def python(self, ns: str, script: str, *args: str, timeout: float = 30) -> str:
        """Run a Python script in a namespace; its stdout."""
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args]
        return subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=timeout
        ).stdout

    def set_checksum_offload(self, ns: str, ifname: str, on: bool) -> None:
        set_checksum_offload(ns, ifname, on)

    def destroy(self) -> None:
        for n in self.nodes:
            n.destroy()
        for ns in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def lan(nodes: int = 2) -> Iterator[Lan]:
    n = Lan()
    try:
        n.create(nodes)
        yield n
    finally:
        n.destroy()


_OFFLOAD = (
    "import sys\nfrom pyroute2.ethtool import Ethtool\ne = Ethtool()\n"
    "f = e.get_features(sys.argv[1])\n"
    "f.features['tx-checksum-ip-generic'].enable = sys.argv[2] == 'on'\n"
    "f.features['rx-checksum'].enable = sys.argv[3] == 'on'\n"
    "e.set_features(sys.argv[1], f)\n"
)


def set_checksum_offload(ns: str, ifname: str, on: bool, rx: bool | None = None) -> None:
    """TX and RX checksum offload of one veth end on or off (TX off: it sends full
    checksums; RX off: its receiver checks them); rx: RX's, if not the same."""
    states = ["on" if x else "off" for x in (on, on if rx is None else rx)]
    sh("ip", "netns", "exec", ns, sys.executable, "-c", _OFFLOAD, ifname, *states)
