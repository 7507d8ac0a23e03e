"""A frontend without backends refuses at once: TCP RST, ICMP port unreachable, sent back."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

EMPTY = (Frontend(P.VIP, 80, "TCP"), Frontend(P.VIP, 53, "UDP"))


def rst(flags: str, seq: int, ack: int) -> bytes:
    """The RST the client must get: from the VIP, to the pod's MAC, no options, no payload."""
    return bytes(
        Ether(src=P.GW_MAC, dst=P.POD_MAC)
        / IP(src=P.VIP, dst=P.CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags=flags, seq=seq, ack=ack, window=0)
    )


# (id, the client's segment, the RST) -- RFC 9293 3.10.7.1
RST_CASES = [
    ("syn", P.tcp(flags="S", seq=1000), rst("RA", 0, 1001)),
    ("syn-with-data", P.tcp(flags="S", seq=1000, payload=b"0123456789"), rst("RA", 0, 1011)),
    ("syn-ip-options", P.tcp(flags="S", seq=1000, options=P.MAX_OPTIONS), rst("RA", 0, 1001)),
    ("syn-seq-wraps", P.tcp(flags="S", seq=0xFFFFFFFF), rst("RA", 0, 0)),
    ("ack", P.tcp(flags="A", seq=1000, ack=777), rst("R", 777, 0)),
    ("data-ack", P.tcp(flags="PA", seq=5, ack=9, payload=b"x" * 1000), rst("R", 9, 0)),
    ("fin-ack", P.tcp(flags="FA", seq=5, ack=9), rst("R", 9, 0)),
    ("fin-no-ack", P.tcp(flags="F", seq=5), rst("RA", 0, 6)),
]


@pytest.mark.parametrize(
    ("frame", "want"), [c[1:] for c in RST_CASES], ids=[c[0] for c in RST_CASES]
)
def test_tcp_is_answered_with_rst(lab: Lab, frame: bytes, want: bytes) -> None:
    lab.sync(*EMPTY)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_REDIRECT  # back out of the interface it came in on
    P.assert_frame(out, want)
    P.check_checksums(out)
    c = lab.counters()
    assert (c["no_backend"], c["errors"], c["dnat"]) == (1, 0, 0)
    assert not lab.dp.maps.conntrack.items()


def test_rst_is_never_answered(lab: Lab) -> None:
    lab.sync(*EMPTY)
    verdict, _ = lab.run(P.tcp(flags="R", seq=5))
    assert verdict == TC_ACT_SHOT
    assert lab.counters()["no_backend"] == 1


def unreachable(frame: bytes) -> bytes:
    """ICMP port unreachable from the VIP quoting frame's IP header (with options) + 8 bytes."""
    quote = frame[14 : P.l4_offset(frame) + 8]
    return bytes(
        Ether(src=P.GW_MAC, dst=P.POD_MAC)
        / IP(src=P.VIP, dst=P.CLIENT, ttl=64, id=0, flags=0, proto=1)
        / ICMP(type=3, code=3)
        / Raw(quote)
    )


UDP_CASES = [
    ("small", P.udp(payload=b"q")),
    ("empty", P.udp(payload=b"")),
    ("large", P.udp(payload=bytes(1400))),
    ("no-checksum", P.udp(no_checksum=True)),
    ("ip-options-ihl6", P.udp(options=P.RTR_ALERT)),
    ("ip-options-ihl15", P.udp(options=P.MAX_OPTIONS)),
]


@pytest.mark.parametrize("frame", [c[1] for c in UDP_CASES], ids=[c[0] for c in UDP_CASES])
def test_udp_is_answered_with_port_unreachable(lab: Lab, frame: bytes) -> None:
    lab.sync(*EMPTY)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_REDIRECT
    P.assert_frame(out, unreachable(frame))
    P.check_checksums(out)
    assert out[P.l4_offset(out) + 8 :] == frame[14 : P.l4_offset(frame) + 8]
    c = lab.counters()
    assert (c["no_backend"], c["errors"]) == (1, 0)


def test_established_flow_is_reset_when_its_service_empties(lab: Lab) -> None:
    lab.sync(Frontend(P.VIP, 80, "TCP", (Backend(P.BACKENDS[0], 8080),)))
    lab.run(P.tcp())
    lab.sync(Frontend(P.VIP, 80, "TCP"))
    verdict, out = lab.run(P.tcp(flags="PA", seq=1001, ack=4242, payload=b"more"))
    assert verdict == TC_ACT_REDIRECT
    P.assert_frame(out, rst("R", 4242, 0))
    c = lab.counters()
    assert (c["reselects"], c["no_backend"]) == (1, 1)
