"""The node agent's view of desired state: Services and EndpointSlices -> datapath frontends.

Only what the datapath needs is kept of each object, in compact records (the protobuf
messages are dropped as soon as they are read: at 10,000 Services they would hold most
of the agent's memory), and each slice's backends are worked out once, when it arrives,
so a Service whose slices did not change costs nothing to recompute."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from ebpflb.agent.healthcheck import HealthCheck
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.objects import SERVICE_NAME_LABEL, Key

log = logging.getLogger("ebpflb.agent")

DEFAULT_AFFINITY_TIMEOUT = 10800
BALANCED_TYPES = ("", "ClusterIP", "NodePort")  # the types that get frontends

_intern = sys.intern  # names, protocols and types repeat across thousands of objects


def endpoint_ready(ep: pb.Endpoint) -> bool:
    """Ready unless conditions.ready is false (Kubernetes: "nil should be interpreted as ready")."""
    return not ep.conditions.HasField("ready") or ep.conditions.ready


def endpoint_serving(ep: pb.Endpoint) -> bool:
    if ep.conditions.HasField("serving"):
        return ep.conditions.serving
    return endpoint_ready(ep)


def affinity_timeout(svc: pb.Service) -> int:
    if svc.spec.session_affinity != "ClientIP":
        return 0
    cfg = svc.spec.session_affinity_config.client_ip
    return cfg.timeout_seconds if cfg.HasField("timeout_seconds") else DEFAULT_AFFINITY_TIMEOUT


# Backends are immutable: one object per endpoint, however many Services and changes name it.
_backend = lru_cache(maxsize=1 << 16)(Backend)


class ServicePort(NamedTuple):
    name: str
    protocol: str  # "TCP" when the Service left it out
    port: int
    node_port: int


class ServiceRecord(NamedTuple):
    """What the agent uses of a Service."""

    namespace: str
    name: str
    type: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    affinity_timeout: int
    internal_local: bool  # internalTrafficPolicy=Local
    external_local: bool  # externalTrafficPolicy=Local
    health_check_node_port: int

    @classmethod
    def of(cls, svc: pb.Service) -> ServiceRecord:
        spec = svc.spec
        return cls(
            _intern(svc.metadata.namespace),
            svc.metadata.name,
            _intern(spec.type),
            spec.cluster_ip,
            tuple(
                ServicePort(_intern(p.name), _intern(p.protocol or "TCP"), p.port, p.node_port)
                for p in spec.ports
            ),
            affinity_timeout(svc),
            spec.internal_traffic_policy == "Local",
            spec.external_traffic_policy == "Local",
            spec.health_check_node_port,
        )


class SlicePort(NamedTuple):
    """One port of a slice with the slice's endpoints on it as backends."""

    name: str
    protocol: str
    ready: tuple[Backend, ...]
    fallback: tuple[Backend, ...]  # not ready but serving and terminating


class SliceRecord(NamedTuple):
    """What the agent uses of an EndpointSlice, worked out for one node."""

    service: str  # the name of the Service it belongs to ("" if none)
    ports: tuple[SlicePort, ...]
    local_ready: tuple[str, ...]  # the addresses of this node's ready endpoints

    @classmethod
    def of(cls, es: pb.EndpointSlice, node: str) -> SliceRecord:
        ports, local_ready = _slice_content(es, node)
        return cls(es.metadata.labels.get(SERVICE_NAME_LABEL, ""), ports, local_ready)


SliceContent = tuple[tuple[SlicePort, ...], tuple[str, ...]]  # SliceRecord's ports, local_ready
# The last slice contents worked out, by their serialized endpoints and ports and the node.
_slice_contents: dict[tuple[tuple[bytes, ...], tuple[bytes, ...], str], SliceContent] = {}
_slice_contents_lock = threading.Lock()
SLICE_CONTENTS_KEPT = 1024


def _slice_content(es: pb.EndpointSlice, node: str) -> SliceContent:
    """The slice's ports with their backends, and its local ready addresses. Slices of
    Services that select the same Pods differ only in their metadata: their content is
    worked out once and their records share it (serializing it to look it up costs a
    quarter of working it out)."""
    key = (
        tuple(ep.SerializeToString() for ep in es.endpoints),
        tuple(p.SerializeToString() for p in es.ports),
        node,
    )
    made = _slice_contents.get(key)
    if made is not None:
        return made
    endpoints = []  # (address, local, ready, fallback) of those with an address
    for ep in es.endpoints:
        if ep.addresses:
            c = ep.conditions
            ready = c.ready if c.HasField("ready") else True  # endpoint_ready()
            # Serving (else ready: not) and terminating: endpoint_serving() when not ready.
            fallback = not ready and c.HasField("serving") and c.serving and c.terminating
            endpoints.append((ep.addresses[0], ep.node_name == node, ready, fallback))
    ports = []
    for p in es.ports:
        port = p.port
        made_bs = [(_checked_backend(ip, port, local), r, f) for ip, local, r, f in endpoints]
        ready_bs = tuple(b for b, r, _ in made_bs if b is not None and r)
        fallback_bs = tuple(b for b, _, f in made_bs if b is not None and f)
        protocol = _intern(p.protocol or "TCP")
        ports.append(SlicePort(_intern(p.name), protocol, ready_bs, fallback_bs))
    local_ready = tuple(ip for ip, local, ready, _ in endpoints if local and ready)
    made = (tuple(ports), local_ready)
    with _slice_contents_lock:  # records are made on any thread (DesiredState.record)
        _slice_contents[key] = made
        if len(_slice_contents) > SLICE_CONTENTS_KEPT:
            del _slice_contents[next(iter(_slice_contents))]  # the oldest
    return made


Record = ServiceRecord | SliceRecord


def _checked_backend(ip: str, port: int, local: bool) -> Backend | None:
    """The endpoint's Backend; None (with a warning) for one the datapath cannot hold
    (not IPv4, or no port): it is left out, and the watcher that makes records goes on."""
    try:
        return _backend(ip, port, local)
    except ValueError as e:
        log.warning("EndpointSlice endpoint left out: %s", e)
        return None


def _backends(
    port: ServicePort, slices: Sequence[SliceRecord], local_only: bool
) -> tuple[Backend, ...]:
    """The ready endpoints of one service port (name and protocol match); with none
    ready, the serving terminating ones take over, as kube-proxy does. local_only keeps
    this node's (a traffic policy of Local)."""
    ready: list[Backend] = []
    fallback: list[Backend] = []
    for es in slices:
        for sp in es.ports:
            if sp.name != port.name or sp.protocol != port.protocol:
                continue
            if local_only:
                ready.extend(b for b in sp.ready if b.local)
                fallback.extend(b for b in sp.fallback if b.local)
            else:
                ready.extend(sp.ready)
                fallback.extend(sp.fallback)
    return tuple(ready or fallback)


def record_frontends(
    svc: ServiceRecord, slices: Sequence[SliceRecord], node_ips: Sequence[str] = ()
) -> list[Frontend]:
    """The ClusterIP frontend of every service port (internalTrafficPolicy=Local keeps
    this node's endpoints), and for a NodePort Service one frontend per node address and
    port (externalTrafficPolicy=Local keeps this node's endpoints: the client's address
    is kept; Cluster takes all, and the datapath SNATs to the node for remote ones)."""
    if svc.type not in BALANCED_TYPES:
        return []
    out = []
    for port in svc.ports:
        if svc.cluster_ip not in ("", "None"):
            backends = _backends(port, slices, svc.internal_local)
            out.append(
                Frontend(svc.cluster_ip, port.port, port.protocol, backends, svc.affinity_timeout)
            )
        if svc.type == "NodePort" and port.node_port:
            backends = _backends(port, slices, svc.external_local)
            out.extend(
                Frontend(ip, port.node_port, port.protocol, backends, svc.affinity_timeout, True)
                for ip in node_ips
            )
    return out


def health_check(svc: ServiceRecord, slices: Iterable[SliceRecord]) -> HealthCheck | None:
    """What the Service's health check node port says on this node (None: it has none)."""
    if not svc.health_check_node_port or not svc.external_local:
        return None
    local = {ip for es in slices for ip in es.local_ready}
    return HealthCheck(svc.namespace, svc.name, len(local))


def service_frontends(
    svc: pb.Service, slices: Iterable[pb.EndpointSlice], node: str, node_ips: Sequence[str] = ()
) -> list[Frontend]:
    """record_frontends() of the messages."""
    records = [SliceRecord.of(es, node) for es in slices]
    return record_frontends(ServiceRecord.of(svc), records, node_ips)


@dataclass
class DesiredState:
    """Services and slices as the registry last said (as records), and the frontends
    they make. Knows nothing of maps: the Programmer turns frontends into entries."""

    node: str
    node_ips: tuple[str, ...] = ()  # where NodePort frontends listen
    services: dict[Key, ServiceRecord] = field(default_factory=dict)
    slices: dict[Key, SliceRecord] = field(default_factory=dict)
    _slices_of: dict[Key, set[Key]] = field(default_factory=dict)  # service -> its slices
    _frontends: dict[Key, list[Frontend]] = field(default_factory=dict)
    _health: dict[Key, tuple[int, HealthCheck]] = field(default_factory=dict)
    _dirty: set[Key] = field(default_factory=set)

    def record(self, obj: pb.Object) -> Record:
        """The record of a Service or EndpointSlice message (safe in any thread: the
        watchers make them, so that no message outlives its event)."""
        if obj.HasField("service"):
            return ServiceRecord.of(obj.service)
        if obj.HasField("endpoint_slice"):
            return SliceRecord.of(obj.endpoint_slice, self.node)
        raise ValueError(f"not a Service or EndpointSlice: {obj.WhichOneof('kind')}")

    def _service_of(self, key: Key, es: SliceRecord) -> Key | None:
        return Key("Service", key.namespace, es.service) if es.service else None

    def update(self, key: Key, obj: pb.Object | Record | None) -> None:
        """A Service or EndpointSlice added, modified (obj: the message or its
        record()) or deleted (None)."""
        rec = self.record(obj) if isinstance(obj, pb.Object) else obj
        if key.kind == "Service":
            if rec is None:
                self.services.pop(key, None)
            else:
                assert isinstance(rec, ServiceRecord), rec
                self.services[key] = rec
            self._dirty.add(key)
        elif key.kind == "EndpointSlice":
            old = self.slices.pop(key, None)
            if old is not None:
                svc = self._service_of(key, old)
                if svc is not None:
                    self._slices_of.get(svc, set()).discard(key)
                    self._dirty.add(svc)
            if rec is not None:
                assert isinstance(rec, SliceRecord), rec
                self.slices[key] = rec
                svc = self._service_of(key, rec)
                if svc is not None:
                    self._slices_of.setdefault(svc, set()).add(key)
                    self._dirty.add(svc)

    def reset(self, kind: str) -> None:
        """Forget every object of one kind (its watch is relisting)."""
        if kind == "Service":
            for key in list(self.services):
                self.update(key, None)
        elif kind == "EndpointSlice":
            for key in list(self.slices):
                self.update(key, None)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    @property
    def pending(self) -> int:
        """How many Services changed since the last changes()."""
        return len(self._dirty)

    def _recompute(self) -> set[Key]:
        """Frontends and health checks of the Services changed since the last call;
        returns those Services."""
        changed = self._dirty
        for key in changed:
            svc = self.services.get(key)
            self._frontends.pop(key, None)
            self._health.pop(key, None)
            if svc is None:
                continue
            slices = [self.slices[k] for k in sorted(self._slices_of.get(key, ()))]
            self._frontends[key] = record_frontends(svc, slices, self.node_ips)
            check = health_check(svc, slices)
            if check is not None:
                self._health[key] = (svc.health_check_node_port, check)
        self._dirty = set()
        return changed

    def changes(self) -> dict[Key, list[Frontend]]:
        """The frontends of each Service changed since the last call (an empty list for
        one that is gone or has none): what Programmer.update() takes."""
        return {key: self._frontends.get(key, []) for key in self._recompute()}

    def by_service(self) -> dict[Key, list[Frontend]]:
        """Every Service's frontends (what Programmer.sync() takes); marks all as seen."""
        self._recompute()
        return dict(self._frontends)

    def frontends(self) -> list[Frontend]:
        """Every frontend of every Service."""
        self._recompute()
        return [f for key in sorted(self._frontends) for f in self._frontends[key]]

    def health_checks(self) -> dict[int, HealthCheck]:
        """Health check node port -> what it reports."""
        self._recompute()
        return dict(self._health.values())
