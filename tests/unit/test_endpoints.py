"""The endpoints controller's pure logic: named ports, readiness, grouping into slices."""

from __future__ import annotations

import pytest

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import from_manifest
from ebpflb.registry.endpoints import compute_slices, pod_is_ready, resolve_target_port

pytestmark = pytest.mark.unit


def service(ports: list[dict[str, object]]) -> pb.Service:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"selector": {"app": "a"}, "ports": ports},
        }
    ).service


def pod(name: str, ip: str, ports: list[dict[str, object]], **status: object) -> pb.Pod:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "ports": ports}]},
            "status": {"podIP": ip, **status},
        }
    ).pod


@pytest.mark.parametrize(
    ("target", "protocol", "container_ports", "expected"),
    [
        (9376, "TCP", [], 9376),
        (None, "TCP", [], 80),
        ("http", "TCP", [{"name": "http", "containerPort": 8080}], 8080),
        ("http", "UDP", [{"name": "http", "containerPort": 8080}], None),
        ("http", "UDP", [{"name": "http", "containerPort": 8053, "protocol": "UDP"}], 8053),
        ("http", "TCP", [{"name": "metrics", "containerPort": 9090}], None),
    ],
    ids=["number", "unset-is-port", "name", "name-wrong-protocol", "name-udp", "name-missing"],
)
def test_resolve_target_port(
    target: object, protocol: str, container_ports: list[dict[str, object]], expected: int | None
) -> None:
    port: dict[str, object] = {"port": 80, "protocol": protocol}
    if target is not None:
        port["targetPort"] = target
    svc = service([port])
    assert resolve_target_port(pod("p", "10.0.0.1", container_ports), svc.spec.ports[0]) == expected


@pytest.mark.parametrize(
    ("status", "ready"),
    [
        ({}, True),
        ({"phase": "Running"}, True),
        ({"phase": "Pending"}, False),
        ({"conditions": [{"type": "Ready", "status": "False"}]}, False),
        ({"conditions": [{"type": "Ready", "status": "True"}], "phase": "Running"}, True),
        ({"conditions": [{"type": "PodScheduled", "status": "True"}]}, True),
    ],
)
def test_readiness(status: dict[str, object], ready: bool) -> None:
    assert pod_is_ready(pod("p", "10.0.0.1", [], **status)) is ready


def test_pods_group_by_resolved_ports_and_skip_the_unresolvable() -> None:
    svc = service(
        [
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "m", "port": 9, "targetPort": 9},
        ]
    )
    pods = [
        pod("a", "10.0.0.2", [{"name": "http", "containerPort": 80}]),
        pod("b", "10.0.0.1", [{"name": "http", "containerPort": 80}]),
        pod("c", "10.0.0.3", [{"name": "http", "containerPort": 8080}]),
        pod("d", "10.0.0.4", []),  # only the numeric port
        pod("e", "", [{"name": "http", "containerPort": 80}]),  # no IP yet
        pod("f", "10.0.0.6", [{"name": "http", "containerPort": 80}], phase="Failed"),
    ]
    slices = compute_slices(svc, pods)
    got = {
        tuple((p.name, p.port) for p in es.ports): [ep.addresses[0] for ep in es.endpoints]
        for es in slices
    }
    assert got == {
        (("web", 80), ("m", 9)): ["10.0.0.1", "10.0.0.2"],
        (("web", 8080), ("m", 9)): ["10.0.0.3"],
        (("m", 9),): ["10.0.0.4"],
    }
    assert len({es.metadata.name for es in slices}) == 3
    assert compute_slices(svc, list(reversed(pods))) == slices  # order does not matter
