"""The node agent's view of desired state: Services and EndpointSlices -> datapath frontends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ebpflb.agent.healthcheck import HealthCheck
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.objects import SERVICE_NAME_LABEL, Key

DEFAULT_AFFINITY_TIMEOUT = 10800


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


def _backends(
    port: pb.ServicePort, slices: list[pb.EndpointSlice], node: str, local_only: bool
) -> tuple[Backend, ...]:
    """The ready endpoints of one service port (name and protocol match); with none
    ready, the serving terminating ones take over, as kube-proxy does. local_only keeps
    this node's (a traffic policy of Local)."""
    protocol = port.protocol or "TCP"
    ready: list[Backend] = []
    fallback: list[Backend] = []
    for es in slices:
        for ep_port in es.ports:
            if ep_port.name != port.name or (ep_port.protocol or "TCP") != protocol:
                continue
            for ep in es.endpoints:
                local = ep.node_name == node
                if not ep.addresses or (local_only and not local):
                    continue
                b = _backend(ep.addresses[0], ep_port.port, local)
                if endpoint_ready(ep):
                    ready.append(b)
                elif endpoint_serving(ep) and ep.conditions.terminating:
                    fallback.append(b)
    return tuple(ready or fallback)


def service_frontends(
    svc: pb.Service, slices: Iterable[pb.EndpointSlice], node: str, node_ips: Sequence[str] = ()
) -> list[Frontend]:
    """The ClusterIP frontend of every service port (internalTrafficPolicy=Local keeps
    this node's endpoints), and for a NodePort Service one frontend per node address and
    port (externalTrafficPolicy=Local keeps this node's endpoints: the client's address
    is kept; Cluster takes all, and the datapath SNATs to the node for remote ones)."""
    spec = svc.spec
    if spec.type not in ("", "ClusterIP", "NodePort"):
        return []
    slices = list(slices)
    affinity = affinity_timeout(svc)
    out = []
    for port in spec.ports:
        protocol = port.protocol or "TCP"
        if spec.cluster_ip not in ("", "None"):
            backends = _backends(port, slices, node, spec.internal_traffic_policy == "Local")
            out.append(Frontend(spec.cluster_ip, port.port, protocol, backends, affinity))
        if spec.type == "NodePort" and port.node_port:
            backends = _backends(port, slices, node, spec.external_traffic_policy == "Local")
            out.extend(
                Frontend(ip, port.node_port, protocol, backends, affinity, nodeport=True)
                for ip in node_ips
            )
    return out


def health_check(
    svc: pb.Service, slices: Iterable[pb.EndpointSlice], node: str
) -> HealthCheck | None:
    """What the Service's health check node port says on this node (None: it has none)."""
    spec = svc.spec
    if not spec.health_check_node_port or spec.external_traffic_policy != "Local":
        return None
    local = {
        ep.addresses[0]
        for es in slices
        for ep in es.endpoints
        if ep.addresses and ep.node_name == node and endpoint_ready(ep)
    }
    return HealthCheck(svc.metadata.namespace, svc.metadata.name, len(local))


@dataclass
class DesiredState:
    """Services and slices as the registry last said, and the frontends they make.
    Knows nothing of maps: the Programmer turns frontends into entries."""

    node: str
    node_ips: tuple[str, ...] = ()  # where NodePort frontends listen
    services: dict[Key, pb.Service] = field(default_factory=dict)
    slices: dict[Key, pb.EndpointSlice] = field(default_factory=dict)
    _slices_of: dict[Key, set[Key]] = field(default_factory=dict)  # service -> its slices
    _frontends: dict[Key, list[Frontend]] = field(default_factory=dict)
    _health: dict[Key, tuple[int, HealthCheck]] = field(default_factory=dict)
    _dirty: set[Key] = field(default_factory=set)

    def _service_of(self, key: Key, es: pb.EndpointSlice) -> Key | None:
        name = es.metadata.labels.get(SERVICE_NAME_LABEL)
        return Key("Service", key.namespace, name) if name else None

    def update(self, key: Key, obj: pb.Object | None) -> None:
        """A Service or EndpointSlice added, modified (obj) or deleted (None)."""
        if key.kind == "Service":
            if obj is None:
                self.services.pop(key, None)
            else:
                self.services[key] = obj.service
            self._dirty.add(key)
        elif key.kind == "EndpointSlice":
            old = self.slices.pop(key, None)
            if old is not None:
                svc = self._service_of(key, old)
                if svc is not None:
                    self._slices_of.get(svc, set()).discard(key)
                    self._dirty.add(svc)
            if obj is not None:
                self.slices[key] = obj.endpoint_slice
                svc = self._service_of(key, obj.endpoint_slice)
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
            slices = [self.slices[k] for k in sorted(self._slices_of.get(key, set()))]
            self._frontends[key] = service_frontends(svc, slices, self.node, self.node_ips)
            check = health_check(svc, slices, self.node)
            if check is not None:
                self._health[key] = (svc.spec.health_check_node_port, check)
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
