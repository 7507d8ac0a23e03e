"""Hairpin: a pod reaching itself through a VIP is SNATed to the hairpin address, and back."""

from __future__ import annotations

import pytest

from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

SELF = (
    Frontend(P.VIP, 80, "TCP", (Backend(P.CLIENT, 8080),)),
    Frontend(P.VIP, 53, "UDP", (Backend(P.CLIENT, 5353),)),
)
POD, GW, H = P.POD_MAC, P.GW_MAC, P.HAIRPIN

# (id, the pod's packet to the VIP, what goes back into the pod, the pod's reply, what the pod gets)
CASES = [
    (
        "tcp",
        P.tcp(),
        P.tcp(H, P.CLIENT, 40000, 8080, src_mac=GW, dst_mac=POD),
        P.tcp(P.CLIENT, H, 8080, 40000, "SA", seq=9, ack=1001),
        P.tcp(P.VIP, P.CLIENT, 80, 40000, "SA", seq=9, ack=1001, src_mac=GW, dst_mac=POD),
    ),
    (
        "udp",
        P.udp(),
        P.udp(H, P.CLIENT, 40000, 5353, src_mac=GW, dst_mac=POD),
        P.udp(P.CLIENT, H, 5353, 40000, b"answer"),
        P.udp(P.VIP, P.CLIENT, 53, 40000, b"answer", src_mac=GW, dst_mac=POD),
    ),
    (
        "udp-no-checksum",
        P.udp(no_checksum=True),
        P.udp(H, P.CLIENT, 40000, 5353, src_mac=GW, dst_mac=POD, no_checksum=True),
        P.udp(P.CLIENT, H, 5353, 40000, b"a", no_checksum=True),
        P.udp(P.VIP, P.CLIENT, 53, 40000, b"a", src_mac=GW, dst_mac=POD, no_checksum=True),
    ),
]


@pytest.mark.parametrize(
    ("request_", "delivered", "reply", "answer"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hairpin_both_ways(
    lab: Lab, request_: bytes, delivered: bytes, reply: bytes, answer: bytes
) -> None:
    lab.sync(*SELF)
    verdict, out = lab.run(request_)
    assert verdict == TC_ACT_REDIRECT  # straight back into the pod, not through routing
    P.assert_frame(out, delivered)
    P.check_checksums(out)

    verdict, out = lab.run(reply)  # the reply arrives at the same veth's ingress
    assert verdict == TC_ACT_REDIRECT
    P.assert_frame(out, answer)
    P.check_checksums(out)
    c = lab.counters()
    assert (c["dnat"], c["rev_nat"], c["hairpin"]) == (1, 1, 2)


def test_other_clients_of_the_same_backend_are_not_hairpinned(lab: Lab) -> None:
    lab.sync(*SELF)
    frame = P.tcp(src=P.CLIENT2)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_OK
    P.assert_frame(out, P.tcp(src=P.CLIENT2, dst=P.CLIENT, dport=8080))
    assert lab.counters()["hairpin"] == 0


def test_hairpin_flow_hits_conntrack(lab: Lab) -> None:
    lab.sync(*SELF)
    lab.run(P.tcp())
    verdict, out = lab.run(P.tcp(flags="A"))
    assert verdict == TC_ACT_REDIRECT
    P.assert_frame(out, P.tcp(H, P.CLIENT, 40000, 8080, "A", src_mac=GW, dst_mac=POD))
    assert lab.counters()["ct_hits"] == 1
