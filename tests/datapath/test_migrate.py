"""Starting a datapath on maps of another layout: flows are migrated, not dropped; the new
programs replace the old on every attachment; a failed migration changes nothing."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ebpflb.datapath import _libbpf
from ebpflb.datapath.layout import LAYOUT_PIN, LAYOUT_V0, StructLayout, read_pinned
from ebpflb.datapath.loader import (
    Datapath,
    DatapathError,
    Direction,
    TcAttach,
    remove_pins,
    staging_dir,
)
from ebpflb.datapath.maps import BpfMap, PerCpuArray
from ebpflb.datapath.migrate import converter
from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from ebpflb.datapath.replyfilter import ReplyFilter
from ebpflb.datapath.structs import CT_REVERSE, U32, be16_to_port, ip_to_be32, port_to_be16
from tests.datapath import netns
from tests.datapath import packets as P
from tests.datapath.conftest import (
    TEST_CONFIG,
    map_id,
    new_pin_dir,
    prog_id,
    skip_reason,
    tc_programs_in,
)
from tests.datapath.variant import variant_bpf_dir

pytestmark = pytest.mark.datapath

FRONTEND = Frontend(P.VIP, 80, "TCP", tuple(Backend(b, 8080) for b in P.BACKENDS))
SPORTS = range(40000, 40008)
Flows = list[tuple[bytes, tuple[str, int]]]  # a client's next packet, where it must go


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    d = new_pin_dir()
    try:
        yield d
    finally:
        remove_pins(d)


def make_flows(dp: Datapath) -> Flows:
    """Open flows from several client ports; the first is then pinned (in its conntrack
    entry) to a backend other than the one the hash picks, so that only a kept entry sends
    its next packet there (a re-balanced flow would follow the hash)."""
    Programmer(dp).sync([FRONTEND])
    flows: Flows = []
    for sport in SPORTS:
        _, out = P.run(dp.prog_fd, P.tcp(sport=sport))
        flows.append((P.tcp(sport=sport, flags="A", seq=1001), P.dst(out)))
    hashed = flows[0][1][0]
    other = next(b for b in P.BACKENDS if b != hashed)
    ids = {v.addr: int(k.value) for k, v in dp.maps.backends.items()}
    for k, v in dp.maps.conntrack.items():
        if k.dir != CT_REVERSE and be16_to_port(k.sport) == SPORTS[0]:
            v.backend_id, v.addr = ids[ip_to_be32(other)], ip_to_be32(other)
            v.port = port_to_be16(8080)
            dp.maps.conntrack.update(k, v)
    flows[0] = (flows[0][0], (other, 8080))
    return flows


def check_flows(dp: Datapath, flows: Flows) -> None:
    """Every flow's next packet hits its conntrack entry and goes to its backend, rewritten
    correctly; a reply of one is translated back to the VIP."""
    before = dp.counters()
    for frame, backend in flows:
        _, out = P.run(dp.prog_fd, frame)
        assert P.dst(out) == backend
        P.check_checksums(out)
    after = dp.counters()
    assert after["ct_hits"] - before["ct_hits"] == len(flows)
    assert after["ct_misses"] == before["ct_misses"]
    backend, port = flows[1][1]
    reply = P.tcp(src=backend, dst=P.CLIENT, sport=port, dport=SPORTS[1], flags="SA")
    _, out = P.run(dp.prog_fd, reply)
    assert P.ip_addrs(out) == (P.VIP, P.CLIENT) and P.ports(out) == (80, SPORTS[1])


def tc_prog_id(n: netns.Node, ifname: str, hook: Direction) -> int:
    """Id of the one program on a tc hook of ifname."""
    ((_, found),) = tc_programs_in(n, ifname, hook)
    return found


def as_format_0(pin_dir: Path) -> None:
    """Make pins look as the code before the layout pin left them: no layout pin, and every
    array whose value has grown since (fields added at the end: the counters, id_state)
    replaced by one of format 0's value size holding each entry's (each CPU's) leading
    bytes."""
    (pin_dir / LAYOUT_PIN).unlink()
    for name, (_, value) in LAYOUT_V0.items():
        path = pin_dir / name
        fd = _libbpf.obj_get(str(path))
        try:
            info = _libbpf.map_info(fd)
            size = StructLayout.from_json(value).size
            if info.value_size == size:
                continue
            assert info.value_size > size
            new_fd = _libbpf.map_create(info.type, name, 4, size, info.max_entries)
            try:
                if info.type == _libbpf.BPF_MAP_TYPE_PERCPU_ARRAY:
                    grown = PerCpuArray(fd, ctypes.c_uint8 * info.value_size, name)
                    shrunk = PerCpuArray(new_fd, ctypes.c_uint8 * size, name)
                    for index in range(info.max_entries):
                        values = grown.lookup_percpu(index)
                        shrunk.update_percpu(index, [shrunk.value_type(*v[:size]) for v in values])
                else:
                    assert info.type == _libbpf.BPF_MAP_TYPE_ARRAY
                    old_array = BpfMap(fd, U32, ctypes.c_uint8 * info.value_size, name)
                    new_array = BpfMap(new_fd, U32, ctypes.c_uint8 * size, name)
                    for k, v in old_array.items():
                        new_array.update(k, new_array.value_type(*v[:size]))
                _libbpf.pin_replace(new_fd, path)
            finally:
                os.close(new_fd)
        finally:
            os.close(fd)


@pytest.mark.parametrize("tc_attach", ["tcx", "clsact"])
def test_bigger_maps_from_format_0_pins_keep_flows_and_swap_every_attachment(
    pin_dir: Path, tc_attach: TcAttach
) -> None:
    """Maps pinned without a layout (as before it existed), a bigger conntrack asked for:
    the flows move to the new maps, the counters too, and the tc programs (tcx or filters)
    and the XDP program of the old datapath are replaced by the new ones."""
    with netns.node() as n:
        pod, ext = n.add_pod("a", 5), n.add_pod("b", 6)
        old = Datapath(pin_dir, TEST_CONFIG, tc_attach=tc_attach)
        try:
            flows = make_flows(old)
            with netns.inside(n.ns):
                old.attach(n.ifindex(pod.host_veth))
                old.attach(n.ifindex(pod.host_veth), "egress")
                old.attach_external(n.ifindex(ext.host_veth), "xdp-generic")
            packets = old.counters()["packets"]
            entries = len(old.maps.conntrack.items())
        finally:
            old.close()
        as_format_0(pin_dir)
        bigger = replace(TEST_CONFIG, max_conntrack=TEST_CONFIG.max_conntrack * 2)
        with netns.inside(n.ns):
            new = Datapath(pin_dir, bigger)
        try:
            assert not new.migrating and not staging_dir(pin_dir).exists()
            assert read_pinned(pin_dir) == new.layout
            fd = _libbpf.obj_get(str(pin_dir / "conntrack"))
            try:
                assert _libbpf.map_info(fd).max_entries == bigger.max_conntrack
            finally:
                os.close(fd)
            assert len(new.maps.conntrack.items()) == entries
            assert new.counters()["packets"] == packets  # carried over
            assert tc_prog_id(n, pod.host_veth, "ingress") == prog_id(new.program_fd("ingress"))
            assert tc_prog_id(n, pod.host_veth, "egress") == prog_id(new.program_fd("egress"))
            assert tc_prog_id(n, ext.host_veth, "ingress") == prog_id(new.external_fd("tc"))
            with netns.inside(n.ns):
                xdp = _libbpf.xdp_prog_id(n.ifindex(ext.host_veth), _libbpf.XDP_FLAGS_SKB_MODE)
            assert xdp == prog_id(new.external_fd("xdp"))
            check_flows(new, flows)
        finally:
            new.close()


def test_format_0_pins_of_the_same_layout_are_adopted(pin_dir: Path) -> None:
    """Maps pinned by the code before the layout pin (format 0), same sizes: adopted as
    they are (the same maps) if this code's structs are still format 0's, else migrated;
    either way the flows are kept and the layout is pinned."""
    old = Datapath(pin_dir, TEST_CONFIG)
    try:
        flows = make_flows(old)
        ids = {name: map_id(pin_dir / name) for name in old.layout}
    finally:
        old.close()
    as_format_0(pin_dir)
    v0 = read_pinned(pin_dir)
    new = Datapath(pin_dir, TEST_CONFIG)
    try:
        assert read_pinned(pin_dir) == new.layout
        adopted = {name: map_id(pin_dir / name) for name in new.layout} == ids
        assert adopted == (v0 == new.layout)
        check_flows(new, flows)
    finally:
        new.close()


def test_a_changed_conntrack_value_is_converted_field_by_field(
    pin_dir: Path, tmp_path: Path
) -> None:
    """To a conntrack value with a widened field (every later one moves), one gone and one
    new, and back: every entry keeps its fields' values, the new field starts at zero."""
    old = Datapath(pin_dir, TEST_CONFIG)
    try:
        flows = make_flows(old)
        before = {bytes(k): v for k, v in old.maps.conntrack.items()}
    finally:
        old.close()
    variant = Datapath(pin_dir, TEST_CONFIG, bpf_dir=variant_bpf_dir(tmp_path / "bpf"))
    try:
        value = variant.layout["conntrack"].value
        assert value.size == 48 and ("packets", 38, 2, 2) in value.fields
        assert ("lifetime", 8, 8, 8) in value.fields
        after = {bytes(k): v for k, v in variant.maps.conntrack.items()}
        assert after.keys() == before.keys()
        for k, v in after.items():
            assert v.packets == 0
            for name, *_ in type(before[k])._fields_:
                if name != "pad2":
                    assert getattr(v, name) == getattr(before[k], name), name
        check_flows(variant, flows)  # the rewired flow gains a reverse entry
        entries = len(variant.maps.conntrack.items())
    finally:
        variant.close()
    back = Datapath(pin_dir, TEST_CONFIG)
    try:
        assert read_pinned(pin_dir) == back.layout
        assert len(back.maps.conntrack.items()) == entries
        check_flows(back, flows)
    finally:
        back.close()


def test_a_failed_migration_leaves_the_old_datapath_as_it_was(
    pin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile that fails, a migration never finished, a swap that fails half-way (the
    XDP one, after the tc ones): the old maps, pins and attachments are as they were, the
    flows keep working."""
    with netns.node() as n:
        pod, ext = n.add_pod("a", 5), n.add_pod("b", 6)
        old = Datapath(pin_dir, TEST_CONFIG)
        try:
            flows = make_flows(old)
            with netns.inside(n.ns):
                old.attach(n.ifindex(pod.host_veth))
                old.attach_external(n.ifindex(ext.host_veth), "xdp-generic")
            ids = {name: map_id(pin_dir / name) for name in old.layout}
            attached = (
                tc_prog_id(n, pod.host_veth, "ingress"),
                tc_prog_id(n, ext.host_veth, "ingress"),
            )
            broken = variant_bpf_dir(tmp_path / "bpf")
            (broken / "lb_kern.c").write_text((broken / "lb_kern.c").read_text() + "\n#error no\n")
            bigger = replace(TEST_CONFIG, max_conntrack=TEST_CONFIG.max_conntrack * 2)
            with pytest.raises(DatapathError, match="compiling .* failed"):
                Datapath(pin_dir, bigger, bpf_dir=broken)

            def refuse(*_: object) -> None:
                raise _libbpf.BpfError(1, "refused by the test")

            # An agent that stops before its first sync: the new programs never ran.
            with netns.inside(n.ns):
                pending = Datapath(pin_dir, bigger, defer_migration=True)
            assert pending.migrating and staging_dir(pin_dir).exists()
            pending.close()
            assert not staging_dir(pin_dir).exists()

            monkeypatch.setattr(_libbpf, "xdp_replace", refuse)
            with netns.inside(n.ns), pytest.raises(DatapathError, match="swapping"):
                Datapath(pin_dir, bigger)
            assert not staging_dir(pin_dir).exists()
            assert {name: map_id(pin_dir / name) for name in old.layout} == ids
            assert read_pinned(pin_dir) == old.layout
            assert (
                tc_prog_id(n, pod.host_veth, "ingress"),
                tc_prog_id(n, ext.host_veth, "ingress"),
            ) == attached
            check_flows(old, flows)
        finally:
            old.close()


def reply_filter(dp: Datapath) -> ReplyFilter:
    assert dp.maps.reply_filter is not None
    return ReplyFilter(dp.maps.reply_filter)


def test_the_reply_filter_is_adopted_but_never_migrated(pin_dir: Path, tmp_path: Path) -> None:
    """A restart on the same layout adopts the filter as it is (the same map, ready: its
    bits still cover every reverse entry). A migration does not copy it: the flows copied
    into the new conntrack have no bits, so the new programs start it not ready (every
    reverse lookup done), and the GC leaves it so until the migration is finished."""
    old = Datapath(pin_dir, TEST_CONFIG)
    try:
        flows = make_flows(old)
        old.gc()
        assert reply_filter(old).ready
        rf_id = map_id(pin_dir / "reply_filter")
    finally:
        old.close()
    same = Datapath(pin_dir, TEST_CONFIG)
    try:
        assert map_id(pin_dir / "reply_filter") == rf_id and reply_filter(same).ready
        check_flows(same, flows)
    finally:
        same.close()
    bpf = variant_bpf_dir(tmp_path / "bpf")
    pending = Datapath(pin_dir, TEST_CONFIG, bpf_dir=bpf, defer_migration=True)
    try:
        assert pending.migrating and reply_filter(pending).state() == 0
        assert pending.gc().reply_filter_written == -1
        assert reply_filter(pending).state() == 0
        pending.finish_migration()
        assert pending.maps.reply_filter is not None
        assert not any(v[0] for _, v in pending.maps.reply_filter.rows())
        check_flows(pending, flows)  # not ready: the copied reverse entries are looked up
        assert pending.gc().reply_filter_written >= 0
        rf = reply_filter(pending)
        assert rf.ready
        reverse = [k.saddr for k, _ in pending.maps.conntrack.items() if k.dir == CT_REVERSE]
        assert reverse and all(rf.may_exist(a) for a in reverse)
        check_flows(pending, flows)
        assert pending.counters()["rev_skipped"] == 0
    finally:
        pending.close()


def _layout(*fields: tuple[str, int, int, int]) -> StructLayout:
    return StructLayout(max(o + s for _, o, s, _ in fields), fields)


def test_converter_by_field_name() -> None:
    old = _layout(("a", 0, 4, 4), ("b", 4, 2, 2), ("arr", 6, 4, 2), ("gone", 10, 2, 2))
    new = _layout(("b", 0, 8, 8), ("a", 8, 2, 2), ("arr", 10, 6, 2), ("new", 16, 4, 4))
    value = converter(old, new, key=False)
    data = bytes.fromhex("01000000 0200 03000400 0500")
    assert value(data) == bytes.fromhex("0200000000000000 0100 030004000000 00000000")
    too_big = bytes.fromhex("00000100 0200 03000400 0500")  # a = 65536: no room in u16
    assert value(too_big) is None
    key = converter(old, new, key=True)
    assert key(data) is None  # "gone" is not zero: two keys could become one
    assert key(data[:10] + b"\0\0") is not None
    shrink = converter(new, old, key=False)
    assert shrink(value(data) or b"") == data[:10] + b"\0\0"
    wide_arr = bytes.fromhex("0200000000000000010003000400050000000000")
    assert shrink(wide_arr) is None  # the array's third element has nowhere to go
