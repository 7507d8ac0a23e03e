"""The Programmer's logic on in-memory maps: every intermediate map state is consistent."""

from __future__ import annotations

import ctypes
import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpflb.datapath import addrfilter, node
from ebpflb.datapath.fake import DictMap, fake_maps
from ebpflb.datapath.maps import LbMaps
from ebpflb.datapath.programmer import Backend, Frontend, Programmer, assign_slots
from ebpflb.datapath.structs import U32, U64

pytestmark = pytest.mark.unit


def check_consistent(m: LbMaps) -> None:
    """What the datapath relies on: a service's live slots name existing member backends."""
    slots = {(k.svc_id, k.slot): v.value for k, v in m.service_backends.items()}
    members = {(k.svc_id, k.backend_id) for k, _ in m.service_members.items()}
    backends = {k.value for k, _ in m.backends.items()}
    for _, svc in m.services.items():
        for slot in range(svc.count):
            bid = slots.get((svc.svc_id, slot))
            assert bid is not None, f"service {svc.svc_id} slot {slot} missing"
            assert bid in backends, f"service {svc.svc_id} slot {slot}: no backend {bid}"
            assert (svc.svc_id, bid) in members, f"service {svc.svc_id}: {bid} not a member"
    for _, bid in members:
        assert bid in backends, f"member {bid} has no backend entry"
    check_filter(m)


def filter_words(m: LbMaps) -> dict[int, int]:
    assert m.addr_filter is not None
    return {k.value: v.value for k, v in m.addr_filter.items() if v.value}


def check_filter(m: LbMaps) -> None:
    """Once the address filter says it is ready, it passes every VIP and backend address."""
    if m.addr_filter is None or not filter_words(m).get(addrfilter.READY):
        return
    words = filter_words(m)
    needed = [(k.vip, addrfilter.FRONTEND) for k, _ in m.services.items()]
    needed += [(v.addr, addrfilter.BACKEND) for _, v in m.backends.items()]
    for addr, kind in needed:
        index, bit = addrfilter.position(addr, kind)
        assert words.get(index, 0) & bit, f"address {addr:#x} (kind {kind}) filtered out"


def expected_filter(m: LbMaps) -> dict[int, int]:
    """The words a filter of exactly the maps' addresses has, ready."""
    words = {addrfilter.READY: 1}
    needed = [(k.vip, addrfilter.FRONTEND) for k, _ in m.services.items()]
    needed += [(v.addr, addrfilter.BACKEND) for _, v in m.backends.items()]
    for addr, kind in needed:
        index, bit = addrfilter.position(addr, kind)
        words[index] = words.get(index, 0) | bit
    return words


class CheckedMap(DictMap[ctypes.Structure, ctypes.Structure]):
    """Checks the whole map set after every write, as the datapath would see it."""

    maps: LbMaps | None = None
    fail_after: int | None = None  # raise on this many more writes

    def _after(self) -> None:
        if self.maps is not None:
            check_consistent(self.maps)

    def _maybe_fail(self) -> None:
        if CheckedMap.fail_after is not None:
            if CheckedMap.fail_after == 0:
                raise OSError(28, "map full")
            CheckedMap.fail_after -= 1

    def update(self, key: ctypes.Structure, value: ctypes.Structure) -> None:
        self._maybe_fail()
        super().update(key, value)
        self._after()

    def delete(self, key: ctypes.Structure) -> bool:
        self._maybe_fail()
        found = super().delete(key)
        self._after()
        return found


def checked_maps() -> LbMaps:
    plain = fake_maps()
    checked = {}
    names = ("services", "backends", "service_backends", "service_members", "id_state")
    for name in (*names, "addr_filter"):
        m = getattr(plain, name)
        checked[name] = CheckedMap(m.key_type, m.value_type, name)
    maps = LbMaps(
        conntrack=plain.conntrack,
        affinity=plain.affinity,
        node_config=plain.node_config,
        sock_revnat=plain.sock_revnat,
        **checked,
    )
    for m in checked.values():
        m.maps = maps
    return maps


def writes(maps: LbMaps) -> tuple[int, int]:
    """(updates, deletes) done on the four programmed maps."""
    ms = [maps.services, maps.backends, maps.service_backends, maps.service_members]
    return sum(m.updates for m in ms), sum(m.deletes for m in ms)  # type: ignore[attr-defined]


def map_gen(maps: LbMaps) -> int:
    """The maps' generation (lb_forward_known() in bpf/flow.h trusts entries holding it)."""
    ids = maps.id_state.lookup(U32(0))
    return int(ids.map_gen) if ids is not None else 0


VIPS = ("10.96.0.1", "10.96.0.2")
PODS = tuple(Backend(f"10.244.0.{i}", p) for i in range(1, 6) for p in (8080, 9090)) + tuple(
    Backend(f"10.244.0.{i}", 8080, local=True) for i in range(1, 3)
)

frontend_st = st.builds(
    Frontend,
    vip=st.sampled_from(VIPS),
    port=st.sampled_from((53, 80)),
    protocol=st.sampled_from(("TCP", "UDP")),
    backends=st.lists(st.sampled_from(PODS), max_size=6).map(tuple),
    affinity_timeout=st.sampled_from((0, 30)),
    nodeport=st.booleans(),
)
desired_st = st.lists(frontend_st, max_size=6).map(
    lambda fes: list({(f.vip, f.port, f.protocol): f for f in fes}.values())
)


@settings(max_examples=150, deadline=None)
@given(st.lists(desired_st, min_size=1, max_size=6))
def test_any_sequence_of_syncs_keeps_the_maps_consistent(history: list[list[Frontend]]) -> None:
    maps = checked_maps()
    programmer = Programmer(maps)
    for i, desired in enumerate(history):
        if i == 3:  # an agent restart in the middle
            programmer = Programmer(maps)
        before, gen = writes(maps), map_gen(maps)
        stats = programmer.sync(desired)
        after = writes(maps)
        assert (stats.written, stats.deleted) == (after[0] - before[0], after[1] - before[1])
        assert programmer.dump() == sorted(desired, key=Frontend.sort_key)
        assert filter_words(maps) == expected_filter(maps)
        # Any change raises the maps' generation, and it is never 0 once anything was written.
        assert map_gen(maps) == (gen + 1 if stats.written or stats.deleted else gen)
        assert map_gen(maps) or not stats.written
        again = programmer.sync(desired)
        assert (again.written, again.deleted) == (0, 0)
        assert map_gen(maps) == gen + (1 if stats.written or stats.deleted else 0)


@settings(max_examples=60, deadline=None)
@given(desired_st, desired_st, st.integers(min_value=0, max_value=20))
def test_a_failed_sync_is_repaired_by_the_next(
    first: list[Frontend], second: list[Frontend], fail_at: int
) -> None:
    maps = checked_maps()
    programmer = Programmer(maps)
    programmer.sync(first)
    gen = map_gen(maps)
    CheckedMap.fail_after = fail_at
    try:
        programmer.sync(second)
    except OSError:
        pass
    finally:
        CheckedMap.fail_after = None
    repaired = programmer.sync(second)
    assert programmer.dump() == sorted(second, key=Frontend.sort_key)
    assert filter_words(maps) == expected_filter(maps)
    # Whatever the failed sync deleted, the generation has moved on since: raised after the
    # failure, or else by the repair, even one with nothing left to write.
    assert map_gen(maps) > gen or first == second
    assert repaired.written + repaired.deleted == 0 or map_gen(maps) > gen


class LoggedMap(DictMap[ctypes.Structure, ctypes.Structure]):
    """Logs the writes the datapath's generation check depends on, in order."""

    log: list[str] = []

    def update(self, key: ctypes.Structure, value: ctypes.Structure) -> None:
        super().update(key, value)
        if self.name == "services":
            self.log.append(f"gen {value.gen}")  # type: ignore[attr-defined]

    def delete(self, key: ctypes.Structure) -> bool:
        if self.name == "service_members":
            self.log.append(f"backend {key.backend_id} out")  # type: ignore[attr-defined]
        return super().delete(key)


def test_a_backend_leaving_raises_the_generation_after_its_membership_went() -> None:
    """The datapath skips a known flow's membership lookup while its entry holds the
    service's generation (bpf/flow.h), so a leaving backend's membership must go first and
    the generation be raised after, by sync() and update() alike; a backend joining leaves
    it alone. 255 is followed by 1 (0 means "none kept"), and a service adopted with 0
    gets a generation at the next sync."""
    plain = fake_maps()
    logged = {
        name: LoggedMap(getattr(plain, name).key_type, getattr(plain, name).value_type, name)
        for name in ("services", "service_members")
    }
    maps = dataclasses.replace(plain, **logged)
    log = LoggedMap.log = []
    p = Programmer(maps)
    a, b, c = PODS[:3]
    p.sync([Frontend(VIPS[0], 80, "TCP", (a, b))])
    (bid_b,) = [p.backend_id(b.ip, b.port, "TCP")]
    p.sync([Frontend(VIPS[0], 80, "TCP", (a, b, c))])
    assert log == ["gen 1", "gen 1"]  # written for the count: the same generation
    log.clear()
    p.sync([Frontend(VIPS[0], 80, "TCP", (a, c))])
    assert log == ["gen 1", f"backend {bid_b} out", "gen 2"]
    log.clear()
    bid_a = p.backend_id(a.ip, a.port, "TCP")
    p.update({None: [Frontend(VIPS[0], 80, "TCP", (c,))]})
    assert log == ["gen 2", f"backend {bid_a} out", "gen 3"]

    def restart_at(gen: int) -> Programmer:
        """An agent restarted on maps whose service has that generation: it adopts it."""
        ((key, value),) = maps.services.items()
        value.gen = gen
        maps.services.update(key, value)
        log.clear()
        return Programmer(maps)

    restart_at(0xFF).sync([Frontend(VIPS[0], 80, "TCP", (a,))])  # c leaves, a joins
    assert log == [f"backend {p.backend_id(c.ip, c.port, 'TCP')} out", "gen 1"]
    restart_at(0).sync([Frontend(VIPS[0], 80, "TCP", (a,))])  # nothing changes
    assert log == ["gen 1"]


def test_ids_stay_stable_and_are_not_reused() -> None:
    maps = fake_maps()
    p = Programmer(maps)
    a = Frontend("10.96.0.1", 80, "TCP", (PODS[0],))
    b = Frontend("10.96.0.2", 80, "TCP", (PODS[1],))
    p.sync([a, b])
    ids = p.service_id("10.96.0.1", 80, "TCP"), p.service_id("10.96.0.2", 80, "TCP")
    p.sync([a])
    p.sync([a, b])
    assert p.service_id("10.96.0.1", 80, "TCP") == ids[0]
    assert p.service_id("10.96.0.2", 80, "TCP") not in ids


SLOTS = [
    ("new", [], [1, 2, 3], [1, 2, 3]),
    ("unchanged", [1, 2, 3], [1, 2, 3], [1, 2, 3]),
    ("append", [1, 2], [1, 2, 3], [1, 2, 3]),
    ("remove-last", [1, 2, 3], [1, 2], [1, 2]),
    ("remove-first-moves-last", [1, 2, 3], [2, 3], [3, 2]),
    ("replace-in-place", [1, 2, 3], [1, 4, 3], [1, 4, 3]),
    ("all-new", [1, 2], [5, 6], [5, 6]),
    ("empty", [1, 2], [], []),
    ("hole-from-crash", [1, None, 3], [1, 3, 4], [1, 4, 3]),
]


@pytest.mark.parametrize(
    ("old", "wanted", "slots"), [c[1:] for c in SLOTS], ids=[c[0] for c in SLOTS]
)
def test_assign_slots(old: list[int | None], wanted: list[int], slots: list[int]) -> None:
    assert assign_slots(old, wanted) == slots


def test_node_settings_round_trip() -> None:
    maps = fake_maps()
    assert node.read(maps.node_config) == node.NodeSettings()
    want = node.NodeSettings(("192.168.50.10", "10.0.0.1"), (61000, 65535), {7: 3, 3: 1})
    node.write(maps.node_config, want)
    got = node.read(maps.node_config)
    assert got == want
    assert list(got.interfaces) == [3, 7]
    without = node.with_interface(got, 7, None)
    assert without.interfaces == {3: 1} and without.node_ips == want.node_ips
    moved = node.with_node_ips(without, ["192.168.50.11"], (40000, 40010))
    assert (moved.node_ips, moved.snat_ports, moved.interfaces) == (
        ("192.168.50.11",),
        (40000, 40010),
        {3: 1},
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_ips": ("1.1.1.1",) * 2}, "twice"),
        ({"node_ips": tuple(f"10.0.0.{i}" for i in range(5))}, "at most 4"),
        ({"node_ips": ("fd00::1",)}, "IPv4"),
        ({"snat_ports": (65535, 61000)}, "port range"),
        ({"snat_ports": (0, 10)}, "port range"),
        ({"interfaces": dict.fromkeys(range(1, 10), 0)}, "at most 8"),
    ],
)
def test_node_settings_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        node.NodeSettings(**kwargs)  # type: ignore[arg-type]


OWNERS = ("svc-a", "svc-b", "svc-c")


def owned_st(owner: str) -> st.SearchStrategy[list[Frontend]]:
    """Frontends of one owner: its own VIP (owners never share one), shared backends."""
    vip = f"10.96.1.{OWNERS.index(owner) + 1}"
    return desired_st.map(
        lambda fes: list(
            {(f.port, f.protocol): dataclasses.replace(f, vip=vip) for f in fes}.values()
        )
    )


change_st = st.sampled_from(OWNERS).flatmap(lambda o: st.tuples(st.just(o), owned_st(o)))


@settings(max_examples=150, deadline=None)
@given(st.lists(change_st, min_size=1, max_size=12), st.integers(min_value=0, max_value=11))
def test_updates_leave_the_maps_as_a_full_sync_would(
    changes: list[tuple[str, list[Frontend]]], restart_at: int
) -> None:
    """Any sequence of per-owner updates (checked after every single write) ends with the
    maps a full sync of the same state makes: a full sync then writes and deletes nothing."""
    maps = checked_maps()
    programmer = Programmer(maps)
    state: dict[str, list[Frontend]] = {o: [] for o in OWNERS}
    programmer.sync(state)
    for i, (owner, fes) in enumerate(changes):
        if i == restart_at:  # an agent restart: adopt, full sync, then updates again
            programmer = Programmer(maps)
            programmer.sync(state)
        state[owner] = fes
        programmer.update({owner: fes})
        wanted = sorted((f for fs in state.values() for f in fs), key=Frontend.sort_key)
        assert programmer.dump() == wanted
        assert filter_words(maps) == expected_filter(maps)
    again = Programmer(maps).sync(state, full=True)
    assert (again.written, again.deleted) == (0, 0)
    assert programmer.update({o: state[o] for o in OWNERS}).written == 0


def test_update_touches_only_the_changed_owner() -> None:
    maps = fake_maps()
    p = Programmer(maps)
    many = {f"svc-{i}": [Frontend(f"10.96.2.{i}", 80, "TCP", PODS[:3])] for i in range(50)}
    p.sync(many)
    before = writes(maps)
    stats = p.update({"svc-7": [Frontend("10.96.2.7", 80, "TCP", PODS[1:3])]})
    after = writes(maps)
    # The count drops, the slots move up (two writes), the old first slot and member go;
    # the backend stays (other Services use it).
    assert (stats.services_written, stats.slots_deleted, stats.members_deleted) == (1, 1, 1)
    assert stats.backends_deleted == 0
    assert (after[0] - before[0], after[1] - before[1]) == (stats.written, stats.deleted)
    p.update({"svc-7": []})
    assert p.service_id("10.96.2.7", 80, "TCP") is None
    assert len(p.dump()) == 49


def test_update_refuses_another_owners_frontend_and_a_stale_image() -> None:
    maps = checked_maps()
    p = Programmer(maps)
    a = Frontend("10.96.0.1", 80, "TCP", (PODS[0],))
    p.sync({"a": [a]})
    with pytest.raises(ValueError, match="10.96.0.1:80/TCP of b is a's"):
        p.update({"b": [a]})
    with pytest.raises(RuntimeError, match="sync"):
        p.update({"a": []})
    p.sync({"a": [], "b": [a]})  # a full sync repairs, and may move a frontend
    p.update({"c": [dataclasses.replace(a, port=81)]})
    assert [f.port for f in p.dump()] == [80, 81]


@settings(max_examples=60, deadline=None)
@given(st.lists(change_st, min_size=2, max_size=6), st.integers(min_value=0, max_value=20))
def test_a_failed_update_is_repaired_by_a_full_sync(
    changes: list[tuple[str, list[Frontend]]], fail_at: int
) -> None:
    maps = checked_maps()
    programmer = Programmer(maps)
    state: dict[str, list[Frontend]] = {o: [] for o in OWNERS}
    programmer.sync(state)
    *first, (owner, fes) = changes
    for o, f in first:
        state[o] = f
        programmer.update({o: f})
    state[owner] = fes
    CheckedMap.fail_after = fail_at
    try:
        programmer.update({owner: fes})
    except OSError:
        pass
    finally:
        CheckedMap.fail_after = None
    programmer.sync(state)
    assert programmer.dump() == sorted(
        (f for fs in state.values() for f in fs), key=Frontend.sort_key
    )
    assert filter_words(maps) == expected_filter(maps)


def test_the_address_filter_counts_addresses_that_share_a_slot() -> None:
    """Two addresses in one slot: the bit stays while either is there, and an address keeps
    its bit while any entry names it. A rebuild writes only what the map lacks."""
    by_slot: dict[int, int] = {}
    a = b = 0
    rnd = random.Random(1)
    for _ in range(1 << 16):  # two addresses that share a slot (a birthday: soon)
        n = rnd.getrandbits(32)
        if addrfilter.slot(n) in by_slot and by_slot[addrfilter.slot(n)] != n:
            a, b = by_slot[addrfilter.slot(n)], n
            break
        by_slot[addrfilter.slot(n)] = n
    assert a and b
    fe, be = addrfilter.FRONTEND, addrfilter.BACKEND
    m = DictMap(U32, U64, "addr_filter")
    f = addrfilter.AddrFilter(m)
    assert f.may_be(a, fe) and f.may_be(a, be)  # not ready: anything may be
    assert f.rebuild([a], []) == 2  # a's word, and "ready"
    assert f.may_be(a, fe) and not f.may_be(a, be)
    f.add(fe, [b, b])  # two entries name b
    assert f.flush() == 0  # the bit was set already
    f.remove(fe, [a])
    f.remove(fe, [b])
    assert f.flush() == 0 and f.may_be(a, fe)  # b is still named once
    f.remove(fe, [b])
    assert f.flush() == 1 and not f.may_be(a, fe)
    assert filter_words(fake_maps_with(m)) == {addrfilter.READY: 1}
    assert addrfilter.AddrFilter(m).rebuild([], []) == 0  # the map holds exactly that


def fake_maps_with(addr_filter: DictMap[U32, U64]) -> LbMaps:
    return dataclasses.replace(fake_maps(), addr_filter=addr_filter)
