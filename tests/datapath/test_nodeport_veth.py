"""NodePort on real veths: an external client namespace reaches node 0's address:nodePort, TCP and
UDP, with a backend on node 0 (it sees the client's address) and one on node 1 (it sees node 0's:
SNAT), and is refused where there is none; under native XDP, generic XDP and tc, with checksum
offload on (partial checksums) and off. The counters say which path took the traffic."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ebpflb.datapath.loader import Datapath, DatapathError, ExternalMode, tc_programs
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import IF_F_NO_XDP_TX, IF_F_PARTIAL_CSUM
from tests.datapath import netns
from tests.datapath.conftest import Lab, skip_reason
from tests.datapath.scripts import CLIENT, SERVER

pytestmark = pytest.mark.datapath

NODE_IP = netns.Lan.node_ip(0)
LOCAL, REMOTE = "10.244.0.21", "10.244.1.21"

FRONTENDS = (
    Frontend(NODE_IP, 30080, "TCP", (Backend(LOCAL, 8080, local=True),), nodeport=True),
    Frontend(NODE_IP, 30053, "UDP", (Backend(LOCAL, 5353, local=True),), nodeport=True),
    Frontend(NODE_IP, 30081, "TCP", (Backend(REMOTE, 8080),), nodeport=True),
    Frontend(NODE_IP, 30054, "UDP", (Backend(REMOTE, 5353),), nodeport=True),
    Frontend(NODE_IP, 30082, "TCP", (), nodeport=True),  # e.g. Local, no endpoint here
    Frontend(NODE_IP, 30055, "UDP", (), nodeport=True),
)

# (check, expected result, the address the backend must have seen)
CHECKS: list[tuple[tuple[str, str, int, int], str, str | None]] = [
    (("tcp", NODE_IP, 30080, 100), "ok", "client"),
    (("tcp", NODE_IP, 30080, 300_000), "ok", "client"),
    (("udp", NODE_IP, 30053, 100), "ok", "client"),
    (("tcp", NODE_IP, 30081, 100), "ok", NODE_IP),
    (("tcp", NODE_IP, 30081, 300_000), "ok", NODE_IP),
    (("udp", NODE_IP, 30054, 100), "ok", NODE_IP),
    (("udp", NODE_IP, 30054, 1400), "ok", NODE_IP),
    (("tcp", NODE_IP, 30082, 1), "refused", None),
    (("udp", NODE_IP, 30055, 1), "refused", None),
]

PASS_XDP = b"int pass(struct xdp_md *ctx) { return XDP_PASS; }"


@pytest.fixture(scope="module")
def pass_xdp() -> Iterator[Any]:
    """A native XDP program that passes everything, for the switch's end of node 0's eth0:
    only then can the veth deliver node 0's XDP_TX frames."""
    if skip_reason():
        pytest.skip(str(skip_reason()))
    from bcc import BPF

    b = BPF(text=PASS_XDP)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def cluster(lab: Lab) -> Iterator[netns.Lan]:
    """Two nodes and the client; pod b (10.244.0.21) on node 0, pod r (10.244.1.21) on node 1,
    each running the whoami SERVER; the datapath on node 0 only (node 1 is a plain router here)."""
    with netns.lan(2) as lan:
        n0, n1 = lan.nodes
        b = n0.add_pod("b", 21)
        n1.add_pod("r", 21)
        n0.start("b", SERVER, "whoami", "tcp:8080", "udp:5353")
        n1.start("r", SERVER, "whoami", "tcp:8080", "udp:5353")
        with netns.inside(n0.ns):
            for direction in ("ingress", "egress"):
                lab.dp.attach(n0.ifindex(b.host_veth), direction)
        lab.dp.set_node([NODE_IP])
        lab.sync(*FRONTENDS)
        try:
            yield lan
        finally:
            with netns.inside(n0.ns):
                for ifindex in list(lab.dp.external):
                    lab.dp.detach_external(ifindex)
                for ifindex, direction in list(lab.dp.attached):
                    lab.dp.detach(ifindex, direction)
                assert not netns.sh("tc", "filter", "show", "dev", "eth0", "ingress").strip()
                assert tc_programs("eth0", "ingress") == []
                assert " xdp" not in netns.sh("ip", "link", "show", "eth0")
            assert not lab.dp.attached and not lab.dp.external


def run_checks(lan: netns.Lan) -> None:
    checks = json.dumps([c[0] for c in CHECKS])
    results = json.loads(lan.python(lan.client, CLIENT, "whoami", checks))
    for (check, want, peer), got in zip(CHECKS, results, strict=True):
        assert got["result"] == want, (check, got)
        if want == "refused":
            assert got["seconds"] < 1, (check, got)
        if peer is not None:
            assert got["peer"] == (lan.client_ip if peer == "client" else peer), (check, got)


# (id, mode, checksum offload on, switch end of eth0 runs native XDP, eth0's LB_IF_F_* flags)
CASES = [
    ("tc", "tc", True, False, IF_F_PARTIAL_CSUM),
    ("xdp-generic", "xdp-generic", True, False, IF_F_PARTIAL_CSUM),
    ("xdp-generic-full-csum", "xdp-generic", False, False, IF_F_PARTIAL_CSUM),
    ("xdp", "xdp", True, False, IF_F_PARTIAL_CSUM | IF_F_NO_XDP_TX),
    ("xdp-full-csum-peer-xdp", "xdp", False, True, IF_F_PARTIAL_CSUM),
]


@pytest.mark.parametrize(
    ("mode", "offload", "peer_xdp", "flags"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_external_client_reaches_the_nodeport(
    lab: Lab,
    cluster: netns.Lan,
    pass_xdp: Any,
    mode: ExternalMode,
    offload: bool,
    peer_xdp: bool,
    flags: int,
) -> None:
    from bcc import BPF

    n0 = cluster.nodes[0]
    if not offload:  # every sender's checksums whole, as from a wire
        for ns in (cluster.client, n0.pods["b"].ns, cluster.nodes[1].pods["r"].ns):
            netns.set_checksum_offload(ns, "eth0", False)
    if peer_xdp:
        with netns.inside(cluster.switch):
            pass_xdp.attach_xdp(cluster.port(0).encode(), pass_xdp.load_func(b"pass", BPF.XDP), 4)
    with netns.inside(n0.ns):
        eth0 = n0.ifindex("eth0")
        assert lab.dp.attach_external(eth0, mode) == mode
    assert lab.dp.node_settings().interfaces == {eth0: flags}

    run_checks(cluster)

    c = lab.counters()
    assert c["errors"] == c["fib_fail"] == c["snat_no_port"] == 0, c
    assert c["snat"] > 0 and c["rev_snat"] > 0 and c["no_backend"] >= 2, c
    assert c["fib_redirect"] > 0, c  # replies of the local backend, routed out by from_pod
    if mode == "tc":
        assert c["nodeport_tc"] > 0 and c["nodeport_xdp"] == c["xdp_pass_to_tc"] == 0, c
    elif offload or (mode == "xdp" and not peer_xdp):
        # XDP DNATs to the local backend; the SNAT paths' partial checksums (or XDP_TX
        # frames the veth would drop) are tc's.
        assert c["nodeport_xdp"] > 0 and c["nodeport_tc"] > 0, c
        assert c["xdp_pass_to_tc"] == c["nodeport_tc"], c
    else:
        # Whole checksums: XDP does everything but the first packet to a next hop whose MAC
        # was unknown (and maybe a refusal it cannot grow into an ICMP error).
        assert c["nodeport_xdp"] > 10 * c["nodeport_tc"], c


def test_attach_external_replaces_and_detach_leaves_foreign_programs(
    lab: Lab, pass_xdp: Any
) -> None:
    """A second attach replaces the first (also across modes); detach removes only ours."""
    from bcc import BPF

    with netns.lan(1) as lan:
        n0 = lan.nodes[0]
        with netns.inside(n0.ns):
            eth0 = n0.ifindex("eth0")
            for mode in ("xdp", "xdp-generic", "tc", "xdp"):
                lab.dp.attach_external(eth0, mode)
                link = netns.sh("ip", "link", "show", "eth0")
                assert ("prog/xdp" in link) == (mode != "tc"), link
                ((name, _),) = tc_programs("eth0", "ingress")
                assert name == "nodeport_tc"
            lab.dp.detach_external(eth0)
            assert "prog/xdp" not in netns.sh("ip", "link", "show", "eth0")
            assert lab.dp.node_settings().interfaces == {}

            pass_xdp.attach_xdp(b"eth0", pass_xdp.load_func(b"pass", BPF.XDP), 2)
            lab.dp.detach_external(eth0)  # not ours: stays
            assert "xdpgeneric" in netns.sh("ip", "link", "show", "eth0")
            pass_xdp.remove_xdp(b"eth0", 2)

            # A bridge has no native XDP: refused, and nothing is left behind.
            with pytest.raises(DatapathError, match="xdp on cni0"):
                lab.dp.attach_external(n0.ifindex("cni0"), "xdp")
            assert "clsact" not in netns.sh("tc", "qdisc", "show", "dev", "cni0")
            assert tc_programs("cni0", "ingress") == []
            assert lab.dp.external == {} and lab.dp.node_settings().interfaces == {}


def test_default_mode_by_driver(lab: Lab) -> None:
    from ebpflb.datapath import ifaces
    from ebpflb.datapath.loader import DEFAULT_MODES, default_external_mode

    with netns.lan(1) as lan, netns.inside(lan.nodes[0].ns):
        assert ifaces.driver("eth0") == "veth"
        assert ifaces.driver("cni0") == "bridge"
        assert ifaces.driver("lo") == ""
        assert default_external_mode("eth0") == DEFAULT_MODES["veth"]
        assert default_external_mode("cni0") == "tc"
    assert DEFAULT_MODES["virtio_net"] == "xdp"


def test_datapath_close_with_cleanup_detaches_external(datapath: Datapath) -> None:
    from tests.datapath.conftest import TEST_CONFIG, new_pin_dir

    pin_dir = new_pin_dir()
    try:
        with netns.lan(1) as lan:
            n0 = lan.nodes[0]
            dp = Datapath(pin_dir, TEST_CONFIG)
            with netns.inside(n0.ns):
                dp.attach_external(n0.ifindex("eth0"), "xdp-generic")
                dp.close(cleanup=True)
                assert "prog/xdp" not in netns.sh("ip", "link", "show", "eth0")
                assert "clsact" not in netns.sh("tc", "qdisc", "show", "dev", "eth0")
                assert tc_programs("eth0", "ingress") == []
            assert not pin_dir.exists()
    finally:
        from ebpflb.datapath.loader import remove_pins

        remove_pins(pin_dir)


SEND_RAW = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for frame in sys.argv[1:]:
    s.send(bytes.fromhex(frame))
print("sent")
"""


@pytest.mark.parametrize(("mode", "hooks"), [("tc", 1), ("xdp-generic", 2)])
def test_truncated_frames_from_outside_pass(lab: Lab, mode: ExternalMode, hooks: int) -> None:
    """The lengths BPF_PROG_TEST_RUN refuses to a tc program, sent for real into the external
    interface (from a client on a veth straight into the node: a bridge on the way would drop
    them): each is counted as malformed (by XDP and by tc behind it) and let through."""
    import time

    from tests.datapath import packets as P

    with netns.node() as n:
        client = f"ebl-c-{n.tag}"
        try:
            netns.new_ns(client)
            netns.sh("ip", "-n", n.ns, "link", "add", "ext0", "type", "veth",
                     "peer", "name", "eth0", "netns", client)  # fmt: skip
            for ns, ifname in ((n.ns, "ext0"), (client, "eth0")):
                netns.sh("ip", "-n", ns, "link", "set", ifname, "up")
            ext0 = n.ifindex("ext0")
            with netns.inside(n.ns):  # under clsact, whose qdisc counts what tc dropped
                lab.dp.tcx = False
                try:
                    lab.dp.attach_external(ext0, mode)
                finally:
                    lab.dp.tcx = True
            lab.dp.set_node([NODE_IP])
            lab.sync(*FRONTENDS)
            whole = P.tcp("192.168.50.200", NODE_IP, 40000, 30081,
                          src_mac=n.mac("eth0", client), dst_mac=n.mac("ext0"))  # fmt: skip
            frames = [whole[:k] for k in range(14, 34)]
            argv = ["ip", "netns", "exec", client, sys.executable, "-c", SEND_RAW]
            subprocess.run([*argv, *(f.hex() for f in frames)], check=True, capture_output=True)
            want = hooks * len(frames)
            deadline = time.monotonic() + 3
            while lab.counters()["malformed"] < want and time.monotonic() < deadline:
                time.sleep(0.05)
            c = lab.counters()
            assert c["malformed"] == want, c
            assert c["dnat"] == c["xdp_pass_to_tc"] == c["errors"] == 0, c
            out = netns.sh("tc", "-n", n.ns, "-s", "-j", "qdisc", "show", "dev", "ext0")
            (clsact,) = [q for q in json.loads(out) if q["kind"] == "clsact"]
            assert int(clsact["drops"]) == 0
        finally:
            with netns.inside(n.ns):
                for ifindex in list(lab.dp.external):
                    lab.dp.detach_external(ifindex)
            subprocess.run(["ip", "netns", "del", client], capture_output=True)
