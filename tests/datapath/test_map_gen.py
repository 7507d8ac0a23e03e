"""The maps' generation (lb_id_state.map_gen): a known flow whose forward entry holds the
current one is rewritten without a services lookup (lb_forward_known() in bpf/flow.h), and
the Programmer raises it after every change, so that no entry vouches past one."""

from __future__ import annotations

import pytest

from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from ebpflb.datapath.structs import U32, IdState, SvcKey, ip_to_be32, port_to_be16
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

B0, B1 = P.BACKENDS[:2]


def svc(*ips: str) -> Frontend:
    return Frontend(P.VIP, 80, "TCP", tuple(Backend(ip, 8080) for ip in ips))


def map_gen(lab: Lab) -> int:
    ids = lab.dp.maps.id_state.lookup(U32(0))
    assert ids is not None
    return int(ids.map_gen)


def set_map_gen(lab: Lab, gen: int) -> None:
    ids = lab.dp.maps.id_state.lookup(U32(0))
    assert ids is not None
    lab.dp.maps.id_state.update(U32(0), IdState(ids.next_svc_id, ids.next_backend_id, gen, 0))


def established(lab: Lab, sport: int = 40000) -> bytes:
    """A flow through the SYN and the first ACK (which changes its state: a refresh, which
    stamps the entry with the gen); the ACK that comes next."""
    assert P.dst(lab.run(P.tcp(sport=sport))[1]) == (B0, 8080)
    assert P.dst(lab.run(P.tcp(sport=sport, flags="A"))[1]) == (B0, 8080)
    return P.tcp(sport=sport, flags="A", payload=b"more")


def test_a_known_flow_skips_the_services_lookup_while_the_gen_vouches(lab: Lab) -> None:
    lab.sync(svc(B0))
    ack = established(lab)
    gen = map_gen(lab)
    assert gen > 0 and lab.ct()[("fwd", P.CLIENT, 40000, P.VIP, 80)].map_gen == gen
    # The service's entry deleted behind the Programmer's back: the gen still vouches.
    lab.dp.maps.services.delete(SvcKey(ip_to_be32(P.VIP), port_to_be16(80), 6, 0))
    verdict, out = lab.run(ack)
    assert verdict == TC_ACT_OK and P.dst(out) == (B0, 8080)
    # Another gen: the services lookup runs and finds no frontend: the packet goes on as sent.
    set_map_gen(lab, gen + 1)
    verdict, out = lab.run(ack)
    assert verdict == TC_ACT_OK
    P.assert_frame(out, ack)


def test_gen_0_never_vouches(lab: Lab) -> None:
    """Maps no Programmer raised the gen of (or migrated from before it)."""
    lab.sync(svc(B0))
    ack = established(lab)
    set_map_gen(lab, 0)
    for k, v in lab.dp.maps.conntrack.items():
        v.map_gen = 0
        lab.dp.maps.conntrack.update(k, v)
    lab.dp.maps.services.delete(SvcKey(ip_to_be32(P.VIP), port_to_be16(80), 6, 0))
    P.assert_frame(lab.run(ack)[1], ack)


def test_the_programmer_raises_the_gen_after_every_change(lab: Lab) -> None:
    lab.sync(svc(B0))
    gen = map_gen(lab)
    lab.sync(svc(B0))  # nothing to write
    assert map_gen(lab) == gen
    lab.sync(svc(B0, B1))  # a backend arrives
    assert map_gen(lab) == gen + 1
    again = Programmer(lab.dp)  # a restarted agent goes on from the pinned gen
    again.sync([svc(B0)])  # a backend leaves
    assert map_gen(lab) == gen + 2


def test_a_backend_that_leaves_moves_its_flow_at_once(lab: Lab) -> None:
    """The vouching entry stops vouching with the change that removed its backend."""
    lab.sync(svc(B0))
    ack = established(lab)
    lab.sync(svc(B1))
    verdict, out = lab.run(ack)
    assert verdict == TC_ACT_OK and P.dst(out) == (B1, 8080)
    assert lab.counters()["reselects"] == 1
