"""Conntrack pressure: short flows overflow the map while long flows keep sending.

What a full map does to a long flow: LRU evicts its entries when it idles while more than
the map's capacity of newer entries arrive. Its next client packet then misses and is
balanced again by the same hash of its tuple: the same backend while the service's
backends do not change, and both entries are written again. A reply that comes before
the client's next packet finds no reverse entry and goes on untouched (the backend's own
address as source: the client's stack resets the connection); the sizing knob
(DatapathConfig.max_conntrack, bpf/README.md) is what keeps that from happening.
"""

from __future__ import annotations

import socket
import struct

import pytest

from ebpflb.datapath import conntrack
from ebpflb.datapath.bench import tcp_frame
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import TEST_CONFIG, Lab

pytestmark = pytest.mark.datapath

CAPACITY = TEST_CONFIG.max_conntrack  # entries; a flow takes two
LONG_FLOWS = 16
ROUNDS = 5


def service() -> Frontend:
    return Frontend(P.VIP, 80, "TCP", tuple(Backend(ip, 8080) for ip in P.BACKENDS))


def short_flow_syns(start: int, count: int) -> list[bytes]:
    """First packets of `count` flows from distinct clients (10.245.x.y) and ports."""
    out = []
    for i in range(start, start + count):
        src = socket.inet_ntoa(struct.pack("!I", 0x0AF50000 + i // 32))
        out.append(tcp_frame(src, P.VIP, 20000 + i % 32, 80, 0x02))
    return out


def test_counters_say_created_and_lost(lab: Lab) -> None:
    lab.sync(service())
    lab.run(P.tcp(flags="S"))
    assert (lab.counters()["ct_created"], lab.counters()["ct_lost"]) == (1, 0)
    lab.run(P.tcp(flags="A", seq=1001, ack=1))  # a hit
    lab.drop_ct("fwd")
    lab.run(P.tcp(flags="A", seq=1001, ack=1))  # mid-flow, no entry: lost, made again
    c = lab.counters()
    assert (c["ct_created"], c["ct_lost"], c["ct_misses"]) == (2, 1, 2)

    fill = conntrack.fill(lab.dp.maps)
    assert (fill.entries, fill.capacity, fill.expired) == (2, CAPACITY, 0)
    seven_hours_on = conntrack.now_ns() + 7 * 3600 * conntrack.NSEC_PER_SEC
    assert conntrack.fill(lab.dp.maps, seven_hours_on).expired == 2  # established: 6 h


def test_long_flows_keep_their_backend_when_short_flows_overflow_conntrack(lab: Lab) -> None:
    lab.sync(service())
    longs = [P.tcp(sport=50000 + i, flags="S") for i in range(LONG_FLOWS)]
    backend = {}
    for i, syn in enumerate(longs):
        _, out = lab.run(syn)
        backend[i] = P.dst(out)[0]

    lost = natted_after_miss = natted_after_hit = 0
    for r in range(ROUNDS):
        # Twice the map's capacity in new entries between two packets of each long flow.
        for frame in short_flow_syns(r * CAPACITY, CAPACITY):
            lab.run(frame)
        for i in range(LONG_FLOWS):
            before = lab.counters()["ct_lost"]
            verdict, out = lab.run(P.tcp(sport=50000 + i, flags="A", seq=1001 + r, ack=1))
            assert verdict == TC_ACT_OK
            assert P.dst(out) == (backend[i], 8080), f"long flow {i} moved in round {r}"
            P.check_checksums(out)
            missed = lab.counters()["ct_lost"] > before
            _, reply = lab.run(P.tcp(backend[i], P.CLIENT, 8080, 50000 + i, flags="A"))
            natted = P.ip_addrs(reply) == (P.VIP, P.CLIENT)
            if missed:
                lost += 1
                # The miss wrote both entries again.
                assert natted, f"long flow {i}: no reverse entry after its forward one was made"
                natted_after_miss += 1
            else:
                natted_after_hit += natted

    c = lab.counters()
    fill = conntrack.fill(lab.dp.maps)
    print(
        f"\n{ROUNDS * CAPACITY} short flows through a {CAPACITY}-entry map, {LONG_FLOWS} long "
        f"flows: every client packet kept its backend; {lost} of {ROUNDS * LONG_FLOWS} had "
        f"lost their entry (rebalanced to the same backend, replies reverse-NATed after "
        f"{natted_after_miss}); replies after a hit reverse-NATed {natted_after_hit} of "
        f"{ROUNDS * LONG_FLOWS - lost}; {fill}; ct_created={c['ct_created']}"
    )
    assert fill.entries <= CAPACITY
    assert c["ct_created"] >= ROUNDS * CAPACITY + LONG_FLOWS
    assert c["ct_lost"] == lost > 0, "no long flow lost its entry: the map did not overflow"


def test_reply_first_after_eviction_goes_untouched_until_the_client_sends(lab: Lab) -> None:
    lab.sync(service())
    _, out = lab.run(P.tcp(sport=50000, flags="S"))
    b = P.dst(out)[0]
    for frame in short_flow_syns(0, 2 * CAPACITY):
        lab.run(frame)
    reply = P.tcp(b, P.CLIENT, 8080, 50000, flags="A")
    assert lab.run(reply) == (TC_ACT_OK, reply), "the reverse entry should have been evicted"
    _, out = lab.run(P.tcp(sport=50000, flags="A", seq=1001, ack=1))
    assert P.dst(out) == (b, 8080)
    _, out = lab.run(reply)
    assert P.ip_addrs(out) == (P.VIP, P.CLIENT)
    assert lab.counters()["ct_lost"] == 1
