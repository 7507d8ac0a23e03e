"""The maps' layout (type, size, key and value fields), pinned with them for later versions."""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpflb.datapath import _libbpf
from ebpflb.datapath.maps import MAP_SPECS

if TYPE_CHECKING:
    from ebpflb.datapath.loader import DatapathConfig

# The layout is pinned as `layout`: a one-element array whose value is FORMAT followed by
# the description in JSON, so that an agent of another version knows what the maps it finds
# hold without the code that made them (see migrate.py). Maps pinned before it existed are
# format 0: LAYOUT_V0's fields.
LAYOUT_PIN = "layout"
FORMAT = 1
_HEAD = struct.Struct("=I")  # the format number before the JSON

Field = tuple[str, int, int, int]  # name, offset, size, element size (size unless an array)


class LayoutError(ValueError):
    """Pinned maps whose layout cannot be known or used."""


@dataclass(frozen=True)
class StructLayout:
    """The fields of a key or value type. A bare integer is one field named "value"."""

    size: int
    fields: tuple[Field, ...]

    @classmethod
    def of(cls, t: Any) -> StructLayout:
        """The layout of a ctypes type: ours (structs.py) or one bcc made from the C."""
        size = ctypes.sizeof(t)
        if not issubclass(t, ctypes.Structure):
            return cls(size, (("value", 0, size, size),))
        fields: list[Field] = []
        for name, ftype, *_ in t._fields_:
            d = getattr(t, name)
            elem = ctypes.sizeof(ftype._type_) if issubclass(ftype, ctypes.Array) else d.size
            fields.append((name, d.offset, d.size, elem))
        return cls(size, tuple(fields))

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "fields": [list(f) for f in self.fields]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StructLayout:
        fields = tuple((str(n), int(o), int(s), int(e)) for n, o, s, e in d["fields"])
        layout = cls(int(d["size"]), fields)
        for name, off, size, elem in fields:
            if elem not in (1, 2, 4, 8) or size % elem or off + size > layout.size:
                raise LayoutError(f"field {name!r} ({off}, {size}, {elem}) does not fit")
        return layout


@dataclass(frozen=True)
class MapLayout:
    map_type: int
    max_entries: int
    key: StructLayout
    value: StructLayout  # one CPU's value for a per-CPU map

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.map_type,
            "max_entries": self.max_entries,
            "key": self.key.to_json(),
            "value": self.value.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MapLayout:
        return cls(
            int(d["type"]),
            int(d["max_entries"]),
            StructLayout.from_json(d["key"]),
            StructLayout.from_json(d["value"]),
        )


Layout = dict[str, MapLayout]


def mirror_layout(config: DatapathConfig) -> Layout:
    """The layout this code's ctypes mirrors and config describe (what a compile should give)."""
    return {
        s.name: MapLayout(
            s.map_type,
            config.max_entries(s.name),
            StructLayout.of(s.key_type),
            StructLayout.of(s.value_type),
        )
        for s in MAP_SPECS
    }


def encode(layout: Layout) -> bytes:
    text = json.dumps({n: m.to_json() for n, m in sorted(layout.items())}, sort_keys=True)
    return _HEAD.pack(FORMAT) + text.encode()


def decode(data: bytes) -> Layout:
    (fmt,) = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise LayoutError(f"layout format {fmt}; this agent knows 0 to {FORMAT}")
    try:
        d = json.loads(data[_HEAD.size :].rstrip(b"\0"))
        return {str(n): MapLayout.from_json(m) for n, m in d.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise LayoutError(f"unreadable layout description: {e}") from e


def pin_layout(path: Path, layout: Layout) -> None:
    """Create the layout map holding layout and pin it at path (replacing what is there)."""
    data = encode(layout)
    fd = _libbpf.map_create(_libbpf.BPF_MAP_TYPE_ARRAY, LAYOUT_PIN, 4, len(data), 1)
    try:
        key, value = ctypes.c_uint32(0), ctypes.create_string_buffer(data, len(data))
        ret = _libbpf.lib().bpf_map_update_elem(fd, ctypes.byref(key), value, _libbpf.BPF_ANY)
        _libbpf.check(ret, "writing the layout")
        _libbpf.pin_replace(fd, path)
    finally:
        os.close(fd)


def _read_layout_pin(path: Path) -> Layout:
    fd = _libbpf.obj_get(str(path))
    try:
        info = _libbpf.map_info(fd)
        value = ctypes.create_string_buffer(info.value_size)
        key = ctypes.c_uint32(0)
        ret = _libbpf.lib().bpf_map_lookup_elem(fd, ctypes.byref(key), value)
        _libbpf.check(ret, f"reading {path}")
    finally:
        os.close(fd)
    return decode(value.raw)


def read_pinned(pin_dir: Path) -> Layout | None:
    """The layout of the maps pinned in pin_dir; None if there are none. Without a layout pin
    the maps are format 0 (LAYOUT_V0), with type and size from the kernel."""
    if (pin_dir / LAYOUT_PIN).exists():
        layout = _read_layout_pin(pin_dir / LAYOUT_PIN)
    elif any((pin_dir / name).exists() for name in LAYOUT_V0):
        layout = _v0_layout(pin_dir)
    else:
        return None
    for name, m in layout.items():
        info = _pinned_info(pin_dir / name)
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        want = (m.map_type, m.key.size, m.value.size, m.max_entries)
        if have != want:
            raise LayoutError(
                f"{pin_dir / name}: the map has (type, key, value, entries) {have}, "
                f"its layout says {want}"
            )
    return layout


def _pinned_info(path: Path) -> _libbpf.MapInfo:
    if not path.exists():
        raise LayoutError(f"{path} is in the layout but not pinned")
    fd = _libbpf.obj_get(str(path))
    try:
        return _libbpf.map_info(fd)
    finally:
        os.close(fd)


def _v0_layout(pin_dir: Path) -> Layout:
    layout: Layout = {}
    for name, (key, value) in LAYOUT_V0.items():
        info = _pinned_info(pin_dir / name)
        layout[name] = MapLayout(
            info.type, info.max_entries, StructLayout.from_json(key), StructLayout.from_json(value)
        )
    return layout


def ctype(s: StructLayout, name: str) -> type[ctypes.Structure]:
    """A ctypes Structure with exactly s's fields at s's offsets (unnamed gaps as _gapN)."""
    ints = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
    fields: list[tuple[str, Any]] = []
    at = 0
    for fname, off, size, elem in sorted(s.fields, key=lambda f: f[1]):
        if off > at:
            fields.append((f"_gap{at}", ctypes.c_uint8 * (off - at)))
        fields.append((fname, ints[elem] if size == elem else ints[elem] * (size // elem)))
        at = off + size
    if s.size > at:
        fields.append((f"_gap{at}", ctypes.c_uint8 * (s.size - at)))
    return type(name, (ctypes.Structure,), {"_pack_": 1, "_fields_": fields})


def _fields(*fs: tuple[str, int]) -> dict[str, Any]:
    """A layout in JSON from (name, size) pairs laid end to end (LAYOUT_V0 has no gaps)."""
    out, at = [], 0
    for name, size in fs:
        out.append([name, at, size, size])
        at += size
    return {"size": at, "fields": out}


_U32 = _fields(("value", 4))

# The layout of the maps pinned before the layout pin existed (format 0), key and value.
LAYOUT_V0: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "services": (
        _fields(("vip", 4), ("port", 2), ("proto", 1), ("pad", 1)),
        _fields(("svc_id", 4), ("count", 2), ("flags", 1), ("pad", 1), ("affinity_timeout", 4)),
    ),
    "backends": (_U32, _fields(("addr", 4), ("port", 2), ("proto", 1), ("flags", 1))),
    "service_backends": (_fields(("svc_id", 4), ("slot", 4)), _U32),
    "service_members": (_fields(("svc_id", 4), ("backend_id", 4)), _U32),
    "conntrack": (
        _fields(
            ("saddr", 4),
            ("daddr", 4),
            ("sport", 2),
            ("dport", 2),
            ("proto", 1),
            ("dir", 1),
            ("pad", 2),
        ),
        _fields(
            ("last_seen", 8),
            ("lifetime", 4),
            ("svc_id", 4),
            ("backend_id", 4),
            ("addr", 4),
            ("nat_addr", 4),
            ("port", 2),
            ("nat_port", 2),
            ("flags", 1),
            ("pad", 1),
            ("pad2", 2),
            ("pad3", 4),
        ),
    ),
    "affinity": (
        _fields(("svc_id", 4), ("client", 4)),
        _fields(("last_used", 8), ("backend_id", 4), ("pad", 4)),
    ),
    "counters": (
        _U32,
        _fields(
            *((n, 8) for n in ("packets", "passed", "other", "fragments", "malformed", "dnat")),
            *((n, 8) for n in ("rev_nat", "hairpin", "ct_hits", "ct_misses", "ct_expired")),
            *((n, 8) for n in ("reselects", "affinity_hits", "no_backend", "errors")),
            *((n, 8) for n in ("nodeport_xdp", "nodeport_tc", "xdp_pass_to_tc", "snat")),
            *((n, 8) for n in ("rev_snat", "snat_no_port", "fib_redirect")),
            *((n, 8) for n in ("fib_redirect_neigh", "fib_fail")),
        ),
    ),
    "id_state": (_U32, _fields(("next_svc_id", 4), ("next_backend_id", 4))),
    "node_config": (
        _U32,
        {
            "size": 88,
            "fields": [
                ["node_ips", 0, 16, 4],
                ["ext_ifindex", 16, 32, 4],
                ["ext_flags", 48, 32, 4],
                ["snat_port_min", 80, 2, 2],
                ["snat_port_max", 82, 2, 2],
                ["pad", 84, 4, 4],
            ],
        },
    ),
}
