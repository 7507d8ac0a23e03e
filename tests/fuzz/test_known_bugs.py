"""Bugs the fuzzing found in the registry (ebpflb/registry/core.py), each as a minimal
reproduction; all fixed, kept as regression tests. (registry_fuzz.AVOID_KNOWN_BUGS still
keeps the stateful model from deleting managed slices: its model expects a deleted
object to stay gone, while the registry now makes its own slices again at once.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import Key, from_manifest
from ebpflb.registry.core import Registry, RegistryError
from ebpflb.registry.endpoints import MANAGED_BY, MANAGED_BY_LABEL
from ebpflb.registry.store import SqliteStore
from tests.fuzz.common import assert_one_line

pytestmark = pytest.mark.unit


@pytest.fixture
def registry(tmp_path: Any) -> Iterator[Registry]:
    r = Registry(SqliteStore(str(tmp_path / "registry.db")))
    yield r
    r.close()


def svc(name: str, **spec: Any) -> pb.Object:
    ports = spec.pop("ports", [{"port": 80}])
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": ports, **spec},
        }
    )


def pod(name: str, ip: str, app: str) -> pb.Object:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": ip},
        }
    )


def managed_slices(registry: Registry) -> list[pb.Object]:
    items, _ = registry.list("EndpointSlice", "", f"{MANAGED_BY_LABEL}={MANAGED_BY}")
    return items


def test_health_check_node_port_is_not_one_of_the_services_own_node_ports(
    registry: Registry,
) -> None:
    """Found by the stateful fuzz test. _allocate's take() checks other Services'
    ports only, not the ones this Service just took (`mine`): kube-proxy would answer
    health checks on the port that carries the traffic."""
    local = svc(
        "web",
        type="NodePort",
        externalTrafficPolicy="Local",
        healthCheckNodePort=30100,
        ports=[{"port": 80, "nodePort": 30100}],
    )
    with pytest.raises(RegistryError) as e:
        registry.apply([local])
    assert "spec.healthCheckNodePort" in e.value.message


def test_a_deleted_managed_endpointslice_comes_back_or_the_delete_is_refused(
    registry: Registry,
) -> None:
    """Found by the stateful fuzz test (the endpoints model check). Delete removes the
    registry's own slice and nothing makes it again until the Service or a Pod
    changes: agents then have no endpoints for a Service whose pods are all there."""
    registry.apply([svc("web"), pod("p", "10.244.0.1", "web")])
    (es,) = managed_slices(registry)
    key = Key("EndpointSlice", "default", es.endpoint_slice.metadata.name)
    try:
        registry.delete(key)
    except RegistryError:
        return  # refused: fine too
    assert len(managed_slices(registry)) == 1


def test_a_hand_made_endpointslice_cannot_replace_a_managed_one(registry: Registry) -> None:
    """Slice names are `<service>-<hash>`, so a user can apply one by that name without
    the managed-by label: it replaces the registry's slice ("configured"), and the
    registry overwrites it back only when the Service or its pods next change."""
    registry.apply([svc("web"), pod("p", "10.244.0.1", "web")])
    (es,) = managed_slices(registry)
    hand = from_manifest(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": es.endpoint_slice.metadata.name,
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "endpoints": [{"addresses": ["10.244.9.9"]}],
        }
    )
    try:
        registry.apply([hand])
    except RegistryError:
        return  # refused: fine
    assert managed_slices(registry) == [es]


def test_a_node_port_service_can_go_from_local_back_to_cluster(registry: Registry) -> None:
    """_keep_allocations carries the old healthCheckNodePort into an update that sets
    externalTrafficPolicy: Cluster (or leaves it out), and validation then refuses it:
    `spec.healthCheckNodePort: Invalid value: 3xxxx: may only be set when ... 'Local'`.
    Kubernetes releases the port instead."""
    registry.apply([svc("web", type="NodePort", externalTrafficPolicy="Local")])
    (stored,) = registry.apply(
        [svc("web", type="NodePort", externalTrafficPolicy="Cluster")]
    ).objects
    assert stored.service.spec.health_check_node_port == 0


def test_refusals_are_one_line_whatever_the_name(registry: Registry) -> None:
    """Found by the gRPC fuzz test: `f'{kind} "{name}" is invalid'` and `'... "{name}"
    not found'` put the name in as it is, so a name with a line break (refused, rightly)
    breaks the message in lines; quoting it like the field errors do (labels.go_quote)
    keeps it one line."""
    bad = svc("a\nb")
    with pytest.raises(RegistryError) as e:
        registry.apply([bad])
    assert_one_line(e.value.message)
    with pytest.raises(RegistryError) as e:
        registry.get(Key("Service", "", "a\nb"))
    assert_one_line(e.value.message)
