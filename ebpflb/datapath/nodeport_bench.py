"""NodePort modes compared on veths: python -m ebpflb.datapath.nodeport_bench.

An external client namespace reaches node IP:nodePort, DNATed to a backend pod on the same node,
with the external interface in each mode (native XDP, generic XDP, tc): iperf3 TCP throughput
and new connections per second (one request and answer each); with --udp also iperf3 UDP
packets per second (64-byte datagrams: limited by iperf3's sender more than by the datapath).
Rounds interleave the modes; the table shows medians. Everything runs in namespaces made here,
and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from ebpflb.datapath.loader import EXTERNAL_MODES, Datapath, ExternalMode, remove_pins
from ebpflb.datapath.programmer import Backend, Frontend, Programmer

NODE_IP, CLIENT_IP, POD_IP = "192.168.50.10", "192.168.50.200", "10.244.0.21"
IPERF_PORT, CRR_PORT = 5201, 8080
IPERF_NODEPORT, CRR_NODEPORT = 30201, 30080

# One connection after another: connect, one byte each way, the server closes first (so the
# client's ports are never in TIME_WAIT). Prints connections per second.
CRR_CLIENT = """
import socket, sys, time
addr, seconds = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3])
n, start = 0, time.perf_counter()
end = start + seconds
while time.perf_counter() < end:
    s = socket.socket()
    s.settimeout(2)
    s.connect(addr)
    s.send(b"x")
    s.recv(1)
    s.recv(1)
    s.close()
    n += 1
print(n / (time.perf_counter() - start))
"""

CRR_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(1)
    c.sendall(b"y")
    c.close()
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


class Topology:
    """switch (bridge br0) -- node (eth0 192.168.50.10, cni0 10.244.0.1, pod 10.244.0.21)
    -- client (192.168.50.200, no route to the pods)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.switch, self.node = f"ebl-bsw-{tag}", f"ebl-bnode-{tag}"
        self.pod, self.client = f"ebl-bpod-{tag}", f"ebl-bext-{tag}"
        self.pod_veth = f"vbpod{tag}"
        self.procs: list[subprocess.Popen[str]] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.client, self.pod, self.node, self.switch]

    def create(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "add", ns)
            sh(*in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"))
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(*in_ns(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for ns, port, ip in ((self.node, "node", NODE_IP), (self.client, "ext", CLIENT_IP)):
            sh("ip", "-n", self.switch, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", ns)  # fmt: skip
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.node, "link", "add", "cni0", "type", "bridge")
        sh("ip", "-n", self.node, "addr", "add", "10.244.0.1/24", "dev", "cni0")
        sh("ip", "-n", self.node, "link", "set", "cni0", "up")
        sh("ip", "-n", self.node, "link", "add", self.pod_veth, "type", "veth",
           "peer", "name", "eth0", "netns", self.pod)  # fmt: skip
        sh("ip", "-n", self.node, "link", "set", self.pod_veth, "master", "cni0", "up")
        sh("ip", "-n", self.pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        sh("ip", "-n", self.pod, "link", "set", "eth0", "up")
        sh("ip", "-n", self.pod, "route", "add", "default", "via", "10.244.0.1")

    def ifindex(self, ifname: str) -> int:
        return int(sh("ip", "-n", self.node, "-o", "link", "show", ifname).split(":", 1)[0])

    def start(self, ns: str, *argv: str, ready: bool = False) -> None:
        p = subprocess.Popen(in_ns(ns, *argv), stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        if ready:
            assert p.stdout is not None
            p.stdout.readline()

    def set_checksum_offload(self, on: bool) -> None:
        script = (
            "from pyroute2.ethtool import Ethtool\ne = Ethtool()\nf = e.get_features('eth0')\n"
            f"f.features['tx-checksum-ip-generic'].enable = {on}\ne.set_features('eth0', f)\n"
        )
        for ns in (self.client, self.pod):
            sh(*in_ns(ns, sys.executable, "-c", script))

    def destroy(self) -> None:
        for p in self.procs:
            p.kill()
            p.communicate()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """The calling thread in namespace ns for the block."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            libc.setns(home, 0x40000000)
    finally:
        os.close(home)
        os.close(target)


def iperf(t: Topology, seconds: float, udp: bool) -> float:
    """Gbit/s received (TCP), or thousands of 64-byte datagrams received per second (UDP)."""
    argv = ["iperf3", "-c", NODE_IP, "-p", str(IPERF_NODEPORT), "-t", str(seconds), "-J"]
    if udp:
        argv += ["-u", "-l", "64", "-b", "0"]
    for attempt in range(3):  # the server takes a moment between tests
        done = subprocess.run(in_ns(t.client, *argv), capture_output=True, text=True)
        if done.returncode == 0:
            break
        time.sleep(0.3 * (attempt + 1))
    else:
        raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    end = json.loads(done.stdout)["end"]
    if udp:
        s = end["sum"]
        return float(s["packets"] - s["lost_packets"]) / float(s["seconds"]) / 1e3
    return float(end["sum_received"]["bits_per_second"]) / 1e9


def conn_rate(t: Topology, seconds: float) -> float:
    argv = [sys.executable, "-c", CRR_CLIENT, NODE_IP, str(CRR_NODEPORT), str(seconds)]
    return float(sh(*in_ns(t.client, *argv)))


def measure(t: Topology, seconds: float, udp: bool) -> dict[str, float]:
    result = {"TCP Gbit/s": iperf(t, seconds, udp=False), "conn/s": conn_rate(t, seconds)}
    if udp:
        result["UDP kpps"] = iperf(t, seconds, udp=True)
    return result


def run(
    modes: list[ExternalMode], rounds: int, seconds: float, full_csum: bool, udp: bool = False
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, int]]]:
    """Per mode and metric, one value per round; and per mode, the path counters."""
    t = Topology()
    pin_dir = Path("/sys/fs/bpf") / f"ebpflb-nodeport-bench-{secrets.token_hex(3)}"
    dp: Datapath | None = None
    results: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    paths: dict[str, dict[str, int]] = {m: {} for m in modes}
    try:
        t.create()
        if full_csum:
            t.set_checksum_offload(False)
        dp = Datapath(pin_dir)
        eth0, pod_veth = t.ifindex("eth0"), t.ifindex(t.pod_veth)
        with inside(t.node):
            dp.attach(pod_veth, "ingress")
            dp.attach(pod_veth, "egress")
        dp.set_node([NODE_IP])
        local = (Backend(POD_IP, IPERF_PORT, local=True),)
        Programmer(dp).sync(
            [
                Frontend(NODE_IP, IPERF_NODEPORT, "TCP", local, nodeport=True),
                Frontend(NODE_IP, IPERF_NODEPORT, "UDP", local, nodeport=True),
                Frontend(
                    NODE_IP,
                    CRR_NODEPORT,
                    "TCP",
                    (Backend(POD_IP, CRR_PORT, local=True),),
                    nodeport=True,
                ),
            ]
        )
        t.start(t.pod, "iperf3", "-s", "-p", str(IPERF_PORT))
        t.start(t.pod, sys.executable, "-c", CRR_SERVER, str(CRR_PORT), ready=True)
        time.sleep(0.3)
        for r in range(rounds):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                with inside(t.node):
                    dp.attach_external(eth0, mode)
                before = dp.counters()
                for k, v in measure(t, seconds, udp).items():
                    results[mode].setdefault(k, []).append(v)
                after = dp.counters()
                for k in ("nodeport_xdp", "nodeport_tc", "xdp_pass_to_tc"):
                    paths[mode][k] = paths[mode].get(k, 0) + after[k] - before[k]
                print(f"round {r + 1} {mode}: done", file=sys.stderr)
        with inside(t.node):
            dp.detach_external(eth0)
    finally:
        if dp is not None:
            with inside(t.node):
                dp.close(cleanup=True)
        remove_pins(pin_dir)
        t.destroy()
    return results, paths


def table(results: dict[str, dict[str, list[float]]], paths: dict[str, dict[str, int]]) -> str:
    metrics = list(next(iter(results.values())))
    head = f"{'mode':12}" + "".join(f"{m:>24}" for m in metrics)
    head += f"{'XDP / tc / XDP->tc packets':>36}"
    lines = [head]
    for mode, by_metric in results.items():
        cells = ""
        for m in metrics:
            v = by_metric[m]
            cells += f"{statistics.median(v):>10.2f} ({min(v):.1f}-{max(v):.1f})".rjust(24)
        p = paths[mode]
        cells += f"{p['nodeport_xdp']:>12} {p['nodeport_tc']:>10} {p['xdp_pass_to_tc']:>10}"
        lines.append(f"{mode:12}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(EXTERNAL_MODES), help="comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument(
        "--full-csum",
        action="store_true",
        help="client and pod send whole checksums (offload off), as packets from a wire",
    )
    ap.add_argument("--udp", action="store_true", help="also UDP packets per second")
    args = ap.parse_args(argv)
    modes: list[ExternalMode] = []
    for m in filter(None, args.modes.split(",")):
        if m not in EXTERNAL_MODES:
            ap.error(f"mode {m!r} is not one of {EXTERNAL_MODES}")
        modes.append(cast(ExternalMode, m))
    started = time.monotonic()
    results, paths = run(modes, args.rounds, args.seconds, args.full_csum, args.udp)
    csum = "whole checksums (offload off)" if args.full_csum else "checksum offload on"
    print(f"NodePort to a local backend on veths, {csum}; medians of {args.rounds} rounds "
          f"(min-max), {args.seconds:g} s each")  # fmt: skip
    print(table(results, paths))
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
