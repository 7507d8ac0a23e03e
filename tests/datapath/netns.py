"""A node with pods as network namespaces, for the datapath's real-veth tests; always removed."""

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
    makes; ip_forward on."""

    subnet: str = "10.244.0"
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"ebl-n-{self.tag}"

    def create(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "link", "add", "cni0", "type", "bridge")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.subnet}.1/24", "dev", "cni0")
        sh("ip", "-n", self.ns, "link", "set", "cni0", "up")
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def add_pod(self, name: str, host: int) -> Pod:
        pod = Pod(f"ebl-{name}-{self.tag}", f"{self.subnet}.{host}", f"veth{name}{self.tag}")
        sh("ip", "netns", "add", pod.ns)
        self.pods[name] = pod
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
        script = (
            "import sys\nfrom pyroute2.ethtool import Ethtool\ne = Ethtool()\n"
            "f = e.get_features(sys.argv[1])\n"
            "f.features['tx-checksum-ip-generic'].enable = sys.argv[2] == 'on'\n"
            "f.features['rx-checksum'].enable = sys.argv[2] == 'on'\n"
            "e.set_features(sys.argv[1], f)\n"
        )
        state = "on" if on else "off"
        for pod in self.pods.values():
            for ns, ifname in ((pod.ns, "eth0"), (self.ns, pod.host_veth)):
                sh("ip", "netns", "exec", ns, sys.executable, "-c", script, ifname, state)

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
