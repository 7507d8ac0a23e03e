"""Writes the desired frontends into the datapath's maps by mark-and-sweep, with stable ids."""

from __future__ import annotations

import logging
import socket
import struct
from array import array
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import chain, repeat
from socket import ntohs
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ebpflb.datapath import _libbpf
from ebpflb.datapath.addrfilter import BACKEND, FRONTEND, AddrFilter
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
        # inet_pton takes what IPv4Address takes (four decimal parts of 0-255 without
        # leading zeros) in a tenth of the time: a bulk's 10,000 VIPs are each new.
        return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, ValueError, TypeError):
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
        # Equal sort keys are equal Backends (an address has one spelling): no __hash__ calls.
        by_key = {b._sort_key: b for b in self.backends}
        unique = tuple(by_key[k] for k in sorted(by_key))
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
# One service's entries of service_backends (slot -> backend_id) or of service_members
# (backend_id -> slot): the image keeps them by svc_id, as a service's entries are worked
# out, compared and written together (a bulk's 200,000 entries one by one took ~0.5 s).
Group = dict[int, int]
# Who a frontend belongs to (the agent: its Service's key); update() replaces what one owner has.
Owner = Hashable
Owned = Mapping[Any, Iterable[Frontend]]  # owner -> its frontends

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class _State:
    services: dict[SvcK, SvcV]
    backends: dict[int, BeV]
    slots: dict[int, Group]  # svc_id -> {slot: backend_id}
    members: dict[int, Group]  # svc_id -> {backend_id: slot}


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

    The address filter (addrfilter.py) follows the services' VIPs and the backends'
    addresses: bits are set before the first entry that needs them is written and cleared
    after the last is deleted. After a (re)load it is rebuilt from the maps first.
    """

    def __init__(self, datapath: Datapath | LbMaps) -> None:
        self._maps = datapath if isinstance(datapath, LbMaps) else datapath.maps
        self._owned: dict[Owner, list[SvcK]] = {}
        self._owner_of: dict[SvcK, Owner] = {}
        m = self._maps.addr_filter
        self._filter = AddrFilter(m) if m is not None else None
        self._map_gen_owed = False  # a failed batch's raise of the maps' gen is still to do
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
            slots=_grouped(m.service_backends.rows()),
            members=_grouped(m.service_members.rows()),
        )
        self._reindex()
        s = self._state
        ids = m.id_state.lookup(U32(0)) or IdState()
        seen_svc = [v[0] for v in s.services.values()] + [*s.slots, *s.members]
        seen_be = list(s.backends)
        for g in s.slots.values():
            seen_be += g.values()
        for g in s.members.values():
            seen_be += g.keys()
        self._next_svc = max([ids.next_svc_id, 1, *(i + 1 for i in seen_svc)])
        self._next_backend = max([ids.next_backend_id, 1, *(i + 1 for i in seen_be)])
        self._map_gen = ids.map_gen
        self._saved_ids = (ids.next_svc_id, ids.next_backend_id, ids.map_gen)
        self._dirty = False
        self._filter_stale = True  # rebuilt from this image before the next write

    def _reindex(self) -> None:
        self._svc_ids = {k: v[0] for k, v in self._state.services.items()}
        self._backend_ids: dict[Endpoint, int] = {}
        for bid in sorted(self._state.backends):
            self._backend_ids.setdefault(self._state.backends[bid], bid)
        self._refs: Counter[int] = Counter()  # backend -> its members
        for g in self._state.members.values():
            self._refs.update(g.keys())

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

    def _backend(self, ep: Endpoint) -> int:
        """The endpoint's backend id; a new one if it has none."""
        bid = self._backend_ids.get(ep)
        if bid is None:
            bid = self._backend_ids[ep] = self._alloc_backend()
        return bid

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
            stats = self._sync({o: list(fes) for o, fes in owned.items()})
        except BaseException:
            self._dirty = True
            self._raise_map_gen_after_failure()
            raise
        self._raise_map_gen(stats)
        return stats

    def update(self, changed: Owned) -> SyncStats:
        """Replace the frontends of the owners in changed (an empty list removes an
        owner's), leaving every other owner's entries unread and untouched. Needs a
        sync() first, and again after any failure (RuntimeError until then)."""
        if self._dirty:
            raise RuntimeError("the programmer's image of the maps is stale: sync() first")
        try:
            stats = self._update({o: list(fes) for o, fes in changed.items()})
        except BaseException:
            self._dirty = True
            self._raise_map_gen_after_failure()
            raise
        self._raise_map_gen(stats)
        return stats

    def _desired(self, frontends: list[Frontend]) -> _State:
        want = _State(services={}, backends={}, slots={}, members={})
        svc_ids, backend_ids = self._svc_ids, self._backend_ids
        have_services, have_slots = self._state.services, self._state.slots
        for fe in frontends:
            key = fe.map_key
            if key in want.services:
                raise ValueError(f"frontend {fe.vip}:{fe.port}/{fe.protocol} given twice")
            svc_id = svc_ids.get(key)
            if svc_id is None:
                svc_id = svc_ids[key] = self._alloc_svc()
            proto = key[2]
            eps = [(b.be32, b.port, proto, BE_F_LOCAL if b.local else 0) for b in fe.backends]
            found = [backend_ids.get(ep) for ep in eps]
            bids = cast(list[int], found) if None not in found else list(map(self._backend, eps))
            want.backends.update(zip(bids, eps, strict=True))
            current = have_services.get(key)
            old_count = current[1] if current and current[0] == svc_id else 0
            held = have_slots.get(svc_id, {})
            slots = assign_slots([held.get(s) for s in range(old_count)], bids)
            want.slots[svc_id] = dict(enumerate(slots))
            want.members[svc_id] = dict(zip(slots, range(len(slots)), strict=True))
            gen = current[4] if current and current[0] == svc_id else 0
            want.services[key] = (svc_id, len(slots), fe.flags, fe.affinity_timeout, gen or 1)
        return want

    def _sync(self, owned: dict[Owner, list[Frontend]]) -> SyncStats:
        want = self._desired([fe for fes in owned.values() for fe in fes])
        m, have = self._maps, self._state
        stats: Counter[str] = Counter()
        self._save_ids()
        self._filter_before(want)
        self._ensure_all(want, stats)
        svcs = _sweep(m.services, have.services, want.services, _SVC, "services", stats)
        _sweep_groups(m.service_backends, have.slots, want.slots, "slots", stats)
        left = _sweep_groups(m.service_members, have.members, want.members, "members", stats)
        self._raise_generations(left, want, stats)
        bes = _sweep(m.backends, have.backends, want.backends, _BACKEND, "backends", stats)
        self._filter_after(svcs, bes)

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
        old_ids = [have.services[k][0] for k in old_keys if k in have.services]

        want = self._desired([fe for fes in changed.values() for fe in fes])
        stats: Counter[str] = Counter()
        self._save_ids()
        new_members: list[int] = []  # the backends of member entries about to be written
        for sid, group in want.members.items():
            held = have.members.get(sid)
            new_members += group.keys() if not held else [b for b in group if b not in held]
        self._filter_before(want)
        self._ensure_all(want, stats)
        self._refs.update(new_members)
        svcs = _sweep(m.services, have.services, want.services, _SVC, "services", stats, old_keys)
        for k in svcs:
            del self._svc_ids[k]
        _sweep_groups(m.service_backends, have.slots, want.slots, "slots", stats, old_ids)
        left = _sweep_groups(
            m.service_members, have.members, want.members, "members", stats, old_ids
        )
        self._raise_generations(left, want, stats)
        self._refs.subtract(bid for _, bid in left)
        unused = {bid for _, bid in left if self._refs[bid] <= 0}
        for bid in unused:
            del self._refs[bid]
            ep = have.backends.get(bid)
            if ep is not None and self._backend_ids.get(ep) == bid:
                del self._backend_ids[ep]
        bes = _sweep(m.backends, have.backends, want.backends, _BACKEND, "backends", stats, unused)
        self._filter_after(svcs, bes)

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

    def _raise_generations(
        self, left: list[tuple[int, int]], want: _State, stats: Counter[str]
    ) -> None:
        """Backends have left these services (left: the memberships deleted): a new
        generation for each that remains, written only now, makes the datapath look their
        flows' memberships up again (lb_ct_member() in bpf/flow.h)."""
        ids = {sid for sid, _ in left}
        if not ids:
            return
        raised = {k: (*v[:4], v[4] % 0xFF + 1) for k, v in want.services.items() if v[0] in ids}
        want.services.update(raised)
        _ensure(self._maps.services, self._state.services, raised, _SVC, "generations", stats)

    def _filter_before(self, want: _State) -> None:
        """Set the filter's bits for the VIPs and backend addresses that want adds (rebuilt
        first from the image, if the image was just read)."""
        f, have = self._filter, self._state
        if f is None:
            return
        if self._filter_stale:
            f.rebuild((k[0] for k in have.services), (v[0] for v in have.backends.values()))
            self._filter_stale = False
        f.add(FRONTEND, [k[0] for k in want.services if k not in have.services])
        f.add(BACKEND, [v[0] for b, v in want.backends.items() if b not in have.backends])
        f.flush()

    def _filter_after(self, services: dict[SvcK, SvcV], backends: dict[int, BeV]) -> None:
        """Clear the bits that only these deleted entries needed."""
        if self._filter is None:
            return
        self._filter.remove(FRONTEND, [k[0] for k in services])
        self._filter.remove(BACKEND, [v[0] for v in backends.values()])
        self._filter.flush()

    def _save_ids(self) -> None:
        """The next ids into id_state, before any entry names a new one."""
        ids = (self._next_svc, self._next_backend, self._map_gen)
        if ids != self._saved_ids:
            self._maps.id_state.update(U32(0), IdState(*ids))
            self._saved_ids = ids

    def _raise_map_gen(self, stats: SyncStats | None) -> None:
        """After a batch that wrote or deleted anything (stats None: a failed one, which may
        have): a new generation of the maps, so that no forward conntrack entry vouches for
        its flow any more without a services lookup (lb_forward_known() in bpf/flow.h) until
        a packet has found it valid again. Raised on any change, not only those that can
        stop a flow (a service, membership or backend deleted or changed): simpler, and a
        known flow pays one lookup per change. A raise that could not be written is owed to
        the next batch, whatever it writes (a reload keeps the debt)."""
        if stats is None or stats.written or stats.deleted or self._map_gen_owed:
            self._map_gen_owed = True
            self._map_gen = self._map_gen % 0xFFFF_FFFF + 1  # 0 never vouches
            self._save_ids()
            self._map_gen_owed = False

    def _raise_map_gen_after_failure(self) -> None:
        """After a failed batch: raised now if id_state can still be written, else owed."""
        try:
            self._raise_map_gen(None)
        except Exception as e:  # the batch's own error is what the caller sees
            log.warning("could not raise the maps' generation after a failed write: %s", e)

    def _ensure_all(self, want: _State, stats: Counter[str]) -> None:
        """Write what want has and the maps do not, in the order that keeps them consistent."""
        m, have = self._maps, self._state
        _ensure(m.backends, have.backends, want.backends, _BACKEND, "backends", stats)
        _ensure_groups(m.service_members, have.members, want.members, "members", stats)
        _ensure_groups(m.service_backends, have.slots, want.slots, "slots", stats)
        _ensure(m.services, have.services, want.services, _SVC, "services", stats)

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


def _svc_key(k: SvcK) -> Row:
    return (k[0], port_to_be16(k[1]), k[2], 0)


def _svc_value(v: SvcV) -> Row:
    return (v[0], v[1], v[2], v[4], v[3])  # the struct's order: gen before affinity_timeout


def _backend_key(k: int) -> Row:
    return (k,)


def _backend_value(v: BeV) -> Row:
    return (v[0], port_to_be16(v[1]), v[2], v[3])


Codec = tuple[Callable[[K], Row], Callable[[V], Row]]  # an image entry's key and value rows
_SVC: Codec[SvcK, SvcV] = (_svc_key, _svc_value)
_BACKEND: Codec[int, BeV] = (_backend_key, _backend_value)


def _grouped(rows: Iterable[tuple[Row, Row]]) -> dict[int, Group]:
    """service_backends or service_members rows ((svc_id, x), (y,)) as {svc_id: {x: y}}."""
    out: dict[int, Group] = {}
    for (sid, x), (y,) in rows:
        out.setdefault(sid, {})[x] = y
    return out


def _packed(fmt: struct.Struct, rows: Iterable[Row]) -> bytes:
    """Rows packed back to back as fmt lays them out, taken one at a time (a bulk's
    200,000 entries as rows or bytes objects all at once would raise the agent's peak
    memory by tens of MB)."""
    if fmt.format == "=" + "I" * (fmt.size // 4) and array("I").itemsize == 4:
        return array("I", chain.from_iterable(rows)).tobytes()  # u32 fields only: at C speed
    out = bytearray()
    for row in rows:
        out += fmt.pack(*row)
    return bytes(out)


def _write(bpf_map: MapLike[Any, Any], keys: Iterable[Row], values: Iterable[Row], n: int) -> None:
    """Write n entries: in one batch, or one by one where that cannot be done."""
    kf, vf = struct_format(bpf_map.key_type), struct_format(bpf_map.value_type)
    kb, vb = _packed(kf, keys), _packed(vf, values)
    if not _batched(bpf_map, lambda fd: _libbpf.map_update_batch(fd, kb, vb, n)):
        for k, v in zip(_split(kb, kf.size), _split(vb, vf.size), strict=True):
            bpf_map.update(
                bpf_map.key_type.from_buffer_copy(k), bpf_map.value_type.from_buffer_copy(v)
            )


def _delete(bpf_map: MapLike[Any, Any], keys: Iterable[Row], n: int) -> None:
    """Delete n entries: in one batch, or one by one where that cannot be done."""
    kf = struct_format(bpf_map.key_type)
    kb = _packed(kf, keys)
    if not _batched(bpf_map, lambda fd: _libbpf.map_delete_batch(fd, kb, n)):
        for k in _split(kb, kf.size):
            bpf_map.delete(bpf_map.key_type.from_buffer_copy(k))


def _ensure(
    bpf_map: MapLike[Any, Any],
    have: dict[K, V],
    want: dict[K, V],
    codec: Codec[K, V],
    name: str,
    stats: Counter[str],
) -> None:
    """Write every wanted entry whose value differs from what the map holds."""
    todo = [k for k, v in want.items() if have.get(k) != v]
    if not todo:
        return
    key_row, value_row = codec
    _write(bpf_map, map(key_row, todo), (value_row(want[k]) for k in todo), len(todo))
    for k in todo:
        have[k] = want[k]
    stats[f"{name}_written"] += len(todo)


def _sweep(
    bpf_map: MapLike[Any, Any],
    have: dict[K, V],
    want: dict[K, V],
    codec: Codec[K, V],
    name: str,
    stats: Counter[str],
    scope: Iterable[K] | None = None,
) -> dict[K, V]:
    """Delete every entry that is not wanted (of scope only, when given: the keys that
    may have become unwanted); returns the entries deleted."""
    gone = list(dict.fromkeys(k for k in (have if scope is None else scope) if k not in want))
    gone = [k for k in gone if k in have]
    if not gone:
        return {}
    _delete(bpf_map, map(codec[0], gone), len(gone))
    deleted = {k: have.pop(k) for k in gone}
    stats[f"{name}_deleted"] += len(gone)
    return deleted


def _ensure_groups(
    bpf_map: MapLike[Any, Any],
    have: dict[int, Group],
    want: dict[int, Group],
    name: str,
    stats: Counter[str],
) -> None:
    """_ensure() of service_backends or service_members, service by service: keys are
    (svc_id, x), values one u32."""
    todo: list[tuple[int, Group]] = []  # (svc_id, its entries to write)
    for sid, group in want.items():
        held = have.get(sid)
        if held == group:
            continue
        writes = {x: y for x, y in group.items() if held.get(x) != y} if held else group
        if writes:
            todo.append((sid, writes))
    if not todo:
        return
    n = sum(len(w) for _, w in todo)
    keys = chain.from_iterable(zip(repeat(sid), w) for sid, w in todo)
    _write(bpf_map, keys, chain.from_iterable(zip(w.values()) for _, w in todo), n)
    for sid, writes in todo:
        held = have.get(sid)
        have[sid] = {**held, **writes} if held else writes
    stats[f"{name}_written"] += n


def _sweep_groups(
    bpf_map: MapLike[Any, Any],
    have: dict[int, Group],
    want: dict[int, Group],
    name: str,
    stats: Counter[str],
    scope: Iterable[int] | None = None,
) -> list[tuple[int, int]]:
    """_sweep() of service_backends or service_members, service by service (of the
    svc_ids in scope only, when given); returns every (svc_id, x) deleted."""
    todo: list[tuple[int, list[int], Group]] = []  # (svc_id, entries to delete, wanted)
    for sid in dict.fromkeys(have if scope is None else scope):
        held = have.get(sid)
        if held:
            wanted = want.get(sid, {})
            gone = [x for x in held if x not in wanted]
            if gone:
                todo.append((sid, gone, wanted))
    if not todo:
        return []
    n = sum(len(g) for _, g, _ in todo)
    _delete(bpf_map, chain.from_iterable(zip(repeat(sid), g) for sid, g, _ in todo), n)
    deleted: list[tuple[int, int]] = []
    for sid, gone, wanted in todo:
        left = {x: y for x, y in have[sid].items() if x in wanted}
        if left:
            have[sid] = left
        else:
            del have[sid]
        deleted += [(sid, x) for x in gone]
    stats[f"{name}_deleted"] += n
    return deleted


def _split(packed: bytes, size: int) -> Iterator[bytes]:
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
