"""Writes the desired frontends into the datapath's maps by mark-and-sweep, with stable ids."""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from socket import ntohs
from typing import TYPE_CHECKING, Any, TypeVar

from ebpflb.datapath import _libbpf
from ebpflb.datapath.maps import BpfMap, LbMaps, MapLike, Row, struct_format
from ebpflb.datapath.structs import (
    BE_F_LOCAL,
    PROTOCOL_NAMES,
    PROTOCOLS,
    SVC_F_AFFINITY,
    SVC_F_NODEPORT,
    U32,
    IdState,
    be32_to_ip,
    ip_to_be32,
    port_to_be16,
)

if TYPE_CHECKING:
    from ebpflb.datapath.loader import Datapath

log = logging.getLogger(__name__)

MAX_ID = 2**32 - 1
MAX_BACKENDS_PER_FRONTEND = 2**16 - 1  # lb_svc_value.count is a __u16


@lru_cache(maxsize=1 << 16)
def _ip_int(ip: str) -> int | None:
    """The address as an integer, None if ip is not IPv4 (cached: the agent builds the same
    few thousand pod addresses into Backends again on every change of their Services)."""
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


def _ipv4(ip: str, what: str) -> int:
    value = _ip_int(ip)
    if value is None:
        raise ValueError(f"{what} {ip!r} is not an IPv4 address")
    return value


def _port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{what} {port} is not a port (1-65535)")


SvcK = tuple[int, int, int]  # a services map key: (vip, port in host order, proto)


@dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint behind a frontend: pod IP and target port.

    local: the pod runs on this node. Only NodePort frontends look at it: on an
    external interface a remote backend gets the client SNATed to the node (so
    that replies come back through it), a local one sees the client's address.
    A local and a non-local Backend of one endpoint are two map entries.
    """

    ip: str
    port: int
    local: bool = False
    # Worked out once: one Backend stands for its endpoint in every frontend that names
    # it, and at 10,000 Services each is sorted and written thousands of times.
    _sort_key: tuple[int, int, bool] = field(init=False, repr=False, compare=False)
    be32: int = field(init=False, repr=False, compare=False)  # the address as the maps hold it

    def __post_init__(self) -> None:
        _port(self.port, "backend port")
        key = (_ipv4(self.ip, "backend address"), self.port, self.local)
        object.__setattr__(self, "_sort_key", key)
        object.__setattr__(self, "be32", _be32(self.ip))

    def sort_key(self) -> tuple[int, int, bool]:
        return self._sort_key

    @property
    def flags(self) -> int:
        """LB_BE_F_* of struct lb_backend_value."""
        return BE_F_LOCAL if self.local else 0


@dataclass(frozen=True, slots=True)
class Frontend:
    """A VIP:port/protocol and its backends. Backends are kept sorted and without duplicates
    (their order means nothing: slots are assigned by the Programmer).

    nodeport: a NodePort frontend (vip is one of the node's addresses, port the nodePort). It
    is balanced on the node's external interfaces too (attach_external), and from pods like
    any other; without the flag those interfaces leave the address alone.
    """

    vip: str
    port: int
    protocol: str  # "TCP" or "UDP"
    backends: tuple[Backend, ...] = ()
    affinity_timeout: int = 0  # sessionAffinity ClientIP timeout in seconds; 0 = no affinity
    nodeport: bool = False
    # The services map's key in the Programmer's image (worked out once; the image's
    # dicts and the owners' lists share this one tuple).
    map_key: SvcK = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _ipv4(self.vip, "frontend address")
        _port(self.port, "frontend port")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {sorted(PROTOCOLS)}")
        object.__setattr__(self, "map_key", (_be32(self.vip), self.port, PROTOCOLS[self.protocol]))
        if not 0 <= self.affinity_timeout <= MAX_ID:
            raise ValueError(f"affinity_timeout {self.affinity_timeout} out of range")
        unique = tuple(sorted(set(self.backends), key=Backend.sort_key))
        if len(unique) > MAX_BACKENDS_PER_FRONTEND:
            raise ValueError(f"{len(unique)} backends, at most {MAX_BACKENDS_PER_FRONTEND}")
        object.__setattr__(self, "backends", unique)

    def sort_key(self) -> tuple[int, int, str]:
        return _ipv4(self.vip, "frontend address"), self.port, self.protocol

    @property
    def flags(self) -> int:
        """LB_SVC_F_* of struct lb_svc_value."""
        return (SVC_F_AFFINITY if self.affinity_timeout else 0) | (
            SVC_F_NODEPORT if self.nodeport else 0
        )


@dataclass(frozen=True)
class SyncStats:
    """Map entries one sync() wrote (created or changed) and deleted."""

    backends_written: int = 0
    members_written: int = 0
    slots_written: int = 0
    services_written: int = 0
    generations_written: int = 0  # services rewritten with a new gen: a backend left them
    services_deleted: int = 0
    slots_deleted: int = 0
    members_deleted: int = 0
    backends_deleted: int = 0

    @property
    def written(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name.endswith("_written"))

    @property
    def deleted(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name.endswith("_deleted"))


# The Programmer's image of the maps, in plain tuples (ports in host order,
# addresses as lb_structs.h stores them; services keyed by SvcK, above):
SvcV = tuple[int, int, int, int, int]  # (svc_id, count, flags, affinity_timeout, gen)
Endpoint = tuple[int, int, int, int]  # (addr, port, proto, flags)
BeV = tuple[int, int, int, int]  # (addr, port, proto, flags)
# (svc_id, slot) or (svc_id, backend_id) as one int, pair(svc_id, x): at 100,000 entries per
# map a tuple key (and its own int objects) would cost a few MB more.
Pair = int
# Who a frontend belongs to (the agent: its Service's key); update() replaces what one owner has.
Owner = Hashable
Owned = Mapping[Any, Iterable[Frontend]]  # owner -> its frontends

K = TypeVar("K")
V = TypeVar("V")


def pair(a: int, b: int) -> Pair:
    return a << 32 | b


def unpair(p: Pair) -> tuple[int, int]:
    return p >> 32, p & MAX_ID


@dataclass
class _State:
    services: dict[SvcK, SvcV]
    backends: dict[int, BeV]
    slots: dict[Pair, int]  # (svc_id, slot) -> backend_id
    members: dict[Pair, int]  # (svc_id, backend_id) -> slot


def assign_slots(old: list[int | None], wanted: list[int]) -> list[int]:
    """Slots for wanted backend ids: those already in a slot below len(wanted) stay there, the
    others fill the holes in order. Keeps the hash -> backend mapping of new flows stable."""
    n = len(wanted)
    if not old:  # a new service: nothing to keep
        return list(wanted)
    want = set(wanted)
    result: list[int | None] = [None] * n
    placed: set[int] = set()
    for slot in range(min(n, len(old))):
        bid = old[slot]
        if bid is not None and bid in want and bid not in placed:
            result[slot] = bid
            placed.add(bid)
    rest = iter(b for b in wanted if b not in placed)
    return [b if b is not None else next(rest) for b in result]


class Programmer:
    """Keeps the datapath maps equal to a desired list of frontends.

    Adopts what the maps hold (ids included) when created, so a restarted
    agent continues where the previous one stopped. Writes only entries whose
    value differs, deletes what is no longer wanted, in an order that keeps
    every intermediate state consistent for the datapath:
    backends -> service_members -> service_backends -> services (a grown
    service's slots exist before its count says so; a shrunk service's count
    drops before its slots go), then deletions: services -> slots -> members
    -> backends. Ids are handed out monotonically and the next ones are kept
    in the pinned id_state map, so an id a conntrack entry may still name is
    never given to something else.

    sync() compares everything (mark-and-sweep: at startup, after a failure, as a
    safety net); update() touches only the frontends of the owners it is given, in the
    same order, so one changed Service costs its own entries, not the whole table.
    Entries go to the kernel in batches (one syscall per map and step).
    """

    def __init__(self, datapath: Datapath | LbMaps) -> None:
        self._maps = datapath if isinstance(datapath, LbMaps) else datapath.maps
        self._owned: dict[Owner, list[SvcK]] = {}
        self._owner_of: dict[SvcK, Owner] = {}
        self._load()

    # -- reading the maps -------------------------------------------------

    def _load(self) -> None:
        m = self._maps
        # Rows are the structs' fields in order (see bpf/lb_structs.h).
        rows = m.services.rows()
        self._state = _State(
            services={
                (vip, ntohs(port), proto): (svc_id, count, flags, timeout, gen)
                for (vip, port, proto, _), (svc_id, count, flags, gen, timeout) in rows
            },
            backends={
                bid: (addr, ntohs(port), proto, flags)
                for (bid,), (addr, port, proto, flags) in m.backends.rows()
            },
            slots={pair(sid, slot): bid for (sid, slot), (bid,) in m.service_backends.rows()},
            members={pair(sid, bid): slot for (sid, bid), (slot,) in m.service_members.rows()},
        )
        self._reindex()
        s = self._state
        ids = m.id_state.lookup(U32(0)) or IdState()
        seen_svc = [v[0] for v in s.services.values()] + [p >> 32 for p in (*s.slots, *s.members)]
        seen_be = list(s.backends) + list(s.slots.values()) + [p & MAX_ID for p in s.members]
        self._next_svc = max([ids.next_svc_id, 1, *(i + 1 for i in seen_svc)])
        self._next_backend = max([ids.next_backend_id, 1, *(i + 1 for i in seen_be)])
        self._saved_ids = (ids.next_svc_id, ids.next_backend_id)
        self._dirty = False

    def _reindex(self) -> None:
        self._svc_ids = {k: v[0] for k, v in self._state.services.items()}
        self._backend_ids: dict[Endpoint, int] = {}
        for bid in sorted(self._state.backends):
            self._backend_ids.setdefault(self._state.backends[bid], bid)
        self._refs = Counter(p & MAX_ID for p in self._state.members)  # backend -> its members

    def reload(self) -> None:
        """Forget the image and read the maps again (after a failure, or to repair drift)."""
        self._load()

    # -- ids --------------------------------------------------------------

    def _alloc_svc(self) -> int:
        if self._next_svc > MAX_ID:
            raise RuntimeError("service ids exhausted")
        self._next_svc += 1
        return self._next_svc - 1

    def _alloc_backend(self) -> int:
        if self._next_backend > MAX_ID:
            raise RuntimeError("backend ids exhausted")
        self._next_backend += 1
        return self._next_backend - 1

    def service_id(self, vip: str, port: int, protocol: str) -> int | None:
        return self._svc_ids.get((ip_to_be32(vip), port, PROTOCOLS[protocol]))

    def backend_id(self, ip: str, port: int, protocol: str, local: bool = False) -> int | None:
        flags = BE_F_LOCAL if local else 0
        return self._backend_ids.get((ip_to_be32(ip), port, PROTOCOLS[protocol], flags))

    # -- writing ----------------------------------------------------------

    def sync(self, frontends: Iterable[Frontend] | Owned, full: bool = False) -> SyncStats:
        """Make the maps hold exactly frontends (a plain list, or each owner's frontends:
        what update() later replaces owner by owner; a plain list has the owner None).

        full: reread the maps first instead of trusting this object's image of
        them (repairs any drift). A failed sync makes the next one full.
        """
        owned = frontends if isinstance(frontends, Mapping) else {None: frontends}
        if self._dirty or full:
            self._load()
        try:
            return self._sync({o: list(fes) for o, fes in owned.items()})
        except BaseException:
            self._dirty = True
            raise

    def update(self, changed: Owned) -> SyncStats:
        """Replace the frontends of the owners in changed (an empty list removes an
        owner's), leaving every other owner's entries unread and untouched. Needs a
        sync() first, and again after any failure (RuntimeError until then)."""
        if self._dirty:
            raise RuntimeError("the programmer's image of the maps is stale: sync() first")
        try:
            return self._update({o: list(fes) for o, fes in changed.items()})
        except BaseException:
            self._dirty = True
            raise

    def _desired(self, frontends: list[Frontend]) -> _State:
        want = _State(services={}, backends={}, slots={}, members={})
        for fe in frontends:
            proto = PROTOCOLS[fe.protocol]
            key = fe.map_key
            if key in want.services:
                raise ValueError(f"frontend {fe.vip}:{fe.port}/{fe.protocol} given twice")
            svc_id = self._svc_ids.get(key)
            if svc_id is None:
                svc_id = self._svc_ids[key] = self._alloc_svc()
            bids = []
            for b in fe.backends:
                ep = (b.be32, b.port, proto, b.flags)
                bid = self._backend_ids.get(ep)
                if bid is None:
                    bid = self._backend_ids[ep] = self._alloc_backend()
                want.backends[bid] = ep
                bids.append(bid)
            current = self._state.services.get(key)
            old_count = current[1] if current and current[0] == svc_id else 0
            base = pair(svc_id, 0)
            old = [self._state.slots.get(base | s) for s in range(old_count)]
            for slot, bid in enumerate(assign_slots(old, bids)):
                want.slots[base | slot] = bid
                want.members[base | bid] = slot
            gen = current[4] if current and current[0] == svc_id else 0
            want.services[key] = (svc_id, len(bids), fe.flags, fe.affinity_timeout, gen or 1)
        return want

    def _sync(self, owned: dict[Owner, list[Frontend]]) -> SyncStats:
        want = self._desired([fe for fes in owned.values() for fe in fes])
        m, have = self._maps, self._state
        stats: Counter[str] = Counter()
        self._save_ids()
        self._ensure_all(want, stats)
        _sweep(m.services, have.services, want.services, _svc_kv, "services", stats)
        _sweep(m.service_backends, have.slots, want.slots, _pair_kv, "slots", stats)
        left = _sweep(m.service_members, have.members, want.members, _pair_kv, "members", stats)
        self._raise_generations(left, want, stats)
        _sweep(m.backends, have.backends, want.backends, _backend_kv, "backends", stats)

        self._reindex()
        self._owned = {o: [fe.map_key for fe in fes] for o, fes in owned.items() if fes}
        self._owner_of = {k: o for o, keys in self._owned.items() for k in keys}
        result = SyncStats(**stats)
        log.debug("datapath sync: %s", result)
        return result

    def _update(self, changed: dict[Owner, list[Frontend]]) -> SyncStats:
        m, have = self._maps, self._state
        keys = {o: [fe.map_key for fe in fes] for o, fes in changed.items()}
        for o, ks in keys.items():
            for k in ks:
                other = self._owner_of.get(k, o)
                if other != o and other not in changed:
                    vip, port, proto = k
                    raise ValueError(
                        f"frontend {be32_to_ip(vip)}:{port}/{PROTOCOL_NAMES[proto]} of {o} "
                        f"is {other}'s"
                    )
        # What the changed owners hold now: only these entries can go.
        old_keys = [k for o in changed for k in self._owned.get(o, ())]
        old = [have.services[k] for k in old_keys if k in have.services]
        old_slots = [pair(v[0], s) for v in old for s in range(v[1])]
        old_members = [pair(p >> 32, have.slots[p]) for p in old_slots]

        want = self._desired([fe for fes in changed.values() for fe in fes])
        stats: Counter[str] = Counter()
        self._save_ids()
        new_members = [k for k in want.members if k not in have.members]
        self._ensure_all(want, stats)
        self._refs.update(p & MAX_ID for p in new_members)
        svcs = _sweep(
            m.services, have.services, want.services, _svc_kv, "services", stats, old_keys
        )
        for k in svcs:
            del self._svc_ids[k]
        _sweep(m.service_backends, have.slots, want.slots, _pair_kv, "slots", stats, old_slots)
        left = _sweep(
            m.service_members, have.members, want.members, _pair_kv, "members", stats, old_members
        )
        self._raise_generations(left, want, stats)
        self._refs.subtract(p & MAX_ID for p in left)
        unused = {p & MAX_ID for p in left if self._refs[p & MAX_ID] <= 0}
        for bid in unused:
            del self._refs[bid]
            ep = have.backends.get(bid)
            if ep is not None and self._backend_ids.get(ep) == bid:
                del self._backend_ids[ep]
        _sweep(m.backends, have.backends, want.backends, _backend_kv, "backends", stats, unused)

        for o in changed:
            for k in self._owned.pop(o, ()):
                if self._owner_of.get(k) == o:
                    del self._owner_of[k]
        for o, ks in keys.items():
            if ks:
                self._owned[o] = ks
                self._owner_of.update(dict.fromkeys(ks, o))
        result = SyncStats(**stats)
        log.debug("datapath update of %d owners: %s", len(changed), result)
        return result

    def _raise_generations(self, left: list[Pair], want: _State, stats: Counter[str]) -> None:
        """Backends have left these services (left: the memberships deleted): a new
        generation for each that remains, written only now, makes the datapath look their
        flows' memberships up again (lb_ct_member() in bpf/flow.h)."""
        ids = {p >> 32 for p in left}
        if not ids:
            return
        raised = {k: (*v[:4], v[4] % 0xFF + 1) for k, v in want.services.items() if v[0] in ids}
        want.services.update(raised)
        _ensure(self._maps.services, self._state.services, raised, _svc_kv, "generations", stats)

    def _save_ids(self) -> None:
        """The next ids into id_state, before any entry names a new one."""
        ids = (self._next_svc, self._next_backend)
        if ids != self._saved_ids:
            self._maps.id_state.update(U32(0), IdState(*ids))
            self._saved_ids = ids

    def _ensure_all(self, want: _State, stats: Counter[str]) -> None:
        """Write what want has and the maps do not, in the order that keeps them consistent."""
        m, have = self._maps, self._state
        _ensure(m.backends, have.backends, want.backends, _backend_kv, "backends", stats)
        _ensure(m.service_members, have.members, want.members, _pair_kv, "members", stats)
        _ensure(m.service_backends, have.slots, want.slots, _pair_kv, "slots", stats)
        _ensure(m.services, have.services, want.services, _svc_kv, "services", stats)

    # -- reading back -----------------------------------------------------

    def dump(self) -> list[Frontend]:
        """The frontends the maps hold now (read from the maps, not from this object's image)."""
        m = self._maps
        backends = {
            bid: Backend(be32_to_ip(addr), ntohs(port), local=bool(flags & BE_F_LOCAL))
            for (bid,), (addr, port, _, flags) in m.backends.rows()
        }
        slots = {key: bid for key, (bid,) in m.service_backends.rows()}
        out = []
        for (vip, port, proto, _), (svc_id, count, flags, _, timeout) in m.services.rows():
            found = []
            for s in range(count):
                bid = slots.get((svc_id, s))
                b = backends.get(bid) if bid is not None else None
                if b is None:
                    log.warning("service %d slot %d: no backend", svc_id, s)
                    continue
                found.append(b)
            out.append(
                Frontend(
                    vip=be32_to_ip(vip),
                    port=ntohs(port),
                    protocol=PROTOCOL_NAMES.get(proto, str(proto)),
                    backends=tuple(found),
                    affinity_timeout=timeout if flags & SVC_F_AFFINITY else 0,
                    nodeport=bool(flags & SVC_F_NODEPORT),
                )
            )
        return sorted(out, key=Frontend.sort_key)


_be32 = lru_cache(maxsize=1 << 16)(ip_to_be32)  # the same addresses, again and again


# -- conversions from the image's tuples to the maps' rows (the structs' fields in order) --


def _svc_kv(k: SvcK, v: SvcV | None) -> tuple[Row, Row | None]:
    key = (k[0], port_to_be16(k[1]), k[2], 0)
    return key, None if v is None else (v[0], v[1], v[2], v[4], v[3])


def _backend_kv(k: int, v: BeV | None) -> tuple[Row, Row | None]:
    return (k,), None if v is None else (v[0], port_to_be16(v[1]), v[2], v[3])


def _pair_kv(k: Pair, v: int | None) -> tuple[Row, Row | None]:
    """A slot or member entry: both keys are two u32s, both values one."""
    return unpair(k), None if v is None else (v,)


Convert = Callable[[K, V | None], tuple[Row, Row | None]]


def _ensure(
    bpf_map: MapLike[Any, Any],
    have: dict[K, V],
    want: dict[K, V],
    convert: Convert[K, V],
    name: str,
    stats: Counter[str],
) -> None:
    """Write every wanted entry whose value differs from what the map holds."""
    todo = [k for k, v in want.items() if have.get(k) != v]
    if not todo:
        return
    # Packed straight into one buffer per side: a bulk's 100,000 entries as rows and
    # bytes objects would raise the agent's peak memory by tens of MB.
    kf, vf = struct_format(bpf_map.key_type), struct_format(bpf_map.value_type)
    keys, values = bytearray(), bytearray()
    for k in todo:
        v = want[k]
        kr, vr = convert(k, v)
        assert vr is not None
        keys += kf.pack(*kr)
        values += vf.pack(*vr)
    batch = (bytes(keys), bytes(values), len(todo))
    if not _batched(bpf_map, lambda fd: _libbpf.map_update_batch(fd, *batch)):
        for kb, vb in zip(_split(keys, kf.size), _split(values, vf.size), strict=True):
            bpf_map.update(
                bpf_map.key_type.from_buffer_copy(kb), bpf_map.value_type.from_buffer_copy(vb)
            )
    for k in todo:
        have[k] = want[k]
    stats[f"{name}_written"] += len(todo)


def _sweep(
    bpf_map: MapLike[Any, Any],
    have: dict[K, V],
    want: dict[K, V],
    convert: Convert[K, V],
    name: str,
    stats: Counter[str],
    scope: Iterable[K] | None = None,
) -> list[K]:
    """Delete every entry that is not wanted (of scope only, when given: the keys that
    may have become unwanted); returns the keys deleted."""
    gone = list(dict.fromkeys(k for k in (have if scope is None else scope) if k not in want))
    gone = [k for k in gone if k in have]
    if not gone:
        return gone
    kf = struct_format(bpf_map.key_type)
    keys = bytearray()
    for k in gone:
        keys += kf.pack(*convert(k, None)[0])
    if not _batched(bpf_map, lambda fd: _libbpf.map_delete_batch(fd, bytes(keys), len(gone))):
        for kb in _split(keys, kf.size):
            bpf_map.delete(bpf_map.key_type.from_buffer_copy(kb))
    for k in gone:
        del have[k]
    stats[f"{name}_deleted"] += len(gone)
    return gone


def _split(packed: bytearray, size: int) -> Iterator[bytearray]:
    """The entries of a packed buffer, one by one."""
    return (packed[i : i + size] for i in range(0, len(packed), size))


def _batched(bpf_map: MapLike[Any, Any], call: Callable[[int], None]) -> bool:
    """Run a batch operation on a kernel map; False where it cannot (not a kernel map,
    or the batch failed: the caller then goes entry by entry, which also names the
    entry that fails). Updates and deletes are idempotent, so a half-done batch is
    simply done again."""
    if not isinstance(bpf_map, BpfMap):
        return False
    try:
        call(bpf_map.fd)
    except _libbpf.BpfError as e:
        log.debug("batch operation on %s failed (%s): entry by entry", bpf_map.name, e)
        return False
    return True
