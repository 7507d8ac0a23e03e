"""In-memory stand-ins for the datapath maps, so map programming can be tested without a kernel."""

from __future__ import annotations

import ctypes
from typing import Generic, TypeVar

from ebpflb.datapath.maps import LbMaps, Row, struct_format
from ebpflb.datapath.structs import (
    U32,
    U64,
    AffinityKey,
    AffinityValue,
    BackendValue,
    CtKey,
    CtValue,
    IdState,
    MemberKey,
    NodeConfig,
    SlotKey,
    SockKey,
    SockValue,
    SvcKey,
    SvcValue,
)

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


class DictMap(Generic[K, V]):
    """A hash map keyed by the key struct's bytes; counts updates and deletes."""

    def __init__(self, key_type: type[K], value_type: type[V], name: str = "") -> None:
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        self.data: dict[bytes, bytes] = {}
        self.updates = 0
        self.deletes = 0

    def lookup(self, key: K) -> V | None:
        raw = self.data.get(bytes(key))
        return None if raw is None else self.value_type.from_buffer_copy(raw)

    def update(self, key: K, value: V) -> None:
        self.updates += 1
        self.data[bytes(key)] = bytes(value)

    def delete(self, key: K) -> bool:
        self.deletes += 1
        return self.data.pop(bytes(key), None) is not None

    def items(self) -> list[tuple[K, V]]:
        return [
            (self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v))
            for k, v in self.data.items()
        ]

    def rows(self) -> list[tuple[Row, Row]]:
        kf, vf = struct_format(self.key_type), struct_format(self.value_type)
        return [(kf.unpack(k), vf.unpack(v)) for k, v in self.data.items()]


def fake_maps() -> LbMaps:
    """A full set of empty in-memory maps (no counters)."""
    return LbMaps(
        services=DictMap(SvcKey, SvcValue, "services"),
        backends=DictMap(U32, BackendValue, "backends"),
        service_backends=DictMap(SlotKey, U32, "service_backends"),
        service_members=DictMap(MemberKey, U32, "service_members"),
        conntrack=DictMap(CtKey, CtValue, "conntrack"),
        affinity=DictMap(AffinityKey, AffinityValue, "affinity"),
        id_state=DictMap(U32, IdState, "id_state"),
        node_config=DictMap(U32, NodeConfig, "node_config"),
        sock_revnat=DictMap(SockKey, SockValue, "sock_revnat"),
        addr_filter=DictMap(U32, U64, "addr_filter"),
        reply_filter=DictMap(U32, U64, "reply_filter"),
    )
