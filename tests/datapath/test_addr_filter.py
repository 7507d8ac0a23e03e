"""The address filter (addr_filter, bpf/filter.h lb_addr_may_be): the program and the agent agree
on every address's slot, and a packet whose addresses the filter rules out is passed without
the services and reverse conntrack lookups."""

from __future__ import annotations

import random

import pytest

from ebpflb.datapath import addrfilter
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import U32, U64, ip_to_be32
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

B0 = P.BACKENDS[0]


def set_bit(lab: Lab, ip: str, kind: int, on: bool) -> None:
    """Set or clear one address's bit in the pinned map, behind the programmer's back."""
    m = lab.dp.maps.addr_filter
    assert m is not None
    index, bit = addrfilter.position(ip_to_be32(ip), kind)
    old = m.lookup(U32(index))
    word = old.value if old is not None else 0
    m.update(U32(index), U64(word | bit if on else word & ~bit))


def test_every_vip_and_backend_passes_the_filter(lab: Lab) -> None:
    """300 random VIPs and backend addresses: each VIP is balanced and each backend's reply
    translated back, which needs the agent's slot of every address to be the program's."""
    rnd = random.Random(5)
    pairs = {
        f"10.{rnd.randrange(96, 112)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}": (
            f"10.245.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        )
        for _ in range(300)
    }
    lab.sync(*(Frontend(vip, 80, "TCP", (Backend(be, 8080),)) for vip, be in pairs.items()))
    for i, (vip, be) in enumerate(pairs.items()):
        sport = 10000 + i
        verdict, out = lab.run(P.tcp(dst=vip, sport=sport))
        assert verdict == TC_ACT_OK
        P.assert_frame(out, P.tcp(dst=be, dport=8080, sport=sport))
        verdict, out = lab.run(P.tcp(src=be, dst=P.CLIENT, sport=8080, dport=sport, flags="SA"))
        assert verdict == TC_ACT_OK
        P.assert_frame(out, P.tcp(src=vip, dst=P.CLIENT, sport=80, dport=sport, flags="SA"))
    c = lab.counters()
    assert (c["dnat"], c["rev_nat"]) == (len(pairs), len(pairs))


def test_a_filtered_out_address_is_not_looked_up(lab: Lab) -> None:
    """With its bit cleared a VIP is not balanced and a backend's reply not translated: the
    program trusts the filter. With "ready" cleared it trusts nothing and looks up all."""
    lab.sync(Frontend(P.VIP, 80, "TCP", (Backend(B0, 8080),)))
    syn = P.tcp()
    reply = P.tcp(src=B0, dst=P.CLIENT, sport=8080, dport=40000, flags="SA")

    set_bit(lab, P.VIP, addrfilter.FRONTEND, False)
    assert lab.run(syn) == (TC_ACT_OK, syn)
    assert (lab.counters()["passed"], lab.counters()["ct_misses"]) == (1, 0)
    set_bit(lab, P.VIP, addrfilter.FRONTEND, True)
    _, out = lab.run(syn)
    P.assert_frame(out, P.tcp(dst=B0, dport=8080))

    set_bit(lab, B0, addrfilter.BACKEND, False)
    assert lab.run(reply) == (TC_ACT_OK, reply)
    assert lab.counters()["rev_nat"] == 0
    set_bit(lab, B0, addrfilter.BACKEND, True)
    _, out = lab.run(reply)
    P.assert_frame(out, P.tcp(src=P.VIP, dst=P.CLIENT, sport=80, dport=40000, flags="SA"))

    # Not ready (maps migrated from before the filter): every address may be anything.
    set_bit(lab, P.VIP, addrfilter.FRONTEND, False)
    set_bit(lab, B0, addrfilter.BACKEND, False)
    assert lab.dp.maps.addr_filter is not None
    lab.dp.maps.addr_filter.update(U32(addrfilter.READY), U64(0))
    _, out = lab.run(syn)
    P.assert_frame(out, P.tcp(dst=B0, dport=8080))
    _, out = lab.run(reply)
    P.assert_frame(out, P.tcp(src=P.VIP, dst=P.CLIENT, sport=80, dport=40000, flags="SA"))


def test_the_programmer_clears_what_it_no_longer_needs(lab: Lab) -> None:
    """A deleted Service's VIP and its backend's address are filtered out afterwards, and a
    new programmer on the same maps (an agent restart) rebuilds the filter from them,
    repairing what it finds wrong."""
    a = Frontend(P.VIP, 80, "TCP", (Backend(B0, 8080),))
    b = Frontend(P.VIP2, 80, "TCP", (Backend(P.BACKENDS[1], 8080),))
    lab.sync(a, b)
    m = lab.dp.maps.addr_filter
    assert m is not None
    before = {k.value: v.value for k, v in m.items() if v.value}
    lab.sync(b)
    syn = P.tcp()
    assert lab.run(syn) == (TC_ACT_OK, syn)
    assert lab.counters()["ct_misses"] == 0  # not even looked up
    lab.sync(a, b)
    assert {k.value: v.value for k, v in m.items() if v.value} == before
    set_bit(lab, P.VIP, addrfilter.FRONTEND, False)
    restarted = type(lab.programmer)(lab.dp)
    assert restarted.sync([a, b]).written == 0
    assert {k.value: v.value for k, v in m.items() if v.value} == before
