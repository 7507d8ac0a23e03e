"""Two nodes end to end: cross-node ClusterIP, NodePort from an outside client (XDP or tc),
traffic policies, health check node ports and terminating endpoints (the semantics of
Kubernetes' Service e2e tests)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ebpflb.cluster import ClientError, Pod, tcp_request
from ebpflb.cluster.netns import Netns
from ebpflb.harness import LbCluster, eventually, until
from ebpflb.objects import Key

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]

_names = itertools.count()


def service(name: str, label: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": label}, "ports": ports, **spec},
    }


class Env:
    """A two-node cluster for the module: a client pod on each node and the outside client."""

    def __init__(self, lb: LbCluster) -> None:
        self.lb = lb
        self.nodes = lb.cluster.nodes
        self.clients = [lb.cluster.add_client_pod(n, f"client{n.index}") for n in self.nodes]
        for c in self.clients:
            lb.wait_attached(c)
        self.outside: Netns = lb.cluster.ns(lb.cluster.external)

    def pod(self, node: int, label: str, ports: list[dict[str, Any]] | None = None) -> Pod:
        p = self.lb.cluster.add_pod(self.nodes[node], f"p{next(_names)}")
        self.lb.register_pod(p, {"app": label}, ports or [])
        self.lb.wait_attached(p)
        return p

    def web(self, node: int, label: str, port: int = 80) -> Pod:
        p = self.pod(node, label)
        self.lb.cluster.start_whoami_server(p, port=port)
        return p

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        obj = self.lb.apply(doc).objects[0].service
        return {
            "ip": obj.spec.cluster_ip,
            "node_ports": [p.node_port for p in obj.spec.ports],
            "hc": obj.spec.health_check_node_port,
        }

    def delete(self, kind: str, name: str, grace: int | None = None) -> None:
        self.lb.api.delete(Key(kind, "default", name), grace_period_seconds=grace)

    def ask(self, ns: Netns, ip: str, port: int, timeout: float = 3.0) -> str:
        """A TCP request to the who-am-I server: '<pod> <peer ip>:<peer port>'."""
        return tcp_request(ns, ip, port, b"", timeout=timeout).strip()

    def from_pod(self, node: int, ip: str, port: int) -> str:
        return self.ask(self.lb.cluster.ns(self.clients[node]), ip, port)

    def from_outside(self, ip: str, port: int) -> str:
        return self.ask(self.outside, ip, port)

    def refused(self, ns: Netns, ip: str, port: int) -> bool:
        with ns.socket() as s:
            s.settimeout(3)
            try:
                s.connect((ip, port))
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        return False

    def http_status(self, ip: str, port: int) -> tuple[int, dict[str, Any]]:
        with self.outside.socket() as s:
            s.settimeout(3)
            s.connect((ip, port))
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with LbCluster(nodes=2) as lb:
        yield Env(lb)


def who(answer: str) -> str:
    return answer.split()[0]


def peer_ip(answer: str) -> str:
    return answer.split()[1].rsplit(":", 1)[0]


# ------------------------------------------------------------------ ClusterIP across nodes


def test_cross_node_cluster_ip_keeps_the_client_pod_ip(env: Env) -> None:
    backend = env.web(1, "xnode")
    svc = env.apply(service("xnode", "xnode", [{"port": 80}]))
    answer = eventually(lambda: env.from_pod(0, svc["ip"], 80))
    assert who(answer) == backend.name
    assert peer_ip(answer) == env.clients[0].ip
    # And from the backend's own node.
    assert peer_ip(eventually(lambda: env.from_pod(1, svc["ip"], 80))) == env.clients[1].ip


# ------------------------------------------------------------------ NodePort


def test_node_port_from_outside_reaches_all_backends_through_every_node(env: Env) -> None:
    backends = {env.web(0, "np").name, env.web(1, "np").name}
    svc = env.apply(service("np", "np", [{"port": 80}], type="NodePort"))
    port = svc["node_ports"][0]
    for node in env.nodes:
        eventually(lambda node=node: env.from_outside(node.ip, port))
        seen = Counter(who(env.from_outside(node.ip, port)) for _ in range(30))
        assert set(seen) == backends, (node.name, seen)
    # ClusterIP keeps working from pods on both nodes.
    for i in range(2):
        assert who(eventually(lambda i=i: env.from_pod(i, svc["ip"], 80))) in backends


def test_udp_node_port(env: Env) -> None:
    p = env.pod(1, "npudp")
    env.lb.cluster.start_udp_echo_server(p, port=5300)
    svc = env.apply(
        service(
            "npudp", "npudp", [{"port": 53, "protocol": "UDP", "targetPort": 5300}], type="NodePort"
        )
    )
    port = svc["node_ports"][0]
    for node in env.nodes:

        def ask(node_ip: str = node.ip) -> str:
            with env.outside.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1)
                s.sendto(b"hi\n", (node_ip, port))
                data, peer = s.recvfrom(1000)
            assert peer == (node_ip, port)
            return data.decode()

        assert eventually(ask).startswith(p.name)


def test_updating_the_node_port_moves_it(env: Env) -> None:
    env.web(0, "move")
    first = env.apply(service("move", "move", [{"port": 80, "nodePort": 31001}], type="NodePort"))
    node_ip = env.nodes[0].ip
    eventually(lambda: env.from_outside(node_ip, 31001))
    env.apply(service("move", "move", [{"port": 80, "nodePort": 31002}], type="NodePort"))
    eventually(lambda: env.from_outside(node_ip, 31002))
    until(lambda: not _answers(env, node_ip, 31001))
    assert first["node_ports"] == [31001]


def _answers(env: Env, ip: str, port: int) -> bool:
    try:
        env.from_outside(ip, port)
        return True
    except ClientError:
        return False


def test_external_traffic_policy_local(env: Env) -> None:
    local = env.web(0, "etplocal")
    svc = env.apply(
        service(
            "etplocal", "etplocal", [{"port": 80}], type="NodePort", externalTrafficPolicy="Local"
        )
    )
    port, hc = svc["node_ports"][0], svc["hc"]
    assert hc
    # The node with the backend: the client's own source address reaches it.
    answer = eventually(lambda: env.from_outside(env.nodes[0].ip, port))
    assert who(answer) == local.name
    assert peer_ip(answer) == env.lb.cluster.external.ip
    # The node without one refuses.
    until(lambda: env.refused(env.outside, env.nodes[1].ip, port))
    # Health check node port: 200 with the local count there, 503 on the other node.
    status, body = eventually(lambda: env.http_status(env.nodes[0].ip, hc))
    assert (status, body["localEndpoints"]) == (200, 1)
    status, body = eventually(lambda: env.http_status(env.nodes[1].ip, hc))
    assert (status, body["localEndpoints"]) == (503, 0)


def test_external_traffic_policy_cluster_source_is_the_node(env: Env) -> None:
    remote = env.web(1, "etpcluster")
    svc = env.apply(service("etpcluster", "etpcluster", [{"port": 80}], type="NodePort"))
    port = svc["node_ports"][0]
    answer = eventually(lambda: env.from_outside(env.nodes[0].ip, port))
    assert who(answer) == remote.name
    assert peer_ip(answer) == env.nodes[0].ip  # SNAT to the node that got the packet


def test_terminating_endpoints_take_over_when_no_ready_one_is_left(env: Env) -> None:
    a = env.web(0, "term")
    svc = env.apply(service("term", "term", [{"port": 80}], type="NodePort"))
    eventually(lambda: env.from_pod(1, svc["ip"], 80))
    env.delete("Pod", a.name, grace=60)  # terminating, still serving
    # Only a terminating endpoint left: it still gets new connections, from anywhere.
    assert who(eventually(lambda: env.from_pod(1, svc["ip"], 80))) == a.name
    assert (
        who(eventually(lambda: env.from_outside(env.nodes[1].ip, svc["node_ports"][0]))) == a.name
    )
    # A ready one appears: new connections go to it only.
    b = env.web(1, "term")
    until(lambda: {who(env.from_pod(0, svc["ip"], 80)) for _ in range(10)} == {b.name})


def test_terminating_fallback_under_local_policies(env: Env) -> None:
    a = env.web(0, "termlocal")
    svc = env.apply(
        service(
            "termlocal",
            "termlocal",
            [{"port": 80}],
            type="NodePort",
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
        )
    )
    port = svc["node_ports"][0]
    eventually(lambda: env.from_outside(env.nodes[0].ip, port))
    env.delete("Pod", a.name, grace=60)
    # Node 0's health check says no ready local endpoint once its agent has the endpoint
    # terminating (before that the endpoint serves as a ready one: nothing to see yet)...
    until(lambda: env.http_status(env.nodes[0].ip, svc["hc"])[0] == 503)
    # ...while node-local fallback has the same node's terminating endpoint serve its
    # clients, and the NodePort's...
    assert who(eventually(lambda: env.from_pod(0, svc["ip"], 80))) == a.name
    assert who(eventually(lambda: env.from_outside(env.nodes[0].ip, port))) == a.name
    # ...but not the other node's: nothing local there.
    until(lambda: env.refused(env.lb.cluster.ns(env.clients[1]), svc["ip"], 80))
    until(lambda: env.refused(env.outside, env.nodes[1].ip, port))


def test_a_service_deleted_and_recreated_works(env: Env) -> None:
    p = env.web(1, "again")
    doc = service("again", "again", [{"port": 80, "nodePort": 31010}], type="NodePort")
    env.apply(doc)
    eventually(lambda: env.from_outside(env.nodes[0].ip, 31010))
    env.delete("Service", "again")
    until(lambda: not _answers(env, env.nodes[0].ip, 31010))
    svc = env.apply(doc)
    assert who(eventually(lambda: env.from_outside(env.nodes[0].ip, 31010))) == p.name
    assert who(eventually(lambda: env.from_pod(0, svc["ip"], 80))) == p.name


def test_udp_node_port_reaches_a_replacement_pod_within_a_second(env: Env) -> None:
    old = env.pod(0, "udpnp")
    env.lb.cluster.start_udp_echo_server(old, port=5301)
    svc = env.apply(
        service(
            "udpnp", "udpnp", [{"port": 53, "protocol": "UDP", "targetPort": 5301}], type="NodePort"
        )
    )
    port = svc["node_ports"][0]

    def ask(timeout: float) -> str:
        with env.outside.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", 40002))
            s.settimeout(timeout)
            s.sendto(b"hi\n", (env.nodes[0].ip, port))
            return s.recvfrom(1000)[0].decode()

    assert eventually(lambda: ask(1.0)).startswith(old.name)
    new = env.pod(1, "udpnp")
    env.lb.cluster.start_udp_echo_server(new, port=5301)
    env.delete("Pod", old.name)
    t0 = time.monotonic()

    def from_new() -> None:
        assert ask(0.2).startswith(new.name)

    eventually(from_new, timeout=10, interval=0.02)
    assert time.monotonic() - t0 < 1.0


def test_no_endpoint_node_port_is_refused(env: Env) -> None:
    svc = env.apply(service("npempty", "npempty", [{"port": 80}], type="NodePort"))
    until(lambda: env.refused(env.outside, env.nodes[0].ip, svc["node_ports"][0]))
    with env.outside.socket() as s:
        s.settimeout(3)
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            s.connect((env.nodes[1].ip, svc["node_ports"][0]))
        assert time.monotonic() - t0 < 1.0  # refused at once, never a timeout
