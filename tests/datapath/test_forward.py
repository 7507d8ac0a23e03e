"""DNAT of client packets, reverse NAT of replies, and everything that must pass untouched."""

from __future__ import annotations

import errno

import pytest

from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

B0 = P.BACKENDS[0]
B0_MAC = "0a:58:0a:f4:00:15"

FRONTENDS = (
    Frontend(P.VIP, 80, "TCP", (Backend(B0, 8080),)),
    Frontend(P.VIP, 443, "TCP", (Backend(B0, 443),)),  # same port: only the address changes
    Frontend(P.VIP, 53, "UDP", (Backend(B0, 5353),)),
)

PAYLOAD = bytes(range(256)) * 5 + b"tail"

# (id, client's frame, the frame the backend must get)
DNAT_CASES = [
    ("tcp-syn", P.tcp(), P.tcp(dst=B0, dport=8080)),
    ("tcp-syn-same-port", P.tcp(dport=443), P.tcp(dst=B0, dport=443)),
    (
        "tcp-data-starts-flow",  # a flow seen first mid-stream (agent restart, LRU eviction)
        P.tcp(flags="PA", seq=77, ack=99, payload=b"GET / HTTP/1.1\r\n\r\n"),
        P.tcp(flags="PA", seq=77, ack=99, payload=b"GET / HTTP/1.1\r\n\r\n", dst=B0, dport=8080),
    ),
    (
        "tcp-large",
        P.tcp(flags="A", payload=PAYLOAD),
        P.tcp(flags="A", payload=PAYLOAD, dst=B0, dport=8080),
    ),
    (
        "tcp-ip-options-ihl6",
        P.tcp(options=P.RTR_ALERT),
        P.tcp(options=P.RTR_ALERT, dst=B0, dport=8080),
    ),
    (
        "tcp-ip-options-ihl15",
        P.tcp(options=P.MAX_OPTIONS, payload=b"x"),
        P.tcp(options=P.MAX_OPTIONS, payload=b"x", dst=B0, dport=8080),
    ),
    ("udp", P.udp(), P.udp(dst=B0, dport=5353)),
    ("udp-no-checksum", P.udp(no_checksum=True), P.udp(dst=B0, dport=5353, no_checksum=True)),
    ("udp-large", P.udp(payload=PAYLOAD), P.udp(payload=PAYLOAD, dst=B0, dport=5353)),
    (
        "udp-ip-options",
        P.udp(options=P.RTR_ALERT),
        P.udp(options=P.RTR_ALERT, dst=B0, dport=5353),
    ),
    ("udp-empty", P.udp(payload=b""), P.udp(payload=b"", dst=B0, dport=5353)),
]


@pytest.mark.parametrize(
    ("frame", "want"), [c[1:] for c in DNAT_CASES], ids=[c[0] for c in DNAT_CASES]
)
def test_dnat(lab: Lab, frame: bytes, want: bytes) -> None:
    lab.sync(*FRONTENDS)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_OK
    P.assert_frame(out, want)
    P.check_checksums(out)
    c = lab.counters()
    assert (c["dnat"], c["ct_misses"], c["ct_hits"], c["packets"]) == (1, 1, 0, 1)


def test_udp_zero_checksum_stays_zero(lab: Lab) -> None:
    lab.sync(*FRONTENDS)
    _, out = lab.run(P.udp(no_checksum=True))
    assert P.udp_checksum_field(out) == 0
    _, out = lab.run(P.udp(src=B0, dst=P.CLIENT, sport=5353, dport=40000, no_checksum=True))
    assert P.udp_checksum_field(out) == 0


def test_second_packet_is_a_conntrack_hit(lab: Lab) -> None:
    lab.sync(*FRONTENDS)
    lab.run(P.tcp())
    verdict, out = lab.run(P.tcp(flags="A", seq=1001, ack=5001))
    assert verdict == TC_ACT_OK
    P.assert_frame(out, P.tcp(flags="A", seq=1001, ack=5001, dst=B0, dport=8080))
    c = lab.counters()
    assert (c["dnat"], c["ct_misses"], c["ct_hits"]) == (2, 1, 1)


# (id, client's frame, backend's reply, what the client must get)
REPLY_CASES = [
    (
        "tcp-synack",
        P.tcp(),
        P.tcp(
            B0, P.CLIENT, 8080, 40000, "SA", seq=5000, ack=1001, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
        P.tcp(
            P.VIP, P.CLIENT, 80, 40000, "SA", seq=5000, ack=1001, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
    ),
    (
        "tcp-same-port-data",
        P.tcp(dport=443),
        P.tcp(B0, P.CLIENT, 443, 40000, "PA", payload=PAYLOAD, src_mac=B0_MAC, dst_mac=P.POD_MAC),
        P.tcp(
            P.VIP, P.CLIENT, 443, 40000, "PA", payload=PAYLOAD, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
    ),
    (
        "tcp-reply-ip-options",
        P.tcp(),
        P.tcp(
            B0, P.CLIENT, 8080, 40000, "SA", options=P.RTR_ALERT, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
        P.tcp(
            P.VIP, P.CLIENT, 80, 40000, "SA", options=P.RTR_ALERT, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
    ),
    (
        "udp",
        P.udp(),
        P.udp(B0, P.CLIENT, 5353, 40000, b"answer", src_mac=B0_MAC, dst_mac=P.POD_MAC),
        P.udp(P.VIP, P.CLIENT, 53, 40000, b"answer", src_mac=B0_MAC, dst_mac=P.POD_MAC),
    ),
    (
        "udp-no-checksum",
        P.udp(),
        P.udp(B0, P.CLIENT, 5353, 40000, b"a", no_checksum=True, src_mac=B0_MAC, dst_mac=P.POD_MAC),
        P.udp(
            P.VIP, P.CLIENT, 53, 40000, b"a", no_checksum=True, src_mac=B0_MAC, dst_mac=P.POD_MAC
        ),
    ),
]


@pytest.mark.parametrize(
    ("first", "reply", "want"), [c[1:] for c in REPLY_CASES], ids=[c[0] for c in REPLY_CASES]
)
@pytest.mark.parametrize("hook", ["ingress", "egress"])
def test_reverse_nat(lab: Lab, first: bytes, reply: bytes, want: bytes, hook: str) -> None:
    """At the backend veth's ingress (from_pod), or the client veth's egress (to_pod)."""
    lab.sync(*FRONTENDS)
    lab.run(first)
    verdict, out = lab.run(reply) if hook == "ingress" else lab.run_egress(reply)
    assert verdict == TC_ACT_OK
    P.assert_frame(out, want)
    P.check_checksums(out)
    assert lab.counters()["rev_nat"] == 1


def test_egress_leaves_forward_packets_alone(lab: Lab) -> None:
    lab.sync(*FRONTENDS)
    _, dnated = lab.run(P.tcp())
    for frame in (P.tcp(), dnated):
        verdict, out = lab.run_egress(frame)
        assert verdict == TC_ACT_OK
        assert out == frame


# (id, frame, the counter that must count it) -- with FRONTENDS programmed
PASS_CASES = [
    ("tcp-other-port", P.tcp(dport=81), "passed"),
    ("tcp-other-ip", P.tcp(dst=P.OTHER), "passed"),
    ("tcp-to-udp-frontend", P.tcp(dport=53), "passed"),
    ("udp-to-tcp-frontend", P.udp(dport=80), "passed"),
    ("reply-without-flow", P.tcp(B0, P.CLIENT, 8080, 40000, "SA"), "passed"),
    ("icmp-to-vip", P.icmp_echo(), "other"),
    ("arp-for-vip", P.arp_request(), "other"),
    ("ipv6-tcp", P.ipv6_tcp(), "other"),
    ("udp-first-fragment", P.udp(mf=True, payload=PAYLOAD[:64]), "fragments"),
    ("udp-later-fragment", P.udp(frag=185, payload=PAYLOAD[:64]), "fragments"),
    ("tcp-first-fragment", P.tcp(mf=True, payload=PAYLOAD[:64]), "fragments"),
    ("tcp-last-fragment", P.tcp(frag=3, payload=PAYLOAD[:64]), "fragments"),
]


@pytest.mark.parametrize(
    ("frame", "counter"), [c[1:] for c in PASS_CASES], ids=[c[0] for c in PASS_CASES]
)
def test_no_match_passes_untouched(lab: Lab, frame: bytes, counter: str) -> None:
    lab.sync(*FRONTENDS)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_OK
    assert out == frame
    c = lab.counters()
    assert c[counter] == 1
    assert c["dnat"] == c["rev_nat"] == c["ct_misses"] == 0
    assert not lab.dp.maps.conntrack.items()


TRUNCATED = [
    (f"{name}-{n}", whole[:n])
    for name, whole in (("tcp", P.tcp(payload=b"")), ("udp", P.udp(payload=b"")))
    for n in range(len(whole))
]
# Whole frames whose IP header says they end early: every cut inside the L4 header.
SHORT_TOT_LEN = [
    (f"{name}-tot-len-{n - 14}", P.set_tot_len(whole[:n], n - 14))
    for name, whole in (("tcp", P.tcp(payload=b"")), ("udp", P.udp(payload=b"")))
    for n in range(34, len(whole))
]


@pytest.mark.parametrize(
    "frame",
    [c[1] for c in TRUNCATED + SHORT_TOT_LEN],
    ids=[c[0] for c in TRUNCATED + SHORT_TOT_LEN],
)
def test_truncated_packets_pass_untouched(lab: Lab, frame: bytes) -> None:
    lab.sync(*FRONTENDS)
    if len(frame) < 14 + 20:
        # BPF_PROG_TEST_RUN refuses an IPv4 frame without a whole IPv4 header
        # (EINVAL before the program runs); test_veth.py sends these through
        # a real veth instead.
        with pytest.raises(OSError) as e:
            lab.run(frame)
        assert e.value.errno == errno.EINVAL
        return
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_OK
    assert out == frame
    assert lab.counters()["malformed"] == 1
    assert not lab.dp.maps.conntrack.items()


def _patch(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value) :]


TCP_OFF = 34  # TCP header offset with a 20-byte IP header
MALFORMED = [
    ("ihl-4", _patch(P.tcp(), 14, b"\x44")),
    ("ihl-0", _patch(P.tcp(), 14, b"\x40")),
    ("ihl-beyond-frame", _patch(P.tcp(), 14, b"\x4f")),
    ("version-6-in-ipv4-frame", _patch(P.tcp(), 14, b"\x65")),
    ("tot-len-shorter-than-ip-header", P.set_tot_len(P.tcp(), 19)),
    ("tot-len-zero", P.set_tot_len(P.tcp(), 0)),
    ("tot-len-beyond-frame", P.set_tot_len(P.tcp(), 41)),
    ("tcp-doff-4", _patch(P.tcp(), TCP_OFF + 12, b"\x40")),
    ("tcp-doff-beyond-segment", _patch(P.tcp(), TCP_OFF + 12, b"\x60")),
    ("udp-tot-len-cuts-header", P.set_tot_len(P.udp(payload=b""), 27)),
]


@pytest.mark.parametrize("frame", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_packets_pass_untouched(lab: Lab, frame: bytes) -> None:
    lab.sync(*FRONTENDS)
    verdict, out = lab.run(frame)
    assert verdict == TC_ACT_OK
    assert out == frame
    assert lab.counters()["malformed"] == 1


def test_frontend_without_match_after_delete(lab: Lab) -> None:
    lab.sync(*FRONTENDS)
    lab.sync()
    frame = P.tcp()
    verdict, out = lab.run(frame)
    assert (verdict, out) == (TC_ACT_OK, frame)
