"""The endpoints controller's logic: a Service and the Pods it selects -> its EndpointSlices."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import KINDS, SERVICE_NAME_LABEL, int_or_string

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "ebpflb-registry"

# (service port name, protocol, resolved target port) for each service port a pod serves
PortSet = tuple[tuple[str, str, int], ...]


def pod_is_ready(pod: pb.Pod) -> bool:
    """Ready as Kubernetes says: the Ready condition is "True". A Pod given without
    any Ready condition (no kubelet reports one here) counts as ready once it has an
    IP and is Running or has no phase, so hand-written Pods work."""
    for c in pod.status.conditions:
        if c.type == "Ready":
            return c.status == "True"
    return bool(pod.status.pod_ip) and pod.status.phase in ("", "Running")


def pod_is_terminating(pod: pb.Pod) -> bool:
    return pod.metadata.HasField("deletion_timestamp")


def resolve_target_port(pod: pb.Pod, port: pb.ServicePort) -> int | None:
    """The pod's port for a service port: a number as it is, a name looked up among the
    pod's container ports of the same protocol (None when the pod has no such port)."""
    target = int_or_string(port.target_port)
    if target is None:
        return port.port
    if isinstance(target, int):
        return target
    protocol = port.protocol or "TCP"
    for c in pod.spec.containers:
        for cp in c.ports:
            if cp.name == target and (cp.protocol or "TCP") == protocol:
                return cp.container_port
    return None


def pod_port_set(svc: pb.Service, pod: pb.Pod) -> PortSet:
    out = []
    for p in svc.spec.ports:
        resolved = resolve_target_port(pod, p)
        if resolved is not None:
            out.append((p.name, p.protocol or "TCP", resolved))
    return tuple(out)


def _digest(ports: PortSet) -> str:
    """What ends the name of a Service's slice of these ports."""
    return hashlib.sha1(repr(ports).encode()).hexdigest()[:5]


# A Pod as an endpoint: its IP and name (the order in a slice) and the Endpoint itself.
PodEndpoint = tuple[str, str, pb.Endpoint]


def pod_endpoint(pod: pb.Pod) -> PodEndpoint | None:
    """The endpoint a Pod makes in any slice (it depends on the pod alone); None for a
    pod without an IP, or one that has finished."""
    ip = pod.status.pod_ip
    if not ip or pod.status.phase in ("Succeeded", "Failed"):
        return None
    ready = pod_is_ready(pod)
    terminating = pod_is_terminating(pod)
    ep = pb.Endpoint(addresses=[ip], node_name=pod.spec.node_name)
    ep.conditions.ready = ready and not terminating
    ep.conditions.serving = ready
    ep.conditions.terminating = terminating
    ep.target_ref.kind = "Pod"
    ep.target_ref.namespace = pod.metadata.namespace
    ep.target_ref.name = pod.metadata.name
    ep.target_ref.uid = pod.metadata.uid
    return ip, pod.metadata.name, ep


def _fixed_ports(svc: pb.Service) -> PortSet | None:
    """The port set of every pod when no targetPort is a name (then no pod is looked at)."""
    out = []
    for p in svc.spec.ports:
        target = int_or_string(p.target_port)
        if isinstance(target, str):
            return None
        out.append((p.name, p.protocol or "TCP", p.port if target is None else target))
    return tuple(out)


def compute_slices(
    svc: pb.Service,
    pods: Iterable[pb.Pod],
    endpoint: Callable[[pb.Pod], PodEndpoint | None] = pod_endpoint,
) -> list[pb.EndpointSlice]:
    """The EndpointSlices for svc given the pods its selector picks: one slice per
    distinct set of resolved ports (a named targetPort may resolve differently per
    pod; a pod without the name is not an endpoint for that port). Pods without an
    IP, or that have finished, are no endpoints. Sorted, so equal input gives equal
    output and an unchanged slice is never rewritten. endpoint: pod_endpoint, or a
    cache of it (a transaction builds each pod's endpoint once for all its Services)."""
    return [named_slice(svc, shape) for shape in slice_shapes(svc, pods, endpoint)]


@dataclass(frozen=True)
class SliceShape:
    """A slice but for what names it after its Service: the same for every Service with
    the same ports selecting the same pods (a transaction builds it once for all)."""

    digest: str  # the end of the slice's name
    template: pb.EndpointSlice  # no name, namespace or service-name label; never changed


def slice_shapes(
    svc: pb.Service,
    pods: Iterable[pb.Pod],
    endpoint: Callable[[pb.Pod], PodEndpoint | None] = pod_endpoint,
) -> list[SliceShape]:
    """compute_slices' slices without their Service's name: they depend on svc's ports
    and the pods alone."""
    fixed = _fixed_ports(svc)
    groups: dict[PortSet, list[PodEndpoint]] = {}
    for pod in pods:
        made = endpoint(pod)
        if made is None:
            continue
        ports = fixed if fixed is not None else pod_port_set(svc, pod)
        if ports:
            groups.setdefault(ports, []).append(made)
    shapes = []
    for ports, members in sorted(groups.items()):
        es = pb.EndpointSlice(
            api_version=KINDS["EndpointSlice"].api_version,
            kind="EndpointSlice",
            address_type="IPv4",
        )
        es.metadata.labels[MANAGED_BY_LABEL] = MANAGED_BY
        for name, protocol, port in ports:
            es.ports.add(name=name, protocol=protocol, port=port)
        members.sort(key=lambda m: (m[0], m[1]))
        es.endpoints.extend(ep for _, _, ep in members)
        shapes.append(SliceShape(_digest(ports), es))
    return shapes


def named_slice(
    svc: pb.Service, shape: SliceShape, into: pb.EndpointSlice | None = None
) -> pb.EndpointSlice:
    """svc's slice of that shape (written into `into`, a fresh message, if given)."""
    es = pb.EndpointSlice() if into is None else into
    es.CopyFrom(shape.template)
    es.metadata.name = f"{svc.metadata.name}-{shape.digest}"
    es.metadata.namespace = svc.metadata.namespace
    es.metadata.labels[SERVICE_NAME_LABEL] = svc.metadata.name
    return es
