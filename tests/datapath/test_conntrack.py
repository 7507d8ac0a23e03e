"""Conntrack: flows keep their backend, move when it leaves, expire like the kernel's; GC."""

from __future__ import annotations

import pytest

from ebpflb.datapath import conntrack
from ebpflb.datapath.conntrack import now_ns
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import (
    CT_F_CLOSING,
    CT_F_ESTABLISHED,
    IPPROTO_TCP,
    IPPROTO_UDP,
    U32,
    AffinityKey,
    AffinityValue,
    CtValue,
    MemberKey,
    SlotKey,
    ip_to_be32,
)
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import Lab, clock_before

pytestmark = pytest.mark.datapath

B0, B1, B2, B3 = P.BACKENDS
NEW = ("10.244.0.31", "10.244.0.32")


def svc(*ips: str, port: int = 80, protocol: str = "TCP", vip: str = P.VIP) -> Frontend:
    return Frontend(vip, port, protocol, tuple(Backend(ip, 8080) for ip in ips))


def test_flows_keep_their_backend_while_others_come_and_go(lab: Lab) -> None:
    lab.sync(svc(B0, B1, B2, B3))
    chosen = {}
    for sport in range(41000, 41024):
        _, out = lab.run(P.tcp(sport=sport))
        chosen[sport] = P.dst(out)[0]
    assert len(set(chosen.values())) > 1
    on_b3 = [s for s, b in chosen.items() if b == B3]
    assert on_b3, "the hash put no flow on B3: pick other ports"

    lab.sync(svc(B0, B1, B2, *NEW))  # B3 leaves, two backends arrive
    for sport, backend in chosen.items():
        verdict, out = lab.run(P.tcp(sport=sport, flags="A", seq=1001, ack=1))
        assert verdict == TC_ACT_OK
        if backend == B3:
            assert P.dst(out)[0] in (B0, B1, B2, *NEW)
        else:
            assert P.dst(out) == (backend, 8080), f"flow from port {sport} moved"
    assert lab.counters()["reselects"] == len(on_b3)


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_removed_backend_moves_the_flow_at_once(lab: Lab, protocol: str) -> None:
    build = P.tcp if protocol == "TCP" else P.udp
    lab.sync(svc(B0, protocol=protocol))
    _, out = lab.run(build(dport=80))
    assert P.dst(out) == (B0, 8080)

    lab.sync(svc(B1, protocol=protocol))
    kw = {"flags": "A"} if protocol == "TCP" else {}
    _, out = lab.run(build(dport=80, **kw))
    assert P.dst(out) == (B1, 8080)  # TCP: B1 answers this non-SYN with a RST
    assert lab.counters()["reselects"] == 1

    old_reply = build(B0, P.CLIENT, 8080, 40000)
    verdict, out = lab.run(old_reply)
    assert (verdict, out) == (TC_ACT_OK, old_reply), "the old backend's reply entry must be gone"
    _, out = lab.run(build(B1, P.CLIENT, 8080, 40000))
    assert P.ip_addrs(out) == (P.VIP, P.CLIENT)


def test_backend_left_this_service_but_serves_another(lab: Lab) -> None:
    lab.sync(svc(B0), svc(B0, vip=P.VIP2))
    lab.run(P.tcp())
    lab.sync(svc(B1), svc(B0, vip=P.VIP2))  # B0 keeps its backends entry
    assert lab.programmer.backend_id(B0, 8080, "TCP") is not None
    _, out = lab.run(P.tcp(flags="A"))
    assert P.dst(out) == (B1, 8080)
    assert lab.counters()["reselects"] == 1


def _raise_generation(lab: Lab, svc_id: int, to: int | None = None) -> int:
    """What the agent does once it has deleted a membership of the service: a new gen of
    the service, then of the maps (test_map_gen.py); returns the service's gen."""
    key, value = next((k, v) for k, v in lab.dp.maps.services.items() if v.svc_id == svc_id)
    value.gen = value.gen % 0xFF + 1 if to is None else to
    lab.dp.maps.services.update(key, value)
    ids = lab.dp.maps.id_state.lookup(U32(0))
    assert ids is not None
    ids.map_gen += 1
    lab.dp.maps.id_state.update(U32(0), ids)
    return int(value.gen)


def _forward_entry(lab: Lab, sport: int) -> CtValue:
    return lab.ct()[("fwd", P.CLIENT, sport, P.VIP, 80)]


def test_known_flow_trusts_its_generation_then_the_membership_alone(lab: Lab) -> None:
    """A known flow needs no lookup but its service's while its entry holds the service's
    generation: the agent raises it only after deleting a membership. Under another
    generation it costs one lookup (its membership): a membership stands for its backend,
    which the agent deletes only after the memberships (and whose id it never gives to
    another endpoint). The flow moves once the membership has gone and the generation has
    been raised."""
    lab.sync(svc(B0, B1))
    sport = next(
        s for s in range(40000, 40100) if P.flow_hash(P.CLIENT, P.VIP, s, 80, IPPROTO_TCP) % 2 == 0
    )
    _, out = lab.run(P.tcp(sport=sport))
    assert P.dst(out)[0] == B0
    m = lab.dp.maps
    b0, b1 = lab.programmer.backend_id(B0, 8080, "TCP"), lab.programmer.backend_id(B1, 8080, "TCP")
    assert b0 is not None and b1 is not None
    svc_id = lab.programmer.service_id(P.VIP, 80, "TCP")
    m.service_backends.update(SlotKey(svc_id, 0), U32(b1))  # keep selection off B0
    m.backends.delete(U32(b0))  # by hand: the agent never leaves a member without a backend
    _, out = lab.run(P.tcp(sport=sport, flags="A"))
    assert P.dst(out)[0] == B0
    gen = _raise_generation(lab, svc_id)  # another generation: the membership is looked up
    _, out = lab.run(P.tcp(sport=sport, flags="A"))
    assert P.dst(out)[0] == B0
    assert _forward_entry(lab, sport).svc_gen == gen  # found a member: trusted from now on
    m.service_members.delete(MemberKey(svc_id, b0))
    _, out = lab.run(P.tcp(sport=sport, flags="A"))
    assert P.dst(out)[0] == B0  # the generation is not raised yet
    _raise_generation(lab, svc_id)
    _, out = lab.run(P.tcp(sport=sport, flags="A"))
    assert P.dst(out)[0] == B1
    assert lab.counters()["reselects"] == 1


@pytest.mark.parametrize("why", ["generation 0", "refresh due"])
def test_the_membership_is_looked_up_whatever_the_generation(lab: Lab, why: str) -> None:
    """Generation 0 (a service written without one, or maps from before them) never vouches,
    nor does any generation for an entry due for a refresh (the 8-bit generation comes round
    after 255 raises): the flow moves as soon as its membership is gone."""
    lab.sync(svc(B0, B1))
    svc_id = lab.programmer.service_id(P.VIP, 80, "TCP")
    b0, b1 = lab.programmer.backend_id(B0, 8080, "TCP"), lab.programmer.backend_id(B1, 8080, "TCP")
    assert svc_id is not None and b0 is not None and b1 is not None
    if why == "generation 0":
        _raise_generation(lab, svc_id, to=0)
    sport = next(
        s for s in range(40000, 40100) if P.flow_hash(P.CLIENT, P.VIP, s, 80, IPPROTO_TCP) % 2 == 0
    )
    _, out = lab.run(P.tcp(sport=sport))
    assert P.dst(out)[0] == B0
    lab.dp.maps.service_backends.update(SlotKey(svc_id, 0), U32(b1))  # keep selection off B0
    lab.dp.maps.service_members.delete(MemberKey(svc_id, b0))
    if why == "refresh due":
        lab.age_ct(2)  # refreshed at most every second
    _, out = lab.run(P.tcp(sport=sport, flags="A"))
    assert P.dst(out)[0] == B1
    assert lab.counters()["reselects"] == 1


def test_the_agent_raises_the_generation_when_a_backend_leaves(lab: Lab) -> None:
    """Through the Programmer: a backend joining keeps the generation (known flows keep
    skipping the membership lookup), one leaving raises it (and its flows move)."""
    lab.sync(svc(B0))
    svc_id = lab.programmer.service_id(P.VIP, 80, "TCP")

    def gen() -> int:
        return next(int(v.gen) for _, v in lab.dp.maps.services.items() if v.svc_id == svc_id)

    first = gen()
    assert first != 0
    lab.run(P.tcp())
    assert _forward_entry(lab, 40000).svc_gen == first
    lab.sync(svc(B0, B1))
    assert gen() == first
    lab.sync(svc(B1))
    assert gen() == first + 1
    _, out = lab.run(P.tcp(flags="A"))
    assert P.dst(out)[0] == B1
    assert _forward_entry(lab, 40000).svc_gen == first + 1


def test_recreated_service_balances_old_tuples_anew(lab: Lab) -> None:
    lab.sync(svc(B0))
    lab.run(P.tcp())
    lab.sync()
    lab.sync(svc(B1))  # a new service id for the same frontend
    _, out = lab.run(P.tcp(flags="A"))
    assert P.dst(out)[0] == B1
    c = lab.counters()
    assert (c["ct_misses"], c["ct_hits"], c["reselects"]) == (2, 0, 0)


def test_selection_is_the_flow_hash_modulo_count(lab: Lab) -> None:
    lab.sync(svc(B0, B1, B2, B3))  # a fresh service: slots in sorted order
    seen = set()
    for sport in range(40000, 40032):
        _, out = lab.run(P.tcp(sport=sport))
        slot = P.flow_hash(P.CLIENT, P.VIP, sport, 80, IPPROTO_TCP) % 4
        assert P.dst(out)[0] == P.BACKENDS[slot]
        seen.add(slot)
    assert seen == {0, 1, 2, 3}


def _run_sequence(lab: Lab, protocol: str, steps: list[tuple[str, str]]) -> None:
    for direction, flags in steps:
        if protocol == "UDP":
            frame = P.udp(dport=80) if direction == "fwd" else P.udp(B0, P.CLIENT, 8080, 40000)
        elif direction == "fwd":
            frame = P.tcp(flags=flags)
        else:
            frame = P.tcp(B0, P.CLIENT, 8080, 40000, flags)
        lab.run(frame)


LIFETIMES = [
    ("syn", "TCP", [("fwd", "S")], 60, 0),
    ("syn-synack", "TCP", [("fwd", "S"), ("rev", "SA")], 60, 0),
    ("established", "TCP", [("fwd", "S"), ("rev", "SA"), ("fwd", "A")], 21600, CT_F_ESTABLISHED),
    (
        "client-fin",
        "TCP",
        [("fwd", "S"), ("rev", "SA"), ("fwd", "A"), ("fwd", "FA")],
        10,
        CT_F_ESTABLISHED | CT_F_CLOSING,
    ),
    (
        "backend-fin",
        "TCP",
        [("fwd", "S"), ("rev", "SA"), ("fwd", "A"), ("rev", "FA")],
        10,
        CT_F_ESTABLISHED | CT_F_CLOSING,
    ),
    ("backend-rst", "TCP", [("fwd", "S"), ("rev", "R")], 10, CT_F_CLOSING),
    ("udp", "UDP", [("fwd", ""), ("rev", ""), ("fwd", "")], 30, 0),
]


@pytest.mark.parametrize(
    ("protocol", "steps", "lifetime", "flags"),
    [c[1:] for c in LIFETIMES],
    ids=[c[0] for c in LIFETIMES],
)
def test_lifetime_follows_the_state_in_both_entries(
    lab: Lab, protocol: str, steps: list[tuple[str, str]], lifetime: int, flags: int
) -> None:
    lab.sync(svc(B0, protocol=protocol))
    _run_sequence(lab, protocol, steps)
    entries = lab.ct()
    assert len(entries) == 2
    for key, v in entries.items():
        assert (v.lifetime, v.flags) == (lifetime, flags), key


def test_new_syn_on_a_closed_tuple_is_a_new_flow(lab: Lab) -> None:
    lab.sync(svc(B0))
    _run_sequence(lab, "TCP", [("fwd", "S"), ("rev", "SA"), ("fwd", "A"), ("fwd", "FA")])
    assert lab.counters()["ct_misses"] == 1
    lab.run(P.tcp(flags="S"))
    assert lab.counters()["ct_misses"] == 2
    assert {v.flags for v in lab.ct().values()} == {0}


def test_expired_entry_is_a_miss(lab: Lab) -> None:
    lab.sync(svc(B0))
    lab.run(P.tcp())
    lab.age_ct(61)  # SYN lifetime is 60 s
    before = clock_before()
    _, out = lab.run(P.tcp(flags="A"))
    assert P.dst(out)[0] == B0
    c = lab.counters()
    assert (c["ct_expired"], c["ct_misses"], c["ct_hits"]) == (1, 2, 0)
    assert all(v.last_seen >= before for v in lab.ct().values())


def test_expired_reply_entry_passes_untouched(lab: Lab) -> None:
    lab.sync(svc(B0))
    lab.run(P.tcp())
    lab.age_ct(61, "rev")
    reply = P.tcp(B0, P.CLIENT, 8080, 40000, "SA")
    assert lab.run(reply) == (TC_ACT_OK, reply)


def test_timestamps_are_rewritten_at_most_every_second(lab: Lab) -> None:
    lab.sync(svc(B0))
    _run_sequence(lab, "TCP", [("fwd", "S"), ("fwd", "A")])
    stamps = {k: v.last_seen for k, v in lab.ct().items()}
    lab.run(P.tcp(flags="A"))
    lab.run(P.tcp(B0, P.CLIENT, 8080, 40000, "A"))
    assert {k: v.last_seen for k, v in lab.ct().items()} == stamps
    lab.age_ct(2)
    before = clock_before()
    lab.run(P.tcp(flags="A"))
    assert all(v.last_seen >= before for v in lab.ct().values())


@pytest.mark.parametrize("lost", ["fwd", "rev"])
def test_a_lost_entry_is_recreated_by_the_other(lab: Lab, lost: str) -> None:
    lab.sync(svc(B0, B1, B2, B3))
    _, out = lab.run(P.tcp())
    backend = P.dst(out)[0]
    before = lab.ct()
    lab.drop_ct(lost)
    lab.age_ct(2)
    if lost == "rev":
        lab.run(P.tcp(flags="A"))
    else:
        lab.run(P.tcp(backend, P.CLIENT, 8080, 40000, "A"))
    after = lab.ct()
    assert after.keys() == before.keys()
    assert {k: v.backend_id for k, v in after.items()} == {
        k: v.backend_id for k, v in before.items()
    }


def test_gc_removes_expired_entries_only(lab: Lab) -> None:
    lab.sync(svc(B0), svc(B0, port=53, protocol="UDP"))
    lab.run(P.tcp(sport=40001))  # fresh
    lab.run(P.udp(sport=40002, dport=53))  # will be idle past 30 s
    _run_sequence(lab, "TCP", [("fwd", "S"), ("fwd", "FA")])  # sport 40000: closing, 10 s
    now = now_ns()
    stats = conntrack.collect(lab.dp.maps, now + 20 * 10**9)
    assert (stats.conntrack_scanned, stats.conntrack_deleted) == (6, 2)
    stats = conntrack.collect(lab.dp.maps, now + 35 * 10**9)
    assert (stats.conntrack_scanned, stats.conntrack_deleted) == (4, 2)
    assert {k[2] for k in lab.ct() if k[0] == "fwd"} == {40001}
    assert lab.dp.gc().conntrack_deleted == 0  # the datapath's own clock: nothing is old


def test_gc_of_affinity_entries(lab: Lab) -> None:
    lab.sync(
        Frontend(P.VIP, 80, "TCP", (Backend(B0, 8080),), affinity_timeout=100),
        svc(B0, port=81),
    )
    with_aff = lab.programmer.service_id(P.VIP, 80, "TCP")
    without = lab.programmer.service_id(P.VIP, 81, "TCP")
    assert with_aff is not None and without is not None
    now = now_ns()
    entries = {
        (with_aff, P.CLIENT): now - 10 * 10**9,  # kept
        (with_aff, P.CLIENT2): now - 200 * 10**9,  # idle past 100 s
        (without, P.CLIENT): now,  # the service has no affinity
        (9999, P.CLIENT): now,  # no such service
    }
    for (svc_id, client), used in entries.items():
        lab.dp.maps.affinity.update(
            AffinityKey(svc_id, ip_to_be32(client)), AffinityValue(used, 1, 0)
        )
    stats = conntrack.collect(lab.dp.maps, now)
    assert (stats.affinity_scanned, stats.affinity_deleted) == (4, 3)
    left = [(k.svc_id, k.client) for k, _ in lab.dp.maps.affinity.items()]
    assert left == [(with_aff, ip_to_be32(P.CLIENT))]


def test_entries_listing(lab: Lab) -> None:
    lab.sync(svc(B0))
    lab.run(P.tcp())
    listed = {(e.direction, e.src, e.dst, e.nat, e.state) for e in conntrack.entries(lab.dp.maps)}
    assert listed == {
        ("forward", f"{P.CLIENT}:40000", f"{P.VIP}:80", f"{B0}:8080", "syn"),
        ("reverse", f"{B0}:8080", f"{P.CLIENT}:40000", f"{P.VIP}:80", "syn"),
    }


def test_udp_flow_hash_uses_the_protocol(lab: Lab) -> None:
    lab.sync(svc(B0, B1, B2, B3, port=53, protocol="UDP"))
    for sport in range(40000, 40008):
        _, out = lab.run(P.udp(sport=sport))
        slot = P.flow_hash(P.CLIENT, P.VIP, sport, 53, IPPROTO_UDP) % 4
        assert P.dst(out)[0] == P.BACKENDS[slot]
