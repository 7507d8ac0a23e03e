"""Typed access to the datapath's pinned BPF maps through libbpf, without bcc (agent, GC, dumps)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ebpflb.datapath import _libbpf
from ebpflb.datapath._libbpf import BpfError
from ebpflb.datapath.structs import (
    COUNTER_FIELDS,
    U32,
    U64,
    AffinityKey,
    AffinityValue,
    BackendValue,
    Counters,
    CtKey,
    CtValue,
    IdState,
    MemberKey,
    NodeConfig,
    SlotKey,
    SockKey,
    SockPeer,
    SockValue,
    SvcKey,
    SvcValue,
)

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)

Row = tuple[int, ...]  # a struct's fields in declaration order

_CODES: dict[Any, str] = {
    ctypes.c_uint8: "B",
    ctypes.c_uint16: "H",
    ctypes.c_uint32: "I",
    ctypes.c_uint64: "Q",
}


def _code(t: Any) -> str:
    """struct module code of a ctypes integer type, or of an array of them (one int each)."""
    if issubclass(t, ctypes.Array):
        return str(_CODES[t._type_] * t._length_)
    return _CODES[t]


def struct_format(t: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct reading t's fields as plain ints, arrays flattened (t has no implicit
    padding)."""
    fmt = struct.Struct("=" + "".join(_code(f[1]) for f in t._fields_))
    if fmt.size != ctypes.sizeof(t):
        raise TypeError(f"{t.__name__} has padding the format does not describe")
    return fmt


class MapLike(Protocol[K, V]):
    """What the control plane needs of a map; BpfMap for the kernel, a dict-backed fake in tests."""

    key_type: type[K]
    value_type: type[V]

    def lookup(self, key: K) -> V | None: ...

    def update(self, key: K, value: V) -> None: ...

    def delete(self, key: K) -> bool: ...

    def items(self) -> list[tuple[K, V]]: ...

    def rows(self) -> list[tuple[Row, Row]]: ...


class BpfMap(Generic[K, V]):
    """A BPF map opened by fd, keyed and valued by ctypes structs of the map's sizes."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], name: str = "") -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        info = _libbpf.map_info(fd)
        for what, size, t in (
            ("key", info.key_size, key_type),
            ("value", info.value_size, value_type),
        ):
            if size != ctypes.sizeof(t):
                raise ValueError(f"map {name}: {what} is {size} bytes, {t.__name__} is not")
        self.map_type = info.type

    @classmethod
    def open_pinned(
        cls, path: str | os.PathLike[str], key_type: type[K], value_type: type[V]
    ) -> BpfMap[K, V]:
        fd = _libbpf.obj_get(os.fspath(path))
        try:
            return cls(fd, key_type, value_type, Path(path).name)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key: K) -> V | None:
        value = self.value_type()
        ret = _libbpf.lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if ret == -errno.ENOENT:
            return None
        _libbpf.check(ret, f"lookup in {self.name}")
        return value

    def update(self, key: K, value: V) -> None:
        ret = _libbpf.lib().bpf_map_update_elem(
            self.fd, ctypes.byref(key), ctypes.byref(value), _libbpf.BPF_ANY
        )
        _libbpf.check(ret, f"update of {self.name}")

    def delete(self, key: K) -> bool:
        """Delete key; False if it was not there."""
        ret = _libbpf.lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if ret == -errno.ENOENT:
            return False
        _libbpf.check(ret, f"delete from {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        """Every key (a map changing meanwhile may yield some twice or miss some)."""
        lib = _libbpf.lib()
        key: K | None = None
        while True:
            nxt = self.key_type()
            ret = lib.bpf_map_get_next_key(
                self.fd, None if key is None else ctypes.byref(key), ctypes.byref(nxt)
            )
            if ret == -errno.ENOENT:
                return
            _libbpf.check(ret, f"next key of {self.name}")
            yield nxt
            key = nxt

    def items(self) -> list[tuple[K, V]]:
        """Every entry as ctypes structs."""
        return [
            (self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v))
            for k, v in self.raw_items()
        ]

    def rows(self) -> list[tuple[Row, Row]]:
        """Every entry as tuples of field values: much faster than items() for big maps."""
        kf, vf = struct_format(self.key_type), struct_format(self.value_type)
        return [
            row
            for keys, values, n in self._raw_batches()
            for row in zip(kf.iter_unpack(keys), vf.iter_unpack(values), strict=True)
        ]

    BATCH = 4096

    def _raw_batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, count) per batch lookup (one syscall per BATCH entries); entry by
        entry where the kernel has no batch operations for the map."""
        ks, vs = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        lib = _libbpf.lib()
        tokens = [ctypes.create_string_buffer(max(ks, 8)) for _ in range(2)]  # hash: a bucket
        keys = ctypes.create_string_buffer(ks * self.BATCH)
        values = ctypes.create_string_buffer(vs * self.BATCH)
        first = True
        while True:
            count = ctypes.c_uint32(self.BATCH)
            ret = lib.bpf_map_lookup_batch(
                self.fd,
                None if first else tokens[0],
                tokens[1],
                keys,
                values,
                ctypes.byref(count),
                None,
            )
            if first and ret in (-errno.EINVAL, -errno.ENOTSUP, -errno.EOPNOTSUPP):
                yield from self._raw_one_by_one()
                return
            if ret < 0 and ret != -errno.ENOENT:
                _libbpf.check(ret, f"batch lookup in {self.name}")
            yield keys.raw[: count.value * ks], values.raw[: count.value * vs], count.value
            if ret == -errno.ENOENT:  # that was the last batch
                return
            tokens.reverse()
            first = False

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry as the bytes of its key and value."""
        ks, vs = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        for keys, values, n in self._raw_batches():
            yield from zip(_chunks(keys, ks, n), _chunks(values, vs, n), strict=True)

    def update_raw(self, key: bytes, value: bytes, flags: int = _libbpf.BPF_ANY) -> int:
        """Write one entry from bytes; 0, or the errno of a refusal (EEXIST, E2BIG: full)."""
        ret = _libbpf.lib().bpf_map_update_elem(
            self.fd, ctypes.c_char_p(key), ctypes.c_char_p(value), flags
        )
        if ret in (-errno.EEXIST, -errno.E2BIG, -errno.ENOMEM):
            return int(-ret)
        _libbpf.check(ret, f"update of {self.name}")
        return 0

    def _raw_one_by_one(self) -> Iterator[tuple[bytes, bytes, int]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted since
                yield bytes(key), bytes(value), 1

    def clear(self) -> int:
        """Delete every entry (zero every element of an array); returns how many."""
        if self.map_type == _libbpf.BPF_MAP_TYPE_ARRAY:  # u32 keys 0..max_entries-1
            n = _libbpf.map_info(self.fd).max_entries
            zeros = bytes(ctypes.sizeof(self.value_type) * n)
            _libbpf.map_update_batch(self.fd, struct.pack(f"={n}I", *range(n)), zeros, n)
            return n
        return sum(self.delete(k) for k in list(self.keys()))


def _chunks(buf: bytes, size: int, n: int) -> Iterator[bytes]:
    return (buf[i * size : (i + 1) * size] for i in range(n))


class PerCpuArray(Generic[V]):
    """A BPF_MAP_TYPE_PERCPU_ARRAY: one value per possible CPU per index."""

    def __init__(self, fd: int, value_type: type[V], name: str = "") -> None:
        self.fd = fd
        self.value_type = value_type
        self.name = name
        self._ncpus = _libbpf.possible_cpus()
        self._stride = (ctypes.sizeof(value_type) + 7) & ~7  # the kernel rounds to 8

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str], value_type: type[V]) -> PerCpuArray[V]:
        return cls(_libbpf.obj_get(os.fspath(path)), value_type, Path(path).name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup_percpu(self, index: int) -> list[V]:
        buf = ctypes.create_string_buffer(self._stride * self._ncpus)
        key = U32(index)
        ret = _libbpf.lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        _libbpf.check(ret, f"lookup in {self.name}")
        return [
            self.value_type.from_buffer_copy(buf.raw, i * self._stride) for i in range(self._ncpus)
        ]

    def update_percpu(self, index: int, values: list[V]) -> None:
        """Write every CPU's value of index (one per possible CPU)."""
        buf = ctypes.create_string_buffer(self._stride * self._ncpus)
        for i, v in enumerate(values):
            ctypes.memmove(ctypes.addressof(buf) + i * self._stride, ctypes.byref(v), len(bytes(v)))
        key = U32(index)
        ret = _libbpf.lib().bpf_map_update_elem(self.fd, ctypes.byref(key), buf, _libbpf.BPF_ANY)
        _libbpf.check(ret, f"update of {self.name}")

    def reset(self, index: int) -> None:
        buf = ctypes.create_string_buffer(self._stride * self._ncpus)
        key = U32(index)
        ret = _libbpf.lib().bpf_map_update_elem(self.fd, ctypes.byref(key), buf, _libbpf.BPF_ANY)
        _libbpf.check(ret, f"reset of {self.name}")


@dataclass(frozen=True)
class MapSpec:
    """One map of bpf/lb_maps.h: its pin name, BPF map type and key/value types."""

    name: str
    map_type: int
    key_type: type[ctypes.Structure]
    value_type: type[ctypes.Structure]

    @property
    def socket_storage(self) -> bool:
        """Per-socket storage: the kernel keeps one value in each socket, which userspace can
        neither list nor copy (LbMaps leaves it out, a migration hands the map over)."""
        return self.map_type == _libbpf.BPF_MAP_TYPE_SK_STORAGE


MapTypes = dict[str, tuple[type[ctypes.Structure], type[ctypes.Structure]]]

# Must match bpf/lb_maps.h. max_entries comes from the DatapathConfig.
MAP_SPECS = (
    MapSpec("services", _libbpf.BPF_MAP_TYPE_HASH, SvcKey, SvcValue),
    MapSpec("backends", _libbpf.BPF_MAP_TYPE_HASH, U32, BackendValue),
    MapSpec("service_backends", _libbpf.BPF_MAP_TYPE_HASH, SlotKey, U32),
    MapSpec("service_members", _libbpf.BPF_MAP_TYPE_HASH, MemberKey, U32),
    MapSpec("conntrack", _libbpf.BPF_MAP_TYPE_LRU_HASH, CtKey, CtValue),
    MapSpec("affinity", _libbpf.BPF_MAP_TYPE_LRU_HASH, AffinityKey, AffinityValue),
    MapSpec("counters", _libbpf.BPF_MAP_TYPE_PERCPU_ARRAY, U32, Counters),
    MapSpec("id_state", _libbpf.BPF_MAP_TYPE_ARRAY, U32, IdState),
    MapSpec("node_config", _libbpf.BPF_MAP_TYPE_ARRAY, U32, NodeConfig),
    MapSpec("sock_revnat", _libbpf.BPF_MAP_TYPE_LRU_HASH, SockKey, SockValue),
    MapSpec("sock_peer", _libbpf.BPF_MAP_TYPE_SK_STORAGE, U32, SockPeer),
    MapSpec("addr_filter", _libbpf.BPF_MAP_TYPE_ARRAY, U32, U64),
    MapSpec("reply_filter", _libbpf.BPF_MAP_TYPE_ARRAY, U32, U64),
)


@dataclass
class LbMaps:
    """The maps of one datapath instance that userspace reads and writes (all but the
    socket storage, see MapSpec.socket_storage)."""

    services: MapLike[SvcKey, SvcValue]
    backends: MapLike[U32, BackendValue]
    service_backends: MapLike[SlotKey, U32]
    service_members: MapLike[MemberKey, U32]
    conntrack: MapLike[CtKey, CtValue]
    affinity: MapLike[AffinityKey, AffinityValue]
    id_state: MapLike[U32, IdState]
    node_config: MapLike[U32, NodeConfig]
    sock_revnat: MapLike[SockKey, SockValue]
    counters: PerCpuArray[Counters] | None = None
    addr_filter: MapLike[U32, U64] | None = None  # None: the programmer keeps no filter
    reply_filter: MapLike[U32, U64] | None = None  # None: the GC rebuilds no reply filter

    @classmethod
    def open(cls, pin_dir: str | os.PathLike[str], types: MapTypes | None = None) -> LbMaps:
        """Open the maps pinned under pin_dir (no compiler needed). types: key and value types
        by map name where they are not the MAP_SPECS ones (maps of another layout, whose
        fields the code reads by name)."""
        d = Path(pin_dir)
        types = types or {}
        opened: list[BpfMap[ctypes.Structure, ctypes.Structure] | PerCpuArray[Any]] = []
        try:
            maps: dict[str, BpfMap[ctypes.Structure, ctypes.Structure]] = {}
            for spec in MAP_SPECS:
                if spec.name == "counters" or spec.socket_storage:
                    continue
                key_type, value_type = types.get(spec.name, (spec.key_type, spec.value_type))
                m: BpfMap[ctypes.Structure, ctypes.Structure] = BpfMap.open_pinned(
                    d / spec.name, key_type, value_type
                )
                opened.append(m)
                maps[spec.name] = m
            counter_type = types.get("counters", (U32, Counters))[1]
            counters: PerCpuArray[Any] = PerCpuArray.open_pinned(d / "counters", counter_type)
            opened.append(counters)
        except BaseException:
            for o in opened:
                o.close()
            raise
        return cls(counters=counters, **maps)  # type: ignore[arg-type]

    def _all(self) -> list[object]:
        return [
            self.services,
            self.backends,
            self.service_backends,
            self.service_members,
            self.conntrack,
            self.affinity,
            self.id_state,
            self.node_config,
            self.sock_revnat,
            self.addr_filter,
            self.reply_filter,
            self.counters,
        ]

    def close(self) -> None:
        for m in self._all():
            if isinstance(m, BpfMap | PerCpuArray):
                m.close()

    def clear(self) -> None:
        """Empty every map and zero the counters (tests)."""
        for m in self._all():
            if isinstance(m, BpfMap):
                m.clear()
        if self.counters is not None:
            self.counters.reset(0)

    def counter_totals(self) -> dict[str, int]:
        """The counters summed over CPUs, by field name."""
        if self.counters is None:
            return dict.fromkeys(COUNTER_FIELDS, 0)
        per_cpu = self.counters.lookup_percpu(0)
        return {f: sum(getattr(c, f, 0) for c in per_cpu) for f in COUNTER_FIELDS}


__all__ = ["BpfError", "BpfMap", "LbMaps", "MAP_SPECS", "MapLike", "MapSpec", "PerCpuArray"]
