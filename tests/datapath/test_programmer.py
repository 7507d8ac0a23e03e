"""The Programmer against the real maps: minimal writes, stable ids, adoption after a restart."""

from __future__ import annotations

import pytest

from ebpflb.datapath.loader import Datapath, DatapathError, check_pins
from ebpflb.datapath.programmer import Backend, Frontend, Programmer, SyncStats
from ebpflb.datapath.structs import U32, IdState
from tests.datapath import packets as P
from tests.datapath.conftest import TEST_CONFIG, Lab

pytestmark = pytest.mark.datapath

B = [Backend(f"10.244.1.{i}", 8080) for i in range(1, 9)]


def fe(vip: str, port: int, *backends: Backend, proto: str = "TCP", aff: int = 0) -> Frontend:
    return Frontend(vip, port, proto, backends, aff)


DESIRED = [
    fe("10.96.0.1", 80, B[0], B[1], B[2]),
    fe("10.96.0.1", 443, B[0], B[1], B[2]),  # the same backends (other port)
    fe("10.96.0.2", 53, B[3], B[4], proto="UDP"),
    fe("10.96.0.2", 53, B[3], B[4]),  # TCP and UDP on one port: two frontends
    fe("10.96.0.3", 80, B[5], aff=10800),
    fe("10.96.0.4", 80),  # no backends yet
    # A NodePort with a backend on this node; B[0] again, as local: another backends entry.
    Frontend("192.168.50.10", 30080, "TCP", (Backend(B[0].ip, 8080, local=True), B[6]), 0, True),
]


def test_first_sync_writes_everything_second_nothing(lab: Lab) -> None:
    stats = lab.programmer.sync(DESIRED)
    assert stats == SyncStats(
        backends_written=10,  # 8 distinct endpoints x protocol x local (B3, B4 in TCP and UDP)
        members_written=13,
        slots_written=13,
        services_written=7,
    )
    again = lab.programmer.sync(DESIRED)
    assert (again.written, again.deleted) == (0, 0)


# (id, change to DESIRED, expected SyncStats)
CHANGES = [
    (
        "add-backend",
        lambda d: [fe("10.96.0.1", 80, B[0], B[1], B[2], B[7]), *d[1:]],
        SyncStats(backends_written=1, members_written=1, slots_written=1, services_written=1),
    ),
    (
        "remove-last-slot",  # B[2] sits in the last slot: nothing moves
        lambda d: [fe("10.96.0.1", 80, B[0], B[1]), *d[1:]],
        SyncStats(services_written=1, slots_deleted=1, members_deleted=1, generations_written=1),
    ),
    (
        "remove-first-slot",  # B[2] moves into slot 0
        lambda d: [fe("10.96.0.1", 80, B[1], B[2]), *d[1:]],
        SyncStats(
            services_written=1,
            slots_written=1,
            members_written=1,
            slots_deleted=1,
            members_deleted=1,
            generations_written=1,
        ),
    ),
    (
        "replace-backend",  # B[7] takes B[1]'s slot; B[1] still serves port 443
        lambda d: [fe("10.96.0.1", 80, B[0], B[7], B[2]), *d[1:]],
        SyncStats(
            backends_written=1,
            members_written=1,
            slots_written=1,
            members_deleted=1,
            generations_written=1,
        ),
    ),
    (
        "affinity-on",
        lambda d: [*d[:4], fe("10.96.0.3", 80, B[5], aff=60), *d[5:]],
        SyncStats(services_written=1),
    ),
    (
        "delete-service",  # B[5] served only it
        lambda d: [*d[:4], *d[5:]],
        SyncStats(services_deleted=1, slots_deleted=1, members_deleted=1, backends_deleted=1),
    ),
    ("empty-service-gets-a-backend", lambda d: [*d[:5], fe("10.96.0.4", 80, B[0])], None),
    ("delete-all", lambda d: [], None),
]


@pytest.mark.parametrize(("change", "want"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_a_change_writes_only_what_changed(lab: Lab, change, want: SyncStats | None) -> None:  # type: ignore[no-untyped-def]
    lab.programmer.sync(DESIRED)
    desired = change(DESIRED)
    stats = lab.programmer.sync(desired)
    if want is not None:
        assert stats == want
    assert lab.programmer.dump() == sorted(desired, key=Frontend.sort_key)
    assert Programmer(lab.dp).dump() == lab.programmer.dump()
    again = lab.programmer.sync(desired)
    assert (again.written, again.deleted) == (0, 0)


def test_delete_all_leaves_empty_maps(lab: Lab) -> None:
    lab.programmer.sync(DESIRED)
    lab.programmer.sync([])
    m = lab.dp.maps
    for name in ("services", "backends", "service_backends", "service_members"):
        assert not getattr(m, name).items(), name


def test_dump_equals_desired(lab: Lab) -> None:
    lab.programmer.sync(DESIRED)
    assert lab.programmer.dump() == sorted(DESIRED, key=Frontend.sort_key)


def test_a_new_programmer_adopts_the_maps_and_their_ids(lab: Lab) -> None:
    first = lab.programmer
    first.sync(DESIRED)
    ids = {
        (f.vip, f.port, f.protocol): first.service_id(f.vip, f.port, f.protocol) for f in DESIRED
    }
    restarted = Programmer(lab.dp)
    assert {k: restarted.service_id(*k) for k in ids} == ids
    assert restarted.backend_id("10.244.1.1", 8080, "TCP") == first.backend_id(
        "10.244.1.1", 8080, "TCP"
    )
    stats = restarted.sync(DESIRED)
    assert (stats.written, stats.deleted) == (0, 0)


def test_ids_are_never_reused_across_restarts(lab: Lab) -> None:
    p = lab.programmer
    p.sync([fe("10.96.0.1", 80, B[0]), fe("10.96.0.2", 80, B[1])])
    last_svc = p.service_id("10.96.0.2", 80, "TCP")
    last_backend = p.backend_id(B[1].ip, 8080, "TCP")
    assert last_svc is not None and last_backend is not None
    p.sync([fe("10.96.0.1", 80, B[0])])  # the newest ids are no longer in any map
    state = lab.dp.maps.id_state.lookup(U32(0))
    assert state is not None and state.next_svc_id == last_svc + 1
    restarted = Programmer(lab.dp)
    restarted.sync([fe("10.96.0.1", 80, B[0]), fe("10.96.0.9", 80, B[6])])
    new_svc = restarted.service_id("10.96.0.9", 80, "TCP")
    new_backend = restarted.backend_id(B[6].ip, 8080, "TCP")
    assert new_svc is not None and new_svc > last_svc
    assert new_backend is not None and new_backend > last_backend


def test_ids_also_survive_a_lost_id_state(lab: Lab) -> None:
    """Without id_state the highest id in the maps bounds the next one."""
    lab.programmer.sync(DESIRED)
    lab.dp.maps.id_state.update(U32(0), IdState(0, 0))
    p = Programmer(lab.dp)
    p.sync([*DESIRED, fe("10.96.0.99", 80, Backend("10.244.9.9", 80))])
    ids = [p.service_id(f.vip, f.port, f.protocol) for f in DESIRED]
    assert p.service_id("10.96.0.99", 80, "TCP") == max(i for i in ids if i is not None) + 1


def test_full_sync_repairs_drift(lab: Lab) -> None:
    lab.programmer.sync(DESIRED)
    m = lab.dp.maps
    key, _ = m.services.items()[0]
    m.services.delete(key)  # someone else touched the maps
    assert lab.programmer.sync(DESIRED).written == 0  # the image still believes in it
    assert lab.programmer.sync(DESIRED, full=True).services_written == 1
    assert lab.programmer.dump() == sorted(DESIRED, key=Frontend.sort_key)


def test_restarted_datapath_adopts_pins_and_keeps_flows(lab: Lab) -> None:
    """A second compile on the same pin directory: the agent restarting."""
    lab.sync(fe(P.VIP, 80, *(Backend(b, 8080) for b in P.BACKENDS)))
    _, out = lab.run(P.tcp())
    backend = P.dst(out)
    second = Datapath(lab.dp.pin_dir, TEST_CONFIG)
    try:
        assert Programmer(second).dump() == lab.programmer.dump()
        _, out = P.run(second.prog_fd, P.tcp(flags="A"))
        assert P.dst(out) == backend
        assert second.counters()["ct_hits"] == 1
    finally:
        second.close(cleanup=False)
    assert (lab.dp.pin_dir / "conntrack").exists()
    _, out = lab.run(P.tcp(flags="A"))  # the first instance still works on the same maps
    assert P.dst(out) == backend


def test_incompatible_pins_are_refused(lab: Lab) -> None:
    from dataclasses import replace

    bigger = replace(TEST_CONFIG, max_conntrack=TEST_CONFIG.max_conntrack * 2)
    with pytest.raises(DatapathError, match="conntrack"):
        check_pins(lab.dp.pin_dir, bigger)
    assert check_pins(lab.dp.pin_dir, TEST_CONFIG) == []


def test_frontend_validation() -> None:
    with pytest.raises(ValueError, match="protocol"):
        Frontend(P.VIP, 80, "SCTP")
    with pytest.raises(ValueError, match="port"):
        Frontend(P.VIP, 0, "TCP")
    with pytest.raises(ValueError, match="IPv4"):
        Frontend("fd00::1", 80, "TCP")
    with pytest.raises(ValueError, match="IPv4"):
        Backend("10.0.0", 80)
    assert Frontend(P.VIP, 80, "TCP", (B[1], B[0], B[1])).backends == (B[0], B[1])


def test_duplicate_frontends_are_refused(lab: Lab) -> None:
    with pytest.raises(ValueError, match="twice"):
        lab.programmer.sync([fe(P.VIP, 80, B[0]), fe(P.VIP, 80, B[1])])
    assert lab.programmer.sync([fe(P.VIP, 80, B[0])]).services_written == 1
