"""sessionAffinity ClientIP: one backend per client while fresh, only while it serves."""

from __future__ import annotations

import pytest

from ebpflb.datapath.conntrack import now_ns
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import IPPROTO_TCP, AffinityKey, ip_to_be32
from tests.datapath import packets as P
from tests.datapath.conftest import Lab, clock_before

pytestmark = pytest.mark.datapath


def frontend(timeout: int, backends: tuple[str, ...] = P.BACKENDS) -> Frontend:
    return Frontend(P.VIP, 80, "TCP", tuple(Backend(b, 8080) for b in backends), timeout)


def connect(lab: Lab, sport: int, client: str = P.CLIENT) -> str:
    """A new connection's backend."""
    _, out = lab.run(P.tcp(src=client, sport=sport))
    return P.dst(out)[0]


def hashed(sport: int, client: str = P.CLIENT) -> str:
    """The backend the flow hash gives a new connection (a fresh 4-backend service)."""
    return P.BACKENDS[P.flow_hash(client, P.VIP, sport, 80, IPPROTO_TCP) % 4]


def affinity_key(lab: Lab, client: str = P.CLIENT) -> AffinityKey:
    svc_id = lab.programmer.service_id(P.VIP, 80, "TCP")
    assert svc_id is not None
    return AffinityKey(svc_id, ip_to_be32(client))


def test_connections_of_a_client_stick_to_one_backend(lab: Lab) -> None:
    lab.sync(frontend(10800))
    first = connect(lab, 41000)
    assert {connect(lab, sport) for sport in range(41001, 41020)} == {first}
    assert lab.counters()["affinity_hits"] == 19


def test_without_affinity_connections_spread(lab: Lab) -> None:
    lab.sync(frontend(0))
    assert len({connect(lab, sport) for sport in range(41000, 41020)}) > 1
    assert lab.counters()["affinity_hits"] == 0
    assert not lab.dp.maps.affinity.items()


def test_switching_affinity_off_ignores_existing_entries(lab: Lab) -> None:
    lab.sync(frontend(10800))
    connect(lab, 41000)
    assert lab.dp.maps.affinity.items()
    lab.sync(frontend(0))
    for sport in range(41001, 41020):
        assert connect(lab, sport) == hashed(sport)
    assert lab.counters()["affinity_hits"] == 0


def test_affinity_times_out(lab: Lab) -> None:
    lab.sync(frontend(5))
    first = connect(lab, 41000)
    # A port the hash sends elsewhere: only affinity can bring it to `first`.
    sport = next(s for s in range(41001, 42000) if hashed(s) != first)
    m = lab.dp.maps
    entry = m.affinity.lookup(affinity_key(lab))
    assert entry is not None
    entry.last_used = now_ns() - 4 * 10**9  # idle 4 s of 5: still valid
    m.affinity.update(affinity_key(lab), entry)
    assert connect(lab, sport) == first

    entry.last_used = now_ns() - 6 * 10**9  # idle 6 s: expired
    m.affinity.update(affinity_key(lab), entry)
    sport = next(s for s in range(sport + 1, 43000) if hashed(s) != first)
    assert connect(lab, sport) == hashed(sport)
    renewed = m.affinity.lookup(affinity_key(lab))
    assert renewed is not None
    assert renewed.backend_id == lab.programmer.backend_id(hashed(sport), 8080, "TCP")


def test_affinity_to_a_backend_that_left_is_ignored(lab: Lab) -> None:
    lab.sync(frontend(10800))
    first = connect(lab, 41000)
    rest = tuple(b for b in P.BACKENDS if b != first)
    lab.sync(frontend(10800, rest))
    chosen = connect(lab, 41001)
    assert chosen in rest
    assert {connect(lab, sport) for sport in range(41002, 41010)} == {chosen}


def test_traffic_of_a_known_flow_keeps_affinity_alive(lab: Lab) -> None:
    lab.sync(frontend(100))
    connect(lab, 41000)
    m = lab.dp.maps
    entry = m.affinity.lookup(affinity_key(lab))
    assert entry is not None
    entry.last_used = now_ns() - 50 * 10**9
    m.affinity.update(affinity_key(lab), entry)
    lab.age_ct(2)  # due for its once-a-second refresh
    before = clock_before()
    lab.run(P.tcp(sport=41000, flags="A"))
    touched = m.affinity.lookup(affinity_key(lab))
    assert touched is not None and touched.last_used >= before


def test_affinity_is_per_client(lab: Lab) -> None:
    lab.sync(frontend(10800))
    connect(lab, 41000)
    connect(lab, 41000, client=P.CLIENT2)
    assert len(lab.dp.maps.affinity.items()) == 2
