"""The benchmark's Services and Pods as API objects; bulk Apply in batches the registry takes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.bench.model import NAMESPACE, FakePods, ServicePort
from ebpflb.client import RegistryClient

# The registry refuses a request over 16 MiB or 50,000 objects (registry.server.Limits);
# stay well under both.
BATCH_OBJECTS = 10_000
BATCH_BYTES = 8 * 1024 * 1024


def service_object(svc: ServicePort, selector: Mapping[str, str]) -> pb.Object:
    """A ClusterIP Service with svc's VIP asked for (so every mode uses the same address)."""
    s = pb.Service(api_version="v1", kind="Service")
    s.metadata.name = svc.name
    s.metadata.namespace = svc.namespace
    s.spec.type = "ClusterIP"
    s.spec.cluster_ip = svc.vip
    s.spec.selector.update(selector)
    p = s.spec.ports.add(name=svc.port_name, protocol=svc.protocol, port=svc.port)
    p.target_port.int_val = svc.endpoints[0].port if svc.endpoints else svc.port
    return pb.Object(service=s)


def pod_object(
    name: str,
    ip: str,
    labels: Mapping[str, str],
    node: str,
    ports: Iterable[tuple[str, int]] = (),
    *,
    ready: bool = True,
) -> pb.Object:
    """A running Pod with an IP on `node` (no namespace need stand behind it)."""
    p = pb.Pod(api_version="v1", kind="Pod")
    p.metadata.name = name
    p.metadata.namespace = NAMESPACE
    p.metadata.labels.update(labels)
    p.spec.node_name = node
    c = p.spec.containers.add(name="main")
    for port_name, port in ports:
        c.ports.add(name=port_name, container_port=port, protocol="TCP")
    p.status.phase = "Running"
    p.status.pod_ip = ip
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    return pb.Object(pod=p)


def fake_pod_objects(pods: FakePods, node: str, port: int = 80) -> list[pb.Object]:
    return [
        pod_object(name, ip, labels, node, [("http", port)]) for name, ip, labels in pods.pods()
    ]


def filler_objects(services: Sequence[ServicePort], pods: FakePods) -> list[pb.Object]:
    return [service_object(s, {pods.label: str(s.group)}) for s in services]


def batches(objects: Sequence[pb.Object]) -> list[list[pb.Object]]:
    """objects cut into Apply requests of at most BATCH_OBJECTS objects and BATCH_BYTES."""
    out: list[list[pb.Object]] = []
    current: list[pb.Object] = []
    size = 0
    for obj in objects:
        n = obj.ByteSize() + 8
        if current and (len(current) >= BATCH_OBJECTS or size + n > BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(obj)
        size += n
    if current:
        out.append(current)
    return out


def apply_all(client: RegistryClient, objects: Sequence[pb.Object]) -> list[float]:
    """Apply objects batch by batch (each atomic); the seconds each Apply took."""
    took = []
    for batch in batches(objects):
        t0 = time.perf_counter()
        client.apply(batch)
        took.append(time.perf_counter() - t0)
    return took
