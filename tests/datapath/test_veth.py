"""The program attached to real pod veths on a bridge: real sockets through DNAT, reverse NAT,
hairpin and refusals, with checksum offload on (partial checksums), off (full ones), and
partial checksums that are finished and checked on the way into the receiving pod."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from ebpflb.datapath.programmer import Backend, Frontend
from tests.datapath import netns
from tests.datapath import packets as P
from tests.datapath.conftest import Lab
from tests.datapath.scripts import CLIENT, SERVER

pytestmark = pytest.mark.datapath

VIP = "10.96.0.10"

HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(b"a")
assert s.recv(10) == b"a"
print("connected")
sys.stdin.readline()
try:
    s.sendall(b"b")
    print("got %r" % s.recv(10))
except ConnectionResetError:
    print("reset")
except socket.timeout:
    print("timeout")
"""

SEND_RAW = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for frame in sys.argv[1:]:
    s.send(bytes.fromhex(frame))
print("sent")
"""


@pytest.fixture
def node(lab: Lab) -> Iterator[netns.Node]:
    """Pods a (10.244.0.5) and b (10.244.0.21) on cni0, from_pod on both host veths."""
    yield from _node(lab)


@pytest.fixture
def clsact_node(lab: Lab) -> Iterator[netns.Node]:
    """node, with from_pod in a filter under clsact (the qdisc counts what tc dropped)."""
    assert lab.dp.tcx
    lab.dp.tcx = False
    try:
        yield from _node(lab)
    finally:
        lab.dp.tcx = True


def _node(lab: Lab) -> Iterator[netns.Node]:
    with netns.node() as n:
        n.add_pod("a", 5)
        n.add_pod("b", 21)
        with netns.inside(n.ns):
            for pod in n.pods.values():
                lab.dp.attach(n.ifindex(pod.host_veth))
        try:
            yield n
        finally:
            with netns.inside(n.ns):
                for pod in n.pods.values():
                    lab.dp.detach(n.ifindex(pod.host_veth))
            assert not lab.dp.attached


def frontends(n: netns.Node, port80: str = "b:8080") -> list[Frontend]:
    pod, port = port80.split(":")
    return [
        Frontend(VIP, 80, "TCP", (Backend(n.pods[pod].ip, int(port)),)),
        Frontend(VIP, 81, "TCP"),  # no endpoints
        Frontend(VIP, 53, "UDP", (Backend(n.pods["b"].ip, 5353),)),
        Frontend(VIP, 54, "UDP"),  # no endpoints
        Frontend(VIP, 82, "TCP", (Backend(n.pods["a"].ip, 8082),)),  # a reaches itself
    ]


@pytest.mark.parametrize("csum", ["offload", "full", "partial-checked"])
def test_sockets_through_the_vip(lab: Lab, node: netns.Node, csum: str) -> None:
    if csum == "full":
        node.set_checksum_offload(False)
    elif csum == "partial-checked":
        node.check_partial_checksums()
    lab.sync(*frontends(node))
    node.start("b", SERVER, "echo", "tcp:8080", "udp:5353")
    node.start("a", SERVER, "echo", "tcp:8082")
    checks = [
        ("tcp", VIP, 80, 100),
        ("tcp", VIP, 80, 300_000),  # GSO segments both ways
        ("tcp", VIP, 81, 1),
        ("udp", VIP, 53, 100),
        ("udp", VIP, 53, 0),
        ("udp", VIP, 54, 10),
        ("tcp", VIP, 82, 1000),
    ]
    results = json.loads(node.python("a", CLIENT, "echo", json.dumps(checks)))
    got = [r["result"] for r in results]
    assert got == ["ok", "ok", "refused", "ok", "ok", "refused", "ok"], results
    for check, r in zip(checks, results, strict=True):
        if r["result"] == "refused":
            assert r["seconds"] < 1, f"{check} refused only after {r['seconds']:.1f} s"
    c = lab.counters()
    assert c["errors"] == 0
    assert c["no_backend"] >= 2 and c["hairpin"] >= 2 and c["rev_nat"] > 0


def test_flow_whose_backend_leaves_is_reset(lab: Lab, node: netns.Node) -> None:
    lab.sync(*frontends(node))
    node.start("b", SERVER, "echo", "tcp:8080")
    client = node.start("a", HOLD, VIP, "80")  # returns once connected
    lab.sync(*frontends(node, port80="b:8081"))  # nothing listens there: it answers RST
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "reset"
    assert lab.counters()["reselects"] == 1


def clsact_drops(n: netns.Node, ifname: str) -> int:
    """Packets tc ingress/egress programs dropped on ifname (the clsact qdisc's counter)."""
    out = netns.sh("tc", "-n", n.ns, "-s", "-j", "qdisc", "show", "dev", ifname)
    (clsact,) = [q for q in json.loads(out) if q["kind"] == "clsact"]  # tcx counts nothing
    return int(clsact["drops"])


def test_truncated_frames_from_a_pod_pass(lab: Lab, clsact_node: netns.Node) -> None:
    """The lengths BPF_PROG_TEST_RUN refuses, sent for real from the pod's eth0: the program
    counts each as malformed and passes it (the bridge's netfilter drops them after, so their
    bytes cannot be checked past tc; under clsact, whose qdisc counts tc's drops)."""
    node = clsact_node
    lab.sync(*frontends(node))
    a = node.pods["a"]
    a_mac = node.mac("eth0", a.ns)
    whole = P.tcp(src=a.ip, dst=VIP, src_mac=a_mac, dst_mac=node.mac("cni0"))
    frames = [whole[:n] for n in range(14, len(whole))]
    before = lab.counters()["malformed"]
    drops = clsact_drops(node, a.host_veth)
    node.python("a", SEND_RAW, *(f.hex() for f in frames))
    deadline = time.monotonic() + 3
    while lab.counters()["malformed"] - before < len(frames) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.counters()["malformed"] - before == len(frames)
    assert clsact_drops(node, a.host_veth) == drops
