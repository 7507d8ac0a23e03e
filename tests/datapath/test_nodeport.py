"""NodePort on an external interface, run by BPF_PROG_TEST_RUN in XDP and in tc: DNAT to local
backends, DNAT + SNAT to remote ones and back, replies of local backends routed out, refusals,
passthrough, truncation, and what XDP leaves to tc. The runs happen inside a node namespace with
the routes and neighbours the programs' FIB lookups need."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ebpflb.datapath import conntrack, node
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.replyfilter import ReplyFilter
from ebpflb.datapath.structs import (
    CT_F_SNAT,
    CT_REVERSE,
    IF_F_NO_XDP_TX,
    IF_F_PARTIAL_CSUM,
    be16_to_port,
    be32_to_ip,
    ip_to_be32,
)
from ebpflb.datapath.testrun import (
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
)
from tests.datapath import netns
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

NODE_IP = "192.168.50.10"
NODE1_IP = "192.168.50.11"  # another node, its MAC known
NODE2_IP = "192.168.50.12"  # another node that never answered ARP: no neighbour entry
CLIENT = "192.168.50.200"
CLIENT2 = "192.168.50.201"
ETH0_MAC = "0a:00:00:00:00:0a"
NODE1_MAC = "0a:00:00:00:00:0b"
CLIENT_MAC = "0a:00:00:00:00:c8"
CLIENT2_MAC = "0a:00:00:00:00:c9"
LOCAL = "10.244.0.21"  # a pod on this node
REMOTE = "10.244.1.21"  # a pod on node1
UNRESOLVED = "10.244.2.21"  # a pod on node2
CLUSTER_IP = "10.96.0.10"
SNAT_MIN, SNAT_MAX = node.DEFAULT_SNAT_PORTS

HOOKS = ["xdp", "tc"]
PASS = {"xdp": XDP_PASS, "tc": TC_ACT_OK}
SENT = {"xdp": XDP_TX, "tc": TC_ACT_REDIRECT}  # out of eth0, by the program
DROP = {"xdp": XDP_DROP, "tc": TC_ACT_SHOT}

FRONTENDS = (
    Frontend(NODE_IP, 30080, "TCP", (Backend(LOCAL, 8080, local=True),), nodeport=True),
    Frontend(NODE_IP, 30053, "UDP", (Backend(LOCAL, 5353, local=True),), nodeport=True),
    Frontend(NODE_IP, 30081, "TCP", (Backend(REMOTE, 8080),), nodeport=True),
    Frontend(NODE_IP, 30054, "UDP", (Backend(REMOTE, 5353),), nodeport=True),
    Frontend(NODE_IP, 30083, "TCP", (Backend(REMOTE, 8080),), nodeport=True),  # as 30081's
    Frontend(NODE_IP, 30082, "TCP", (), nodeport=True),  # no (local) endpoint: refuses
    Frontend(NODE_IP, 30055, "UDP", (), nodeport=True),
    Frontend(NODE_IP, 30090, "TCP", (Backend(UNRESOLVED, 8080),), nodeport=True),
    Frontend(CLUSTER_IP, 80, "TCP", (Backend(LOCAL, 8080, local=True),)),  # not a NodePort
    Frontend(NODE_IP, 30091, "TCP", (Backend(LOCAL, 8080, local=True),)),  # nor this
)


def tcp_in(dport: int, **kw: object) -> bytes:
    """A client's TCP segment to the node's address, as it arrives on eth0."""
    args: dict[str, object] = {"src": CLIENT, "dst": NODE_IP, "src_mac": CLIENT_MAC}
    args |= {"dst_mac": ETH0_MAC, "dport": dport, **kw}
    return P.tcp(**args)  # type: ignore[arg-type]


def udp_in(dport: int, **kw: object) -> bytes:
    args: dict[str, object] = {"src": CLIENT, "dst": NODE_IP, "src_mac": CLIENT_MAC}
    args |= {"dst_mac": ETH0_MAC, "dport": dport, **kw}
    return P.udp(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lan_node() -> Iterator[netns.Lan]:
    """Node 0 on an underlay, eth0 192.168.50.10 with a fixed MAC, pod b (10.244.0.21) on
    cni0; node1's and the clients' MACs known (permanent neighbours), node2 routed but never
    resolved."""
    with netns.lan(1) as lan:
        n = lan.nodes[0]
        n.add_pod("b", 21)
        commands = [
            ("link", "set", "eth0", "address", ETH0_MAC),
            ("neigh", "add", NODE1_IP, "lladdr", NODE1_MAC, "dev", "eth0", "nud", "permanent"),
            ("neigh", "add", CLIENT, "lladdr", CLIENT_MAC, "dev", "eth0", "nud", "permanent"),
            ("neigh", "add", CLIENT2, "lladdr", CLIENT2_MAC, "dev", "eth0", "nud", "permanent"),
            ("route", "add", "10.244.1.0/24", "via", NODE1_IP),
            ("route", "add", "10.244.2.0/24", "via", NODE2_IP),
        ]
        for c in commands:
            netns.sh("ip", "-n", n.ns, *c)
        yield lan


@dataclass
class Ext:
    """The datapath seen from node 0's namespace."""

    lab: Lab
    ns: str
    eth0: int
    pod_veth: int  # pod b's host-side veth

    def run(self, hook: str, frame: bytes) -> tuple[int, bytes]:
        """The frame arriving on eth0 (nodeport_xdp or nodeport_tc)."""
        with netns.inside(self.ns):
            return self.lab.run_external(hook, frame, self.eth0)

    def run_from_pod(self, frame: bytes) -> tuple[int, bytes]:
        """The frame arriving from pod b (from_pod)."""
        with netns.inside(self.ns):
            return self.lab.run(frame, self.pod_veth)

    def iface_flags(self, flags: int) -> None:
        settings = node.read(self.lab.dp.maps.node_config)
        node.write(self.lab.dp.maps.node_config, node.with_interface(settings, self.eth0, flags))

    def snat_port(self, client: str = CLIENT, sport: int = 40000, port: int = 30081) -> int:
        """The SNAT port of a client's flow to NODE_IP:port (from its forward entry)."""
        for k, v in self.lab.dp.maps.conntrack.items():
            tuple_ = (be32_to_ip(k.saddr), be16_to_port(k.sport), be16_to_port(k.dport))
            if k.dir != CT_REVERSE and tuple_ == (client, sport, port):
                assert v.flags & CT_F_SNAT
                return be16_to_port(v.nat_port)
        raise AssertionError(f"no flow from {client}:{sport} to port {port}")


@pytest.fixture
def ext(lab: Lab, lan_node: netns.Lan) -> Ext:
    n = lan_node.nodes[0]
    e = Ext(lab, n.ns, n.ifindex("eth0"), n.ifindex(n.pods["b"].host_veth))
    lab.sync(*FRONTENDS)
    lab.dp.set_node([NODE_IP])
    e.iface_flags(0)
    return e


def path_counts(lab: Lab, hook: str) -> tuple[int, int, int]:
    c = lab.counters()
    return (
        c[f"nodeport_{hook}"],
        c["nodeport_tc" if hook == "xdp" else "nodeport_xdp"],
        c["xdp_pass_to_tc"],
    )


PAYLOAD = bytes(range(256)) * 4

# (id, client's frame, the frame the local backend must get): source kept
LOCAL_CASES = [
    ("tcp-syn", tcp_in(30080), tcp_in(8080, dst=LOCAL)),
    (
        "tcp-data",
        tcp_in(30080, flags="PA", seq=5, ack=9, payload=PAYLOAD),
        tcp_in(8080, flags="PA", seq=5, ack=9, payload=PAYLOAD, dst=LOCAL),
    ),
    (
        "tcp-ip-options-ihl15",
        tcp_in(30080, options=P.MAX_OPTIONS, payload=b"x"),
        tcp_in(8080, options=P.MAX_OPTIONS, payload=b"x", dst=LOCAL),
    ),
    ("udp", udp_in(30053), udp_in(5353, dst=LOCAL)),
    (
        "udp-no-checksum",
        udp_in(30053, no_checksum=True),
        udp_in(5353, no_checksum=True, dst=LOCAL),
    ),
    ("udp-empty", udp_in(30053, payload=b""), udp_in(5353, payload=b"", dst=LOCAL)),
]


@pytest.mark.parametrize(
    ("frame", "want"), [c[1:] for c in LOCAL_CASES], ids=[c[0] for c in LOCAL_CASES]
)
@pytest.mark.parametrize("hook", HOOKS)
def test_dnat_to_a_local_backend_keeps_the_client(
    ext: Ext, hook: str, frame: bytes, want: bytes
) -> None:
    verdict, out = ext.run(hook, frame)
    assert verdict == PASS[hook]  # the kernel delivers it to the pod
    P.assert_frame(out, want)
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["dnat"], c["snat"], c["ct_misses"], c["errors"]) == (1, 0, 1, 0)
    assert path_counts(ext.lab, hook) == (1, 0, 0)


# (id, client's frame, maker of the frame the remote backend must get, given the SNAT port)
REMOTE_CASES = [
    ("tcp-syn", tcp_in(30081), lambda s: P.tcp(NODE_IP, REMOTE, s, 8080)),
    (
        "tcp-data",
        tcp_in(30081, flags="PA", seq=5, ack=9, payload=PAYLOAD),
        lambda s: P.tcp(NODE_IP, REMOTE, s, 8080, "PA", seq=5, ack=9, payload=PAYLOAD),
    ),
    (
        "tcp-ip-options",
        tcp_in(30081, options=P.RTR_ALERT),
        lambda s: P.tcp(NODE_IP, REMOTE, s, 8080, options=P.RTR_ALERT),
    ),
    ("udp", udp_in(30054), lambda s: P.udp(NODE_IP, REMOTE, s, 5353)),
    (
        "udp-no-checksum",
        udp_in(30054, no_checksum=True),
        lambda s: P.udp(NODE_IP, REMOTE, s, 5353, no_checksum=True),
    ),
]


def from_eth0_to_node1(frame: bytes) -> bytes:
    return P.with_macs(frame, ETH0_MAC, NODE1_MAC)


@pytest.mark.parametrize(
    ("frame", "make"), [c[1:] for c in REMOTE_CASES], ids=[c[0] for c in REMOTE_CASES]
)
@pytest.mark.parametrize("hook", HOOKS)
def test_dnat_and_snat_to_a_remote_backend(ext: Ext, hook: str, frame: bytes, make) -> None:  # type: ignore[no-untyped-def]
    verdict, out = ext.run(hook, frame)
    assert verdict == SENT[hook]  # routed by the program: out of eth0 to node1
    port = ext.snat_port(port=P.dst(frame)[1])
    assert SNAT_MIN <= port <= SNAT_MAX
    P.assert_frame(out, from_eth0_to_node1(make(port)))
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["dnat"], c["snat"], c["fib_redirect"], c["errors"]) == (1, 1, 1, 0)
    assert path_counts(ext.lab, hook) == (1, 0, 0)


# (id, client's frame, backend's reply given the SNAT port, what the client must get)
SNAT_REPLY_CASES = [
    (
        "tcp-synack",
        tcp_in(30081),
        lambda s: P.tcp(REMOTE, NODE_IP, 8080, s, "SA", seq=7, ack=1001),
        P.tcp(NODE_IP, CLIENT, 30081, 40000, "SA", seq=7, ack=1001),
    ),
    (
        "tcp-data",
        tcp_in(30081),
        lambda s: P.tcp(REMOTE, NODE_IP, 8080, s, "PA", payload=PAYLOAD),
        P.tcp(NODE_IP, CLIENT, 30081, 40000, "PA", payload=PAYLOAD),
    ),
    (
        "udp",
        udp_in(30054),
        lambda s: P.udp(REMOTE, NODE_IP, 5353, s, b"answer"),
        P.udp(NODE_IP, CLIENT, 30054, 40000, b"answer"),
    ),
    (
        "udp-no-checksum",
        udp_in(30054),
        lambda s: P.udp(REMOTE, NODE_IP, 5353, s, b"a", no_checksum=True),
        P.udp(NODE_IP, CLIENT, 30054, 40000, b"a", no_checksum=True),
    ),
]


@pytest.mark.parametrize(
    ("first", "reply", "want"),
    [c[1:] for c in SNAT_REPLY_CASES],
    ids=[c[0] for c in SNAT_REPLY_CASES],
)
@pytest.mark.parametrize("hook", HOOKS)
def test_reply_of_a_snat_flow_goes_back_to_the_client(  # type: ignore[no-untyped-def]
    ext: Ext, hook: str, first: bytes, reply, want: bytes
) -> None:
    ext.run(hook, first)
    frame = P.with_macs(reply(ext.snat_port(port=P.dst(first)[1])), NODE1_MAC, ETH0_MAC)
    verdict, out = ext.run(hook, frame)
    assert verdict == SENT[hook]
    P.assert_frame(out, P.with_macs(want, ETH0_MAC, CLIENT_MAC))
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["rev_nat"], c["rev_snat"], c["fib_redirect"], c["errors"]) == (1, 1, 2, 0)
    assert path_counts(ext.lab, hook) == (2, 0, 0)


@pytest.mark.parametrize("hook", HOOKS)
def test_snat_flows_and_the_reply_filter(ext: Ext, hook: str) -> None:
    """A SNAT flow's reverse entry (inserted by the port claim) has its backend marked, so
    its reply still goes back to the client, also after a rebuild; a packet to the SNAT
    address from a backend of no flow skips the lookup."""
    ext.lab.dp.gc()
    assert ext.lab.dp.maps.reply_filter is not None
    rf = ReplyFilter(ext.lab.dp.maps.reply_filter)
    assert rf.ready and not rf.may_exist(ip_to_be32(REMOTE))
    ext.run(hook, tcp_in(30081))
    assert rf.may_exist(ip_to_be32(REMOTE))
    ext.lab.dp.gc()
    assert rf.may_exist(ip_to_be32(REMOTE)) and not rf.may_exist(ip_to_be32(UNRESOLVED))
    reply = P.tcp(REMOTE, NODE_IP, 8080, ext.snat_port(), "SA", seq=7, ack=1001)
    verdict, out = ext.run(hook, P.with_macs(reply, NODE1_MAC, ETH0_MAC))
    assert verdict == SENT[hook]
    want = P.tcp(NODE_IP, CLIENT, 30081, 40000, "SA", seq=7, ack=1001)
    P.assert_frame(out, P.with_macs(want, ETH0_MAC, CLIENT_MAC))
    stray = P.with_macs(P.tcp(UNRESOLVED, NODE_IP, 8080, SNAT_MIN, "SA"), NODE1_MAC, ETH0_MAC)
    assert ext.run(hook, stray) == (PASS[hook], stray)
    c = ext.lab.counters()
    assert (c["rev_snat"], c["rev_skipped"]) == (1, 1)


def test_a_port_change_that_sums_to_nothing_is_still_written(ext: Ext) -> None:
    """SNAT port 65535 back to client port 0, nothing else in the ports changing: the
    checksum difference is 0 (0xffff and 0 are one's complement's two zeros), the port
    must still be rewritten."""
    ext.lab.sync(Frontend(NODE_IP, 30081, "TCP", (Backend(REMOTE, 30081),), nodeport=True))
    ext.lab.dp.set_node([NODE_IP], snat_ports=(65535, 65535))
    ext.run("tc", tcp_in(30081, sport=0))
    assert ext.snat_port(sport=0) == 65535
    reply = P.with_macs(P.tcp(REMOTE, NODE_IP, 30081, 65535, "SA"), NODE1_MAC, ETH0_MAC)
    verdict, out = ext.run("tc", reply)
    assert verdict == SENT["tc"]
    want = P.tcp(NODE_IP, CLIENT, 30081, 0, "SA")
    P.assert_frame(out, P.with_macs(want, ETH0_MAC, CLIENT_MAC))
    P.check_checksums(out)


# (id, client's frame, the local backend's reply, what the client must get)
LOCAL_REPLY_CASES = [
    (
        "tcp",
        tcp_in(30080),
        P.tcp(LOCAL, CLIENT, 8080, 40000, "SA", seq=7, ack=1001),
        P.tcp(NODE_IP, CLIENT, 30080, 40000, "SA", seq=7, ack=1001),
    ),
    (
        "udp",
        udp_in(30053),
        P.udp(LOCAL, CLIENT, 5353, 40000, b"answer"),
        P.udp(NODE_IP, CLIENT, 30053, 40000, b"answer"),
    ),
]


@pytest.mark.parametrize(
    ("first", "reply", "want"),
    [c[1:] for c in LOCAL_REPLY_CASES],
    ids=[c[0] for c in LOCAL_REPLY_CASES],
)
@pytest.mark.parametrize("hook", HOOKS)
def test_reply_of_a_local_backend_is_routed_out_by_from_pod(
    ext: Ext, hook: str, first: bytes, reply: bytes, want: bytes
) -> None:
    """Its new source is the node's address: handed to the kernel it would be dropped as a
    martian, so from_pod routes it (FIB lookup, MACs, redirect to eth0)."""
    ext.run(hook, first)
    verdict, out = ext.run_from_pod(reply)
    assert verdict == TC_ACT_REDIRECT
    P.assert_frame(out, P.with_macs(want, ETH0_MAC, CLIENT_MAC))
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["rev_nat"], c["rev_snat"], c["fib_redirect"], c["errors"]) == (1, 0, 1, 0)


@pytest.mark.parametrize("hook", HOOKS)
def test_clients_with_the_same_source_port_never_share_a_snat_port(ext: Ext, hook: str) -> None:
    """Two ports only: two flows to one backend get both, a third finds none and is dropped;
    once a flow's entries expire its port is taken again."""
    ext.lab.dp.set_node([NODE_IP], snat_ports=(61000, 61001))
    assert ext.run(hook, tcp_in(30081))[0] == SENT[hook]
    assert ext.run(hook, tcp_in(30081, src=CLIENT2, src_mac=CLIENT2_MAC))[0] == SENT[hook]
    ports = {ext.snat_port(), ext.snat_port(client=CLIENT2)}
    assert ports == {61000, 61001}

    verdict, _ = ext.run(hook, tcp_in(30083))  # same client and port, same backend
    assert verdict == DROP[hook]
    assert ext.lab.counters()["snat_no_port"] == 1

    ext.lab.age_ct(61)  # past the SYN lifetime
    assert ext.run(hook, tcp_in(30083))[0] == SENT[hook]
    assert ext.snat_port(port=30083) in ports


@pytest.mark.parametrize("hook", HOOKS)
def test_a_snat_flow_keeps_its_backend_and_port(ext: Ext, hook: str) -> None:
    _, first = ext.run(hook, tcp_in(30081))
    _, second = ext.run(hook, tcp_in(30081, flags="A", seq=1001, ack=1))
    assert P.ports(second)[0] == P.ports(first)[0]
    assert P.ip_addrs(second) == (NODE_IP, REMOTE)
    c = ext.lab.counters()
    assert (c["ct_misses"], c["ct_hits"], c["snat"]) == (1, 1, 2)
    listed = {(e.direction, e.state) for e in conntrack.entries(ext.lab.dp.maps)}
    assert listed == {("forward", "established+snat"), ("reverse", "established+snat")}


def test_a_lost_forward_entry_finds_its_snat_port_again(ext: Ext) -> None:
    """The first port tried is a hash of the client's tuple: the reverse entry there is the
    flow's own, so it keeps its port (and its connection)."""
    ext.run("tc", tcp_in(30081))
    port = ext.snat_port()
    ext.lab.drop_ct("fwd")
    _, out = ext.run("tc", tcp_in(30081, flags="A"))
    assert P.ports(out)[0] == port
    assert len(ext.lab.ct()) == 2


def test_xdp_leaves_a_packet_without_neighbour_to_tc(ext: Ext) -> None:
    """node2's MAC is unknown: XDP passes the packet untouched; tc, behind it on the same
    interface, finds the flow XDP made and sends it with bpf_redirect_neigh."""
    frame = tcp_in(30090)
    verdict, out = ext.run("xdp", frame)
    assert (verdict, out) == (XDP_PASS, frame)
    assert path_counts(ext.lab, "xdp") == (0, 0, 1)

    verdict, out = ext.run("tc", frame)
    assert verdict == TC_ACT_REDIRECT
    assert P.ip_addrs(out) == (NODE_IP, UNRESOLVED)
    assert out[:12] == frame[:12]  # the MACs are the neighbour subsystem's to write
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["fib_redirect_neigh"], c["ct_misses"], c["ct_hits"]) == (1, 1, 1)
    assert (c["nodeport_xdp"], c["nodeport_tc"]) == (0, 1)


def rst_out(flags: str, seq: int, ack: int, dport: int) -> bytes:
    return bytes(
        Ether(src=ETH0_MAC, dst=CLIENT_MAC)
        / IP(src=NODE_IP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=dport, dport=40000, flags=flags, seq=seq, ack=ack, window=0)
    )


def unreachable_out(frame: bytes) -> bytes:
    quote = frame[14 : P.l4_offset(frame) + 8]
    return bytes(
        Ether(src=ETH0_MAC, dst=CLIENT_MAC)
        / IP(src=NODE_IP, dst=CLIENT, ttl=64, id=0, flags=0, proto=1)
        / ICMP(type=3, code=3)
        / Raw(quote)
    )


REFUSE_CASES = [
    ("tcp-syn", tcp_in(30082, seq=1000), rst_out("RA", 0, 1001, 30082)),
    ("tcp-ack", tcp_in(30082, flags="A", seq=1000, ack=777), rst_out("R", 777, 0, 30082)),
    ("udp-small", udp_in(30055, payload=b"q"), unreachable_out(udp_in(30055, payload=b"q"))),
    ("udp-large", udp_in(30055, payload=PAYLOAD), unreachable_out(udp_in(30055, payload=PAYLOAD))),
    (
        "udp-ip-options",
        udp_in(30055, options=P.MAX_OPTIONS),
        unreachable_out(udp_in(30055, options=P.MAX_OPTIONS)),
    ),
]


@pytest.mark.parametrize(
    ("frame", "want"), [c[1:] for c in REFUSE_CASES], ids=[c[0] for c in REFUSE_CASES]
)
@pytest.mark.parametrize("hook", HOOKS)
def test_a_nodeport_without_endpoints_refuses(
    ext: Ext, hook: str, frame: bytes, want: bytes
) -> None:
    """Also externalTrafficPolicy=Local on a node without a local endpoint: the agent gives
    the frontend no backends."""
    verdict, out = ext.run(hook, frame)
    assert verdict == SENT[hook]  # back out of eth0
    P.assert_frame(out, want)
    P.check_checksums(out)
    c = ext.lab.counters()
    assert (c["no_backend"], c["errors"], c["dnat"]) == (1, 0, 0)
    assert path_counts(ext.lab, hook) == (1, 0, 0)
    assert not ext.lab.dp.maps.conntrack.items()


# (id, frame arriving on eth0, the counter that must count it) -- with FRONTENDS programmed
PASS_CASES = [
    ("pod-to-pod-transit", P.tcp("10.244.1.5", LOCAL, 40000, 8080), "passed"),
    ("node-address-other-port", tcp_in(22), "passed"),
    ("node-address-snat-port-without-flow", tcp_in(61000, sport=8080, src=REMOTE), "passed"),
    ("clusterip-from-outside", tcp_in(80, dst=CLUSTER_IP), "passed"),
    ("node-address-frontend-not-nodeport", tcp_in(30091), "passed"),
    ("tcp-to-udp-nodeport", tcp_in(30053), "passed"),
    ("icmp-to-node", P.icmp_echo(CLIENT, NODE_IP), "other"),
    ("arp-for-node", P.arp_request(CLIENT, NODE_IP), "other"),
    ("ipv6-tcp", P.ipv6_tcp(), "other"),
    ("udp-first-fragment", udp_in(30054, mf=True, payload=PAYLOAD[:64]), "fragments"),
    ("tcp-later-fragment", tcp_in(30081, frag=3, payload=PAYLOAD[:64]), "fragments"),
]


@pytest.mark.parametrize(
    ("frame", "counter"), [c[1:] for c in PASS_CASES], ids=[c[0] for c in PASS_CASES]
)
@pytest.mark.parametrize("hook", HOOKS)
def test_no_match_passes_untouched(ext: Ext, hook: str, frame: bytes, counter: str) -> None:
    verdict, out = ext.run(hook, frame)
    assert verdict == PASS[hook]
    assert out == frame
    c = ext.lab.counters()
    assert c[counter] == 1
    assert c["dnat"] == c["rev_nat"] == c["ct_misses"] == c["xdp_pass_to_tc"] == 0
    assert not ext.lab.dp.maps.conntrack.items()


WHOLE = (("tcp", tcp_in(30081, payload=b"")), ("udp", udp_in(30054, payload=b"")))
TRUNCATED = [(f"{name}-{n}", whole[:n]) for name, whole in WHOLE for n in range(len(whole))] + [
    (f"{name}-tot-len-{n - 14}", P.set_tot_len(whole[:n], n - 14))
    for name, whole in WHOLE
    for n in range(34, len(whole))
]
# Shortest frames BPF_PROG_TEST_RUN takes (shorter ones: EINVAL before the program runs; a
# real interface hands them over, as test_veth.py shows for tc).
SHORTEST = {"xdp": 14, "tc": 34}


@pytest.mark.parametrize("frame", [c[1] for c in TRUNCATED], ids=[c[0] for c in TRUNCATED])
@pytest.mark.parametrize("hook", HOOKS)
def test_truncated_packets_pass_untouched(ext: Ext, hook: str, frame: bytes) -> None:
    if len(frame) < SHORTEST[hook]:
        with pytest.raises(OSError) as e:
            ext.run(hook, frame)
        assert e.value.errno == errno.EINVAL
        return
    verdict, out = ext.run(hook, frame)
    assert verdict == PASS[hook]
    assert out == frame
    assert ext.lab.counters()["malformed"] == 1
    assert not ext.lab.dp.maps.conntrack.items()


def with_seed(frame: bytes) -> bytes:
    """frame with its TCP/UDP checksum field holding only the pseudo header's sum, as a
    sender's pending checksum offload leaves it (CHECKSUM_PARTIAL)."""
    off = P.l4_offset(frame)
    field = off + (16 if frame[23] == 6 else 6)
    seg_len = struct.unpack("!H", frame[16:18])[0] - P.ihl(frame)
    seed = P.ones_sum(frame[26:34] + struct.pack("!BBH", 0, frame[23], seg_len))
    return frame[:field] + struct.pack("!H", seed) + frame[field + 2 :]


def test_xdp_with_a_partial_checksum_dnats_locally_and_leaves_the_rest_to_tc(ext: Ext) -> None:
    """On a veth (LB_IF_F_PARTIAL_CSUM) XDP can meet a pending offload: after XDP_PASS the skb
    keeps it, so XDP writes the new pseudo header's sum; a packet XDP would have to send on
    itself (an XDP_TX frame becomes a new skb whose checksum is verified) goes to tc."""
    ext.iface_flags(IF_F_PARTIAL_CSUM)
    verdict, out = ext.run("xdp", with_seed(tcp_in(30080)))
    assert verdict == XDP_PASS
    P.assert_frame(out, with_seed(tcp_in(8080, dst=LOCAL)))
    assert path_counts(ext.lab, "xdp") == (1, 0, 0)

    frame = with_seed(tcp_in(30081))
    verdict, out = ext.run("xdp", frame)
    assert (verdict, out) == (XDP_PASS, frame)
    assert path_counts(ext.lab, "xdp") == (1, 0, 1)

    # Whole checksums and no checksum at all stay XDP's on such an interface.
    assert ext.run("xdp", tcp_in(30081, sport=40001))[0] == XDP_TX
    assert ext.run("xdp", udp_in(30054, no_checksum=True))[0] == XDP_TX
    assert path_counts(ext.lab, "xdp") == (3, 0, 1)


def test_xdp_that_must_not_transmit_leaves_sending_to_tc(ext: Ext) -> None:
    """LB_IF_F_NO_XDP_TX (native XDP on a veth whose peer runs no XDP program): local DNAT is
    still XDP's, SNAT and refusals are tc's."""
    ext.iface_flags(IF_F_NO_XDP_TX)
    assert ext.run("xdp", tcp_in(30080))[0] == XDP_PASS
    for frame in (tcp_in(30081), tcp_in(30082)):
        assert ext.run("xdp", frame) == (XDP_PASS, frame)
    assert path_counts(ext.lab, "xdp") == (1, 0, 2)


@pytest.mark.parametrize("hook", HOOKS)
def test_without_a_node_address_remote_backends_are_dropped(ext: Ext, hook: str) -> None:
    """No SNAT source: the flow cannot be made; local backends still work."""
    ext.lab.dp.set_node([])
    assert ext.run(hook, tcp_in(30081))[0] == DROP[hook]
    assert ext.lab.counters()["snat_no_port"] == 1
    assert ext.run(hook, tcp_in(30080))[0] == PASS[hook]


def test_pods_reach_a_nodeport_without_snat(ext: Ext) -> None:
    """From a pod (from_pod) a NodePort is like any frontend: DNAT only, also to a remote
    backend (pod addresses are routed between nodes)."""
    frame = P.tcp(P.CLIENT, NODE_IP, 40000, 30081)
    verdict, out = ext.run_from_pod(frame)
    assert verdict == TC_ACT_OK
    P.assert_frame(out, P.tcp(P.CLIENT, REMOTE, 40000, 8080))
    assert ext.lab.counters()["snat"] == 0
