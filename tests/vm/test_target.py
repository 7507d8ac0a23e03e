"""The ClusterTarget contract, on whichever target $EBPFLB_TARGET selects (default: a
two-node namespace cluster): pods, the pod network between nodes, commands, objects."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import pytest

from ebpflb.harness import eventually
from tests.vm.target import ClusterTarget, TargetError, http_get

pytestmark = pytest.mark.e2e

PORT = 8080


@dataclass(frozen=True)
class Pods:
    """A backend and a client on each of the first two nodes: node -> (backend, client)."""

    by_node: dict[str, tuple[str, str]]
    ips: dict[str, str]  # pod -> IP


@pytest.fixture(scope="module")
def pods(cluster_target: ClusterTarget) -> Iterator[Pods]:
    run = secrets.token_hex(2)
    by_node = {}
    ips = {}
    for node in cluster_target.nodes[:2]:
        backend, client = f"t-{run}-{node.name}", f"tc-{run}-{node.name}"
        ips[backend] = cluster_target.add_backend_pod(node.name, backend, {"t": run}, PORT)
        ips[client] = cluster_target.add_client_pod(node.name, client)
        by_node[node.name] = (backend, client)
    yield Pods(by_node, ips)


def test_nodes_have_distinct_names_and_ips(cluster_target: ClusterTarget) -> None:
    nodes = cluster_target.nodes
    assert len(nodes) >= 2
    assert len({n.name for n in nodes}) == len({n.ip for n in nodes}) == len(nodes)
    for n in nodes:
        ipaddress.ip_address(n.ip)


def test_pods_get_addresses_from_their_nodes_pod_cidr(
    cluster_target: ClusterTarget, pods: Pods
) -> None:
    registered = {n["metadata"]["name"]: n for n in cluster_target.list("Node")}
    for node, names in pods.by_node.items():
        cidr = ipaddress.ip_network(registered[node]["spec"]["podCIDR"])
        for pod in names:
            assert ipaddress.ip_address(pods.ips[pod]) in cidr, (pod, pods.ips[pod], cidr)


def test_a_backend_pod_is_registered_ready_with_its_labels_and_port(
    cluster_target: ClusterTarget, pods: Pods
) -> None:
    node, (backend, _) = next(iter(pods.by_node.items()))
    pod = cluster_target.get("Pod", backend)
    assert pod["spec"]["nodeName"] == node
    assert pod["status"]["podIP"] == pods.ips[backend]
    assert set(pod["metadata"]["labels"]) == {"t"}
    assert pod["spec"]["containers"][0]["ports"][0]["containerPort"] == PORT
    assert backend in [p["metadata"]["name"] for p in cluster_target.list("pods")]


def test_every_client_reaches_every_backend_by_pod_ip_across_nodes(
    cluster_target: ClusterTarget, pods: Pods
) -> None:
    """The pod network itself (bridge, forwarding, routes between nodes), no Service."""
    for _, client in pods.by_node.values():
        for backend, _ in pods.by_node.values():
            url = f"http://{pods.ips[backend]}:{PORT}/"
            fetch = partial(http_get, cluster_target, url, pod=client)
            assert eventually(fetch) == backend


def test_commands_report_their_exit_code_and_output(
    cluster_target: ClusterTarget, pods: Pods
) -> None:
    _, client = next(iter(pods.by_node.values()))
    done = cluster_target.run_in_pod(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert cluster_target.run_external(["sh", "-c", "echo hi; exit 4"]).returncode == 4
    with pytest.raises(TargetError, match="exit"):
        http_get(cluster_target, "http://127.0.0.1:9/", pod=client, max_time=2)


def test_objects_round_trip_and_deleting_a_missing_one_is_fine(
    cluster_target: ClusterTarget,
) -> None:
    name = f"t-svc-{secrets.token_hex(2)}"
    cluster_target.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"t": name}, "ports": [{"port": 80}]},
        }
    )
    svc = cluster_target.get("svc", name)
    ipaddress.ip_address(svc["spec"]["clusterIP"])
    assert name in [s["metadata"]["name"] for s in cluster_target.list("Service")]
    cluster_target.delete("Service", name)
    cluster_target.delete("Service", name)
    assert name not in [s["metadata"]["name"] for s in cluster_target.list("Service")]


def test_a_removed_pod_is_gone_from_the_registry(cluster_target: ClusterTarget) -> None:
    node = cluster_target.nodes[0].name
    name = f"t-gone-{secrets.token_hex(2)}"
    cluster_target.add_backend_pod(node, name, {"t": "gone"}, PORT)
    cluster_target.remove_pod(name)
    assert name not in [p["metadata"]["name"] for p in cluster_target.list("Pod")]
