"""The registry's logic: validated, allocated, atomic writes over an indexed in-memory
state, persisted through a Store, with an ordered, resumable event stream."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Concatenate, ParamSpec, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from ebpflb import labels
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.heap import bulk_objects
from ebpflb.labels import go_quote
from ebpflb.objects import (
    DEFAULT_NAMESPACE,
    KINDS,
    SERVICE_NAME_LABEL,
    Key,
    int_or_string,
    key_of,
    kind_of,
    message_of,
)
from ebpflb.registry.alloc import AllocationError, IPRange, parse_port_range
from ebpflb.registry.endpoints import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PodEndpoint,
    SliceShape,
    named_slice,
    pod_endpoint,
    slice_shapes,
)
from ebpflb.registry.store import (
    ADDED,
    DELETED,
    MODIFIED,
    Event,
    SharedStore,
    Snapshot,
    Store,
    StoreConflict,
    StoreError,
    StoreGap,
)
from ebpflb.validation import apply_defaults, validate

BOOKMARK = pb.WatchEvent.BOOKMARK
# How often a write is tried again after other registries sharing the store wrote first.
CONFLICT_TRIES = 50
BULK_OBJECTS = 1000  # an Apply of this many objects is a bulk (see apply())

log = logging.getLogger("ebpflb.registry")


class Reason(Enum):
    """Why a request failed; the gRPC layer maps each to a status code."""

    INVALID = "Invalid"
    ALREADY_EXISTS = "AlreadyExists"
    NOT_FOUND = "NotFound"
    CONFLICT = "Conflict"
    GONE = "Gone"  # a resource version too old to resume from: relist
    UNAVAILABLE = "Unavailable"


class RegistryError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ApplyResult:
    objects: list[pb.Object]
    results: list[str]  # created | configured | unchanged
    wire: list[bytes]  # each object serialized as it was stored; b"" when unchanged


def resource_name(kind: str) -> str:
    """The plural Kubernetes uses in messages: services, pods, nodes, endpointslices."""
    return KINDS[kind].aliases[0] if kind in KINDS else kind.lower() + "s"


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(time.time()))
    return ts


def _spec_equal(stored: pb.Object, new: pb.Object) -> bool:
    """Equal but for the fields the registry sets on every write. new's are set to
    stored's for the comparison, then back (no copies; stored, which readers may
    hold, is not changed)."""
    s, n = message_of(stored).metadata, message_of(new).metadata
    version, generation = n.resource_version, n.generation
    n.resource_version, n.generation = s.resource_version, s.generation
    try:
        return stored == new
    finally:
        n.resource_version, n.generation = version, generation


def _what(obj: pb.Object) -> str:
    """An object as error messages name it: Service "web"."""
    return f"{kind_of(obj).name} {go_quote(message_of(obj).metadata.name)}"


def _uid() -> str:
    """A random (version 4) UUID as text: uuid.uuid4(), without its object."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class _Txn:
    undo: list[tuple[Key, pb.Object | None]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    start_revision: int = 0
    touched_services: set[Key] = field(default_factory=set)
    now: int = 0  # the creation time of what it creates (seconds)


Matcher = Callable[[Key, pb.Object], bool]
P = ParamSpec("P")
R = TypeVar("R")


class _Conflict(RegistryError):
    """A commit lost to another registry's write on a shared store."""


def _retried(
    write: Callable[Concatenate[Registry, P], R],
) -> Callable[Concatenate[Registry, P], R]:
    """Run a write again, on the state brought up to date, after it lost to another
    registry's: its validation and allocations are then made on what that one stored."""

    @functools.wraps(write)
    def retry(self: Registry, /, *args: P.args, **kwargs: P.kwargs) -> R:
        for _ in range(CONFLICT_TRIES):
            try:
                return write(self, *args, **kwargs)
            except _Conflict:
                self._catch_up()
        raise RegistryError(
            Reason.UNAVAILABLE,
            f"the store kept changing: {CONFLICT_TRIES} tries lost to other registries' "
            "writes; nothing was stored, try again",
        )

    return retry


# (event type, object, revision, the object serialized: b"" when not at hand)
WatchItem = tuple[int, pb.Object | None, int, bytes]
WatchBatch = list[WatchItem]


class Registry:
    """Desired state. All reads and writes hold one lock, so every reader sees whole
    transactions; a write is in the store before anyone can see it."""

    def __init__(
        self,
        store: Store,
        service_cidr: str = "10.96.0.0/12",
        node_port_range: str = "30000-32767",
        history: int = 100_000,
    ) -> None:
        self.store = store
        self.service_range = IPRange(service_cidr)
        self.node_port_range = parse_port_range(node_port_range)
        self.node_port_range_text = node_port_range
        self.history = history
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._objects: dict[Key, pb.Object] = {}
        self._by_kind: dict[str, dict[Key, pb.Object]] = {k: {} for k in KINDS}
        # (namespace, label key, label value) -> pods / services whose selector has it
        self._pod_labels: dict[tuple[str, str, str], set[Key]] = {}
        self._svc_selectors: dict[tuple[str, str, str], set[Key]] = {}
        self._slices_of: dict[tuple[str, str], set[Key]] = {}  # (ns, service) -> slices
        self._cluster_ips: dict[str, Key] = {}
        self._node_ports: dict[int, Key] = {}  # nodePorts and healthCheckNodePorts
        self._terminating: set[Key] = set()
        # The event log: _events[i] has revision _first_rev + i (one event per revision).
        self._events: list[Event] = []
        self._first_rev = 1
        self._revision = 0
        self._closed = False
        self._load()
        self._reaper = threading.Thread(target=self._reap_loop, name="pod-reaper", daemon=True)
        self._reaper.start()
        self._shared = store if isinstance(store, SharedStore) else None
        self._follower: threading.Thread | None = None
        if self._shared is not None:
            self._follower = threading.Thread(
                target=self._follow_loop, args=(self._shared,), name="follow-store", daemon=True
            )
            self._follower.start()

    # ------------------------------------------------------------ state

    def _load(self, snap: Snapshot | None = None) -> None:
        snap = snap or self.store.load()
        for obj, _rev in snap.objects:
            self._index(key_of(obj), obj, add=True)
        self._revision = snap.revision
        self._events = list(snap.events[-self.history :])
        self._first_rev = self._events[0].rev if self._events else self._revision + 1

    def _index(self, key: Key, obj: pb.Object, add: bool) -> None:
        """Add obj to (or remove it from) every index."""
        if add:
            self._objects[key] = obj
            self._by_kind[key.kind][key] = obj
        else:
            self._objects.pop(key, None)
            self._by_kind[key.kind].pop(key, None)

        if key.kind == "Pod":
            _mark(self._pod_labels, key, obj.pod.metadata.labels.items(), add)
            if obj.pod.metadata.HasField("deletion_timestamp"):
                (self._terminating.add if add else self._terminating.discard)(key)
        elif key.kind == "Service":
            spec = obj.service.spec
            _mark(self._svc_selectors, key, spec.selector.items(), add)
            ports = [p.node_port for p in spec.ports if p.node_port]
            if spec.health_check_node_port:
                ports.append(spec.health_check_node_port)
            for ip in {spec.cluster_ip, *spec.cluster_ips} - {"", "None"}:
                if add:
                    self._cluster_ips[ip] = key
                elif self._cluster_ips.get(ip) == key:
                    del self._cluster_ips[ip]
            for port in ports:
                if add:
                    self._node_ports[port] = key
                elif self._node_ports.get(port) == key:
                    del self._node_ports[port]
        elif key.kind == "EndpointSlice":
            svc = obj.endpoint_slice.metadata.labels.get(SERVICE_NAME_LABEL)
            if svc:
                t2 = (key.namespace, svc)
                if add:
                    self._slices_of.setdefault(t2, set()).add(key)
                else:
                    s2 = self._slices_of.get(t2)
                    if s2 is not None:
                        s2.discard(key)
                        if not s2:
                            del self._slices_of[t2]

    def _put(self, txn: _Txn, key: Key, obj: pb.Object | None) -> pb.Object | None:
        """Write (or, with None, delete) one object inside txn; returns what it stored."""
        old = self._objects.get(key)
        txn.undo.append((key, old))
        if old is not None:
            self._index(key, old, add=False)
        self._revision += 1
        rev = self._revision
        if obj is None:
            assert old is not None
            txn.events.append(Event(rev, DELETED, key, old, old.SerializeToString()))
            self._touch(txn, key, old)
            return None
        message_of(obj).metadata.resource_version = str(rev)
        self._index(key, obj, add=True)
        typ = ADDED if old is None else MODIFIED
        txn.events.append(Event(rev, typ, key, obj, obj.SerializeToString()))
        self._touch(txn, key, old)
        self._touch(txn, key, obj)
        return obj

    def _touch(self, txn: _Txn, key: Key, obj: pb.Object | None) -> None:
        """Note the Services whose endpoints a change of obj may change."""
        if obj is None:
            return
        if key.kind == "Service":
            txn.touched_services.add(key)
        elif key.kind == "Pod":
            txn.touched_services.update(
                self._services_selecting(key.namespace, obj.pod.metadata.labels)
            )

    def _services_selecting(self, namespace: str, pod_labels: Mapping[str, str]) -> set[Key]:
        lbls = dict(pod_labels)
        out: set[Key] = set()
        candidates: set[Key] = set()
        for k, v in lbls.items():
            candidates |= self._svc_selectors.get((namespace, k, v), set())
        for skey in candidates:
            sel = self._objects[skey].service.spec.selector
            if labels.matches_map(sel, lbls):
                out.add(skey)
        return out

    def _pods_selected(self, namespace: str, selector: dict[str, str]) -> list[pb.Pod]:
        if not selector:
            return []
        sets = [self._pod_labels.get((namespace, k, v), set()) for k, v in selector.items()]
        sets.sort(key=len)
        keys = set(sets[0]).intersection(*sets[1:])
        return [self._objects[k].pod for k in keys]

    def _begin(self) -> _Txn:
        return _Txn(start_revision=self._revision, now=int(time.time()))

    def _rollback(self, txn: _Txn) -> None:
        for key, old in reversed(txn.undo):
            cur = self._objects.get(key)
            if cur is not None:
                self._index(key, cur, add=False)
            if old is not None:
                self._index(key, old, add=True)
        self._revision = txn.start_revision

    def _commit(self, txn: _Txn) -> None:
        self._sync_endpoints(txn)
        try:
            self.store.commit(txn.events)
        except StoreConflict as e:
            self._rollback(txn)
            raise _Conflict(Reason.CONFLICT, str(e)) from e
        except StoreError as e:
            self._rollback(txn)
            raise RegistryError(Reason.UNAVAILABLE, str(e)) from e
        self._publish(txn.events)

    def _publish(self, events: list[Event]) -> None:
        """Append committed events to the log and wake the watchers."""
        if not self._events and events:
            self._first_rev = events[0].rev
        self._events.extend(events)
        if len(self._events) > self.history * 2:
            del self._events[: len(self._events) - self.history]
            self._first_rev = self._events[0].rev
        self._cond.notify_all()

    # ------------------------------------------------------------ a shared store

    def _take_remote(self, events: list[Event]) -> None:
        """Apply events other registries committed, as if they were this one's own."""
        fresh = [ev for ev in events if ev.rev > self._revision]
        for ev in fresh:
            if ev.rev != self._revision + 1:
                raise StoreGap(f"event {ev.rev} follows revision {self._revision}")
            old = self._objects.get(ev.key)
            if old is not None:
                self._index(ev.key, old, add=False)
            if ev.type != DELETED:
                self._index(ev.key, ev.obj, add=True)
            self._revision = ev.rev
        self._publish(fresh)

    def _catch_up(self) -> None:
        """Take in what other registries committed since this one's revision."""
        assert self._shared is not None
        with self._lock:
            try:
                self._take_remote(self._shared.events_after(self._revision))
            except StoreGap as e:
                self._reload(e)
            except StoreError as e:
                raise RegistryError(Reason.UNAVAILABLE, str(e)) from e

    def _reload(self, why: StoreGap) -> None:
        """Start over from the store's state: this registry fell behind its compacted
        history. Watchers from before the gap get GONE and relist."""
        log.warning("%s: reloading the whole state from the store", why)
        snap = self.store.load()  # before anything is cleared: it may fail
        indexes: list[dict[Any, Any] | set[Key]] = [
            self._objects,
            *self._by_kind.values(),
            self._pod_labels,
            self._svc_selectors,
            self._slices_of,
            self._cluster_ips,
            self._node_ports,
            self._terminating,
        ]
        for index in indexes:
            index.clear()
        self._load(snap)
        self._cond.notify_all()

    def _follow_loop(self, store: SharedStore) -> None:
        """Takes in other registries' writes as they land, so that this registry's
        watchers see them within milliseconds, not only at its next conflict."""
        while not self._closed:
            try:
                try:
                    events = store.wait_events(self.revision, timeout=1.0)
                    with self._lock:
                        if events and not self._closed:
                            self._take_remote(events)
                except StoreGap as e:
                    with self._lock:
                        self._reload(e)
            except StoreError as e:
                log.warning("following the store: %s", e)
                time.sleep(0.5)

    # ------------------------------------------------------------ endpoints controller

    def _sync_endpoints(self, txn: _Txn) -> None:
        """Recompute the managed EndpointSlices of every Service the transaction touched;
        write only those that changed."""
        # Writing slices touches no Service, so the set is complete here; nor a Pod, so
        # each Pod's endpoint is built once for all the Services that select it, and
        # the slices' shapes once for all the Services with the same ports and selector.
        endpoints: dict[int, tuple[pb.Pod, PodEndpoint | None]] = {}  # by id(); holds the pod
        shapes: dict[tuple[object, ...], list[SliceShape]] = {}

        def endpoint(pod: pb.Pod) -> PodEndpoint | None:
            hit = endpoints.get(id(pod))
            if hit is None:
                hit = endpoints[id(pod)] = (pod, pod_endpoint(pod))
            return hit[1]

        for skey in sorted(txn.touched_services):
            svc_obj = self._objects.get(skey)
            desired: list[tuple[Key, pb.Object]] = []
            if svc_obj is not None:
                svc = svc_obj.service
                spec = svc.spec
                sel = spec.selector  # read by key: its items() view runs in Python
                selector = tuple(sorted((k, sel[k]) for k in sel))
                ports = tuple(
                    (p.name, p.protocol, p.port, int_or_string(p.target_port)) for p in spec.ports
                )
                shape = shapes.get((skey.namespace, selector, ports))
                if shape is None:
                    pods = self._pods_selected(skey.namespace, dict(selector))
                    shape = slice_shapes(svc, pods, endpoint)
                    shapes[skey.namespace, selector, ports] = shape
                for sh in shape:
                    new = pb.Object()
                    es = named_slice(svc, sh, new.endpoint_slice)
                    desired.append((Key("EndpointSlice", skey.namespace, es.metadata.name), new))
            existing = {
                k: self._objects[k]
                for k in self._slices_of.get((skey.namespace, skey.name), ())
                if self._objects[k].endpoint_slice.metadata.labels.get(MANAGED_BY_LABEL)
                == MANAGED_BY
            }
            for k, new in desired:
                old = existing.pop(k, None)
                if old is not None:
                    self._carry_meta(old, new)
                    if _spec_equal(old, new):
                        continue
                else:
                    self._new_meta(txn, new)
                self._put(txn, k, new)
            for k in existing:
                self._put(txn, k, None)

    # ------------------------------------------------------------ writes

    @staticmethod
    def _new_meta(txn: _Txn, obj: pb.Object) -> None:
        meta = message_of(obj).metadata
        meta.uid = _uid()
        meta.creation_timestamp.seconds = txn.now
        meta.generation = 1

    @staticmethod
    def _carry_meta(old: pb.Object, new: pb.Object) -> None:
        """Fields the registry owns survive an update as they were."""
        o, n = message_of(old).metadata, message_of(new).metadata
        n.uid = o.uid
        n.creation_timestamp.CopyFrom(o.creation_timestamp)
        n.generation = o.generation
        n.ClearField("deletion_timestamp")
        if o.HasField("deletion_timestamp"):
            n.deletion_timestamp.CopyFrom(o.deletion_timestamp)
            n.deletion_grace_period_seconds = o.deletion_grace_period_seconds
        elif n.HasField("deletion_grace_period_seconds"):
            n.ClearField("deletion_grace_period_seconds")

    @_retried
    def apply(self, objects: list[pb.Object], dry_run: bool = False) -> ApplyResult:
        """Create or update every object, atomically: all are stored or none."""
        # What a bulk stores lives as long as the registry.
        with self._lock, bulk_objects(len(objects) >= BULK_OBJECTS):
            return self._apply(objects, dry_run)

    def _apply(self, objects: list[pb.Object], dry_run: bool) -> ApplyResult:
        self._check_open()
        txn = self._begin()
        out: list[pb.Object] = []
        results: list[str] = []
        wire: list[bytes] = []
        try:
            for obj in objects:
                before = len(txn.events)
                stored, result = self._apply_one(txn, obj)
                out.append(stored)
                results.append(result)
                # Its bytes are those of the event it made, if it made one.
                wire.append(txn.events[-1].data if len(txn.events) > before else b"")
            if dry_run:
                self._sync_endpoints(txn)
                self._rollback(txn)
            else:
                self._commit(txn)
        except RegistryError:
            self._rollback(txn)
            raise
        except Exception:
            self._rollback(txn)
            raise
        return ApplyResult(out, results, wire)

    def _apply_one(self, txn: _Txn, given: pb.Object) -> tuple[pb.Object, str]:
        if given.WhichOneof("kind") is None:
            raise RegistryError(Reason.INVALID, "object: Required value: no kind set")
        obj = pb.Object()
        obj.CopyFrom(given)
        apply_defaults(obj)
        kind = kind_of(obj).name
        msg = message_of(obj)
        key = key_of(obj)
        old = self._objects.get(key)
        managed = (
            old is not None
            and kind == "EndpointSlice"
            and old.endpoint_slice.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
        )
        if managed or (
            kind == "EndpointSlice" and msg.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
        ):
            raise RegistryError(
                Reason.INVALID,
                f"{_what(obj)} is invalid: metadata.labels: Forbidden: "
                f"slices labelled {MANAGED_BY_LABEL}={MANAGED_BY} are the registry's own",
            )
        if kind == "Service" and old is not None:
            # An update that leaves clusterIP/nodePorts empty keeps what was allocated.
            self._keep_allocations(old.service, obj.service)
        errors = validate(obj, old)
        if errors:
            detail = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
            raise RegistryError(Reason.INVALID, f"{_what(obj)} is invalid: {detail}")
        if kind == "Service":
            self._allocate(key, obj)
        if old is not None:
            self._carry_meta(old, obj)
            if _spec_equal(old, obj):
                return old, "unchanged"
            message_of(obj).metadata.generation = message_of(old).metadata.generation + 1
            stored = self._put(txn, key, obj)
            assert stored is not None
            return stored, "configured"
        self._new_meta(txn, obj)
        stored = self._put(txn, key, obj)
        assert stored is not None
        return stored, "created"

    @staticmethod
    def _keep_allocations(old: pb.Service, new: pb.Service) -> None:
        if not new.spec.cluster_ip and old.spec.cluster_ip:
            new.spec.cluster_ip = old.spec.cluster_ip
        if (
            not new.spec.cluster_ips
            and old.spec.cluster_ips
            and new.spec.cluster_ip == old.spec.cluster_ip
        ):
            new.spec.cluster_ips[:] = old.spec.cluster_ips
        if new.spec.type == old.spec.type == "NodePort":
            olds = {(p.port, p.protocol or "TCP"): p.node_port for p in old.spec.ports}
            by_name = {p.name: p.node_port for p in old.spec.ports if p.name}
            for p in new.spec.ports:
                if not p.node_port:
                    p.node_port = olds.get((p.port, p.protocol or "TCP")) or by_name.get(p.name, 0)
            if not new.spec.health_check_node_port and new.spec.external_traffic_policy == "Local":
                new.spec.health_check_node_port = old.spec.health_check_node_port

    def _allocate(self, key: Key, obj: pb.Object) -> None:
        """Give the Service a clusterIP and nodePorts, honouring the ones it asks for."""
        spec = obj.service.spec

        def invalid(
            path: str, value: object, detail: str, reason: Reason = Reason.INVALID
        ) -> RegistryError:
            v = f'"{value}"' if isinstance(value, str) else str(value)
            return RegistryError(
                reason, f"{_what(obj)} is invalid: {path}: Invalid value: {v}: {detail}"
            )

        if spec.cluster_ip == "":
            try:
                spec.cluster_ip = self.service_range.allocate(
                    self._cluster_ips, len(self._cluster_ips)
                )
            except AllocationError:
                raise RegistryError(
                    Reason.INVALID,
                    f"{_what(obj)} is invalid: spec.clusterIP: Internal error: failed to "
                    f"allocate a service IP: range {self.service_range} is full",
                ) from None
        elif spec.cluster_ip != "None":
            if not self.service_range.contains(spec.cluster_ip):
                raise invalid(
                    "spec.clusterIP",
                    spec.cluster_ip,
                    "provided IP is not in the valid range. "
                    f"The range of valid IPs is {self.service_range}",
                )
            owner = self._cluster_ips.get(spec.cluster_ip)
            if owner is not None and owner != key:
                raise invalid(
                    "spec.clusterIP",
                    spec.cluster_ip,
                    f"provided IP is already allocated (to service {owner.namespace}/{owner.name})",
                    Reason.ALREADY_EXISTS,
                )
        spec.cluster_ips[:] = [spec.cluster_ip]

        if spec.type != "NodePort":
            spec.health_check_node_port = 0
            return
        mine: set[int] = set()

        def take(path: str, port: int) -> int:
            if port:
                if port not in self.node_port_range:
                    raise invalid(
                        path,
                        port,
                        "provided port is not in the valid range. The range of valid ports is "
                        + self.node_port_range_text,
                    )
                owner = self._node_ports.get(port)
                if owner is not None and owner != key:
                    raise invalid(
                        path,
                        port,
                        "provided port is already allocated "
                        f"(to service {owner.namespace}/{owner.name})",
                        Reason.ALREADY_EXISTS,
                    )
                mine.add(port)
                return port
            used = _Union(self._node_ports, mine)
            try:
                port = self.node_port_range.allocate(used, len(self._node_ports) + len(mine))
            except AllocationError:
                raise RegistryError(
                    Reason.INVALID,
                    f"{_what(obj)} is invalid: {path}: Internal error: failed to allocate a "
                    f"node port: range {self.node_port_range_text} is full",
                ) from None
            mine.add(port)
            return port

        for i, p in enumerate(spec.ports):
            if p.node_port:
                take(f"spec.ports[{i}].nodePort", p.node_port)
        same: dict[str, int] = {}
        for i, p in enumerate(spec.ports):
            if not p.node_port:
                # TCP and UDP on one port number share one nodePort, as Kubernetes does.
                p.node_port = same.get(str(p.port)) or take(f"spec.ports[{i}].nodePort", 0)
            same[str(p.port)] = p.node_port
        if spec.external_traffic_policy == "Local":
            if spec.health_check_node_port in mine:
                raise invalid(
                    "spec.healthCheckNodePort",
                    spec.health_check_node_port,
                    "provided port is already allocated (to one of this service's ports)",
                    Reason.ALREADY_EXISTS,
                )
            spec.health_check_node_port = take(
                "spec.healthCheckNodePort", spec.health_check_node_port
            )
        else:
            spec.health_check_node_port = 0

    @_retried
    def delete(self, key: Key, grace_period_seconds: int | None = None) -> pb.Object:
        """Remove an object; a Pod given a grace period stays, terminating, until it ends."""
        with self._lock:
            self._check_open()
            key = self._normal_key(key)
            old = self._objects.get(key)
            if old is None:
                raise RegistryError(
                    Reason.NOT_FOUND, f"{resource_name(key.kind)} {go_quote(key.name)} not found"
                )
            txn = self._begin()
            try:
                if key.kind == "Pod" and grace_period_seconds and grace_period_seconds > 0:
                    if old.pod.metadata.HasField("deletion_timestamp"):
                        return old
                    new = pb.Object()
                    new.CopyFrom(old)
                    new.pod.metadata.deletion_timestamp.CopyFrom(_now())
                    new.pod.metadata.deletion_grace_period_seconds = grace_period_seconds
                    stored = self._put(txn, key, new)
                    assert stored is not None
                    self._commit(txn)
                    return stored
                self._put(txn, key, None)
                if key.kind == "EndpointSlice":
                    # The registry's own slices come back at once, as Kubernetes'
                    # controller makes them again.
                    svc = old.endpoint_slice.metadata.labels.get(SERVICE_NAME_LABEL)
                    if (
                        svc
                        and old.endpoint_slice.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
                    ):
                        txn.touched_services.add(Key("Service", key.namespace, svc))
                self._commit(txn)
            except Exception:
                self._rollback(txn)
                raise
            return old

    def _reap_loop(self) -> None:
        """Ends terminating Pods whose grace period is over."""
        while not self._closed:
            time.sleep(0.2)
            now = time.time()
            with self._lock:
                if self._closed:
                    return
                due = []
                for k in self._terminating:
                    meta = self._objects[k].pod.metadata
                    if meta.deletion_timestamp.seconds + meta.deletion_grace_period_seconds <= now:
                        due.append(k)
                for k in sorted(due):
                    with contextlib.suppress(RegistryError):
                        self.delete(k)

    # ------------------------------------------------------------ reads

    @staticmethod
    def _normal_key(key: Key) -> Key:
        kind = KINDS.get(key.kind)
        if kind is None:
            raise RegistryError(
                Reason.INVALID, f'unknown kind "{key.kind}" (known: {", ".join(KINDS)})'
            )
        ns = (key.namespace or DEFAULT_NAMESPACE) if kind.namespaced else ""
        return Key(kind.name, ns, key.name)

    def get(self, key: Key) -> pb.Object:
        with self._lock:
            key = self._normal_key(key)
            obj = self._objects.get(key)
            if obj is None:
                raise RegistryError(
                    Reason.NOT_FOUND, f"{resource_name(key.kind)} {go_quote(key.name)} not found"
                )
            return obj

    def _matcher(self, kind: str, namespace: str, selector: str) -> Matcher:
        if kind and kind not in KINDS:
            raise RegistryError(
                Reason.INVALID, f'unknown kind "{kind}" (known: {", ".join(KINDS)})'
            )
        try:
            sel = labels.parse_selector(selector)
        except labels.SelectorError as e:
            raise RegistryError(Reason.INVALID, f"labelSelector: {e}") from None

        everything = sel.selects_everything

        def match(key: Key, obj: pb.Object) -> bool:
            if kind and key.kind != kind:
                return False
            if namespace and key.namespace and key.namespace != namespace:
                return False
            return everything or sel.matches(message_of(obj).metadata.labels)

        return match

    def list(
        self, kind: str = "", namespace: str = "", selector: str = ""
    ) -> tuple[list[pb.Object], int]:
        """The matching objects sorted by key, and the revision they were read at."""
        match = self._matcher(kind, namespace, selector)
        with self._lock:
            pool = self._by_kind[kind] if kind else self._objects
            items = [o for k, o in sorted(pool.items()) if match(k, o)]
            return items, self._revision

    def missing(self, keys: Iterable[Key]) -> int:
        """How many of keys (as key_of gives them) name no stored object."""
        with self._lock:
            return sum(1 for k in keys if k not in self._objects)

    @property
    def object_count(self) -> int:
        """How many objects are stored, EndpointSlices included."""
        with self._lock:
            return len(self._objects)

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def watch(
        self,
        kind: str = "",
        namespace: str = "",
        selector: str = "",
        resource_version: str = "",
        active: Callable[[], bool] = lambda: True,
        bookmark_every: float = 10.0,
    ) -> Iterator[tuple[int, pb.Object | None, int]]:
        """(event type, object, revision) for every matching change after
        resource_version, in order. With "" it starts with the current state as ADDED
        events and a BOOKMARK. Raises GONE when the history no longer reaches back."""
        for batch in self.watch_batches(
            kind, namespace, selector, resource_version, active, bookmark_every
        ):
            for typ, obj, rev, _ in batch:
                yield typ, obj, rev

    def watch_batches(
        self,
        kind: str = "",
        namespace: str = "",
        selector: str = "",
        resource_version: str = "",
        active: Callable[[], bool] = lambda: True,
        bookmark_every: float = 10.0,
        size: int = 1000,
    ) -> Iterator[WatchBatch]:
        """watch()'s events in lists of at most size: each list holds what was ready
        together (a burst of changes, or part of the initial state), so that a caller
        can send it as one message. A change comes with its object serialized as the
        store got it, so that it is sent without serializing it again."""
        match = self._matcher(kind, namespace, selector)
        with self._lock:
            if resource_version == "":
                rev = self._revision
                initial = [o for k, o in sorted(self._objects.items()) if match(k, o)]
            else:
                try:
                    rev = int(resource_version)
                except ValueError:
                    raise RegistryError(
                        Reason.INVALID,
                        f'resourceVersion: Invalid value: "{resource_version}": not a number',
                    ) from None
                self._check_resumable(rev)
                initial = []
        for i in range(0, len(initial), size):
            yield [
                (ADDED, obj, int(message_of(obj).metadata.resource_version), b"")
                for obj in initial[i : i + size]
            ]
        if resource_version == "":
            yield [(BOOKMARK, None, rev, b"")]
        last_sent = time.monotonic()
        while active():
            with self._lock:
                if self._revision <= rev and not self._closed:
                    self._cond.wait(timeout=0.5)
                if self._closed:
                    raise RegistryError(Reason.UNAVAILABLE, "the registry is shutting down")
                self._check_resumable(rev)
                start = rev + 1 - self._first_rev
                batch = self._events[start : start + size]
                published = self._revision
            if batch:
                rev = batch[-1].rev
                out: WatchBatch = [
                    (e.type, e.obj, e.rev, e.data) for e in batch if match(e.key, e.obj)
                ]
                if out:
                    yield out
                    last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= bookmark_every:
                rev = max(rev, published)
                yield [(BOOKMARK, None, rev, b"")]
                last_sent = time.monotonic()

    def _check_resumable(self, rev: int) -> None:
        if rev > self._revision and self._shared is not None:
            self._catch_up()  # another registry may have handed rev out a moment ago
        # Events are kept from _first_rev on: a watcher at rev needs rev + 1 onwards.
        if rev < self._first_rev - 1:
            raise RegistryError(
                Reason.GONE,
                f"too old resource version: {rev} "
                f"(the oldest kept is {self._first_rev - 1}): relist",
            )
        if rev > self._revision:
            raise RegistryError(
                Reason.GONE,
                f"resource version {rev} is newer than the registry's ({self._revision}): relist",
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(Reason.UNAVAILABLE, "the registry is shutting down")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()
        self._reaper.join(timeout=2)
        if self._follower is not None:
            self._follower.join(timeout=3)
        self.store.close()


def _mark(
    index: dict[tuple[str, str, str], set[Key]],
    key: Key,
    pairs: Iterable[tuple[str, str]],
    add: bool,
) -> None:
    """Add key to (or remove it from) a label index under each (label, value) of pairs."""
    for k, v in pairs:
        t = (key.namespace, k, v)
        if add:
            index.setdefault(t, set()).add(key)
        else:
            s = index.get(t)
            if s is not None:
                s.discard(key)
                if not s:
                    del index[t]


class _Union:
    """Membership in either of two containers, without copying them."""

    def __init__(self, a: dict[int, Key], b: set[int]) -> None:
        self.a, self.b = a, b

    def __contains__(self, v: object) -> bool:
        return v in self.a or v in self.b
