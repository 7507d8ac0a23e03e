"""Smoke test of the Vagrant VMs: nodes registered, a ClusterIP and a NodePort across nodes."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from ebpflb.harness import eventually
from tests.vm.target import TARGET_ENV, ClusterTarget, TargetError, http_get

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get(TARGET_ENV) != "vagrant",
        reason="set EBPFLB_TARGET=vagrant after `vagrant up`",
    ),
]

TARGET_PORT = 8080
LABEL = "ebpflb-smoke"


@dataclass(frozen=True)
class Smoke:
    """One backend and one client pod per node, a ClusterIP and a NodePort Service."""

    target: ClusterTarget
    backends: frozenset[str]
    clients: dict[str, str]  # node -> client pod
    cluster_ip: str
    node_port: int


def service(name: str, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": selector,
            "ports": [{"port": 80, "targetPort": TARGET_PORT, "protocol": "TCP"}],
            **spec,
        },
    }


@pytest.fixture(scope="module")
def smoke(cluster_target: ClusterTarget) -> Smoke:
    t = cluster_target
    run = secrets.token_hex(2)  # names of this run: a crashed earlier one may have left its own
    selector = {"app": f"{LABEL}-{run}"}
    backends = set()
    clients = {}
    for node in t.nodes:
        backend = f"smoke-{run}-{node.name}"
        t.add_backend_pod(node.name, backend, selector, TARGET_PORT)
        backends.add(backend)
        clients[node.name] = f"client-{run}-{node.name}"
        t.add_client_pod(node.name, clients[node.name])
    t.apply(
        service(f"smoke-{run}", selector),
        service(f"smoke-{run}-np", selector, type="NodePort"),
    )
    cluster_ip = t.get("Service", f"smoke-{run}")["spec"]["clusterIP"]
    node_port = t.get("Service", f"smoke-{run}-np")["spec"]["ports"][0]["nodePort"]
    return Smoke(t, frozenset(backends), clients, str(cluster_ip), int(node_port))


def answered_by_all(fetch: Callable[[], str], want: frozenset[str], timeout: float = 90.0) -> None:
    """Until fetch() has answered with every name in want (errors are retried meanwhile)."""
    seen: set[str] = set()

    def all_seen() -> None:
        for _ in range(10):
            with contextlib.suppress(TargetError):
                seen.add(fetch())
            if seen >= want:
                break
        assert seen == want, f"answered by {sorted(seen)}, want {sorted(want)}"

    eventually(all_seen, timeout=timeout, interval=0.5)


def test_every_node_is_registered_and_ready(cluster_target: ClusterTarget) -> None:
    assert len(cluster_target.nodes) >= 2, "the Vagrantfile defines two nodes"
    registered = {n["metadata"]["name"]: n for n in cluster_target.list("Node")}
    for node in cluster_target.nodes:
        assert node.name in registered, f"{node.name} not registered: {sorted(registered)}"
        status = registered[node.name]["status"]
        addresses = {(a["type"], a["address"]) for a in status.get("addresses", [])}
        assert ("InternalIP", node.ip) in addresses, addresses
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", status


def test_cluster_ip_reaches_backends_on_both_nodes_from_a_pod_on_each_node(smoke: Smoke) -> None:
    url = f"http://{smoke.cluster_ip}:80/"
    for client in smoke.clients.values():
        answered_by_all(partial(http_get, smoke.target, url, pod=client), smoke.backends)


def test_node_port_from_the_control_vm_on_each_node_ip(smoke: Smoke) -> None:
    for node in smoke.target.nodes:
        url = f"http://{node.ip}:{smoke.node_port}/"
        answered_by_all(partial(http_get, smoke.target, url), smoke.backends)
