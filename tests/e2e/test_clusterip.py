"""ClusterIP end to end in a one-node namespace cluster: the registry, the agent, real
nginx/UDP/TCP servers and clients in pods (the semantics of Kubernetes' Service e2e tests)."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ebpflb.agent.links import RESCAN_INTERVAL
from ebpflb.cluster import Pod, Server, tcp_request
from ebpflb.harness import EBPFLB, LbCluster, eventually, until
from ebpflb.objects import Key

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]

_names = itertools.count()


def service(
    name: str, selector: dict[str, str], ports: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": ports, **spec},
    }


class Env:
    """One cluster for the module: backends and clients are made per test with unique names."""

    def __init__(self, lb: LbCluster) -> None:
        self.lb = lb
        self.node = lb.cluster.nodes[0]
        self.client = lb.cluster.add_client_pod(self.node)
        lb.wait_attached(self.client)

    def pod(self, label: str, ports: list[dict[str, Any]] | None = None, ready: bool = True) -> Pod:
        p = self.lb.cluster.add_pod(self.node, f"p{next(_names)}")
        self.lb.register_pod(p, {"app": label}, ports or [], ready=ready)
        self.lb.wait_attached(p)
        return p

    def http(self, pod: Pod, port: int = 80) -> Server:
        return self.lb.cluster.start_http_server(pod, port=port)

    def udp(self, pod: Pod, port: int) -> Server:
        return self.lb.cluster.start_udp_echo_server(pod, port=port)

    def whoami(self, pod: Pod, port: int) -> Server:
        return self.lb.cluster.start_whoami_server(pod, port=port)

    def get(self, ip: str, port: int, client: Pod | None = None, timeout: float = 3.0) -> str:
        """An HTTP/1.0 GET from a pod; the body (nginx answers its pod's name)."""
        ns = self.lb.cluster.ns(client or self.client)
        with ns.socket() as s:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return body.decode().strip()

    def tcp(self, ip: str, port: int, client: Pod | None = None, timeout: float = 3.0) -> str:
        ns = self.lb.cluster.ns(client or self.client)
        return tcp_request(ns, ip, port, b"", timeout=timeout).strip()

    def udp_ask(
        self, ip: str, port: int, source_port: int = 0, timeout: float = 2.0
    ) -> tuple[str, tuple[str, int]]:
        """One datagram from an unconnected socket: (reply, the address it came from)."""
        ns = self.lb.cluster.ns(self.client)
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", source_port))
            s.settimeout(timeout)
            s.sendto(b"hi\n", (ip, port))
            data, peer = s.recvfrom(65535)
        return data.decode().strip(), peer

    def connect_error(
        self, ip: str, port: int, proto: str = "TCP", timeout: float = 5.0
    ) -> tuple[int, float]:
        """(errno, seconds) of a connect (TCP) or a connected send/recv (UDP) that must fail."""
        ns = self.lb.cluster.ns(self.client)
        kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        t0 = time.monotonic()
        with ns.socket(socket.AF_INET, kind) as s:
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
                if proto == "UDP":
                    s.send(b"hi\n")
                    s.recv(100)
            except TimeoutError:
                return errno.ETIMEDOUT, time.monotonic() - t0
            except OSError as e:
                return e.errno or -1, time.monotonic() - t0
        return 0, time.monotonic() - t0

    def apply(self, doc: dict[str, Any]) -> str:
        self.lb.apply(doc)
        return self.lb.cluster_ip(doc["metadata"]["name"])

    def delete(self, kind: str, name: str) -> None:
        ns = "" if kind == "Node" else "default"
        self.lb.api.delete(Key(kind, ns, name))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with LbCluster(nodes=1) as lb:
        yield Env(lb)


def hits(fn: Any, n: int) -> Counter[str]:
    return Counter(fn() for _ in range(n))


# ------------------------------------------------------------------ tests


def test_a_basic_endpoint_is_served_and_follows_pods(env: Env) -> None:
    a = env.pod("basic")
    env.http(a)
    vip = env.apply(service("basic", {"app": "basic"}, [{"port": 80}]))
    assert eventually(lambda: env.get(vip, 80)) == a.name
    b = env.pod("basic")
    env.http(b)
    until(lambda: set(hits(lambda: env.get(vip, 80), 20)) == {a.name, b.name})
    env.delete("Pod", a.name)
    until(lambda: set(hits(lambda: env.get(vip, 80), 10)) == {b.name})


def test_a_new_pod_is_attached_on_its_netlink_event_not_the_periodic_dump(env: Env) -> None:
    """The agent attaches to a pod's veth when the kernel announces it: well within the
    interval of its safety-net dump of the bridge's ports (a pod left to the dump would be
    attached within half the interval one time in two: three in a row, one in eight)."""
    for _ in range(3):
        pod = env.lb.cluster.add_pod(env.node, f"p{next(_names)}")
        t0 = time.monotonic()
        env.lb.wait_attached(pod, timeout=30)
        assert time.monotonic() - t0 < RESCAN_INTERVAL / 2


def test_multiport_with_named_ports(env: Env) -> None:
    p = env.pod(
        "multi", [{"name": "web", "containerPort": 8080}, {"name": "alt", "containerPort": 9090}]
    )
    env.http(p, 8080)
    env.http(p, 9090)
    vip = env.apply(
        service(
            "multi",
            {"app": "multi"},
            [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "https", "port": 81, "targetPort": "alt"},
            ],
        )
    )
    assert eventually(lambda: env.get(vip, 80)) == p.name
    assert eventually(lambda: env.get(vip, 81)) == p.name


def test_tcp_and_udp_on_one_port_number_and_removing_one(env: Env) -> None:
    p = env.pod("dual")
    env.whoami(p, 5353)
    env.udp(p, 5353)
    ports = [
        {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353},
        {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 5353},
    ]
    vip = env.apply(service("dual", {"app": "dual"}, ports))
    assert eventually(lambda: env.udp_ask(vip, 53))[0].startswith(p.name)
    assert p.name in eventually(lambda: env.tcp(vip, 53))
    env.apply(service("dual", {"app": "dual"}, ports[1:]))
    # UDP stops (nothing answers it any more), TCP keeps working.
    until(lambda: env.connect_error(vip, 53, "UDP", timeout=1)[0] != 0)
    assert env.tcp(vip, 53)


def test_hairpin_a_pod_reaches_itself_through_its_service(env: Env) -> None:
    p = env.pod("hairpin")
    env.http(p)
    vip = env.apply(service("hairpin", {"app": "hairpin"}, [{"port": 80}]))
    assert eventually(lambda: env.get(vip, 80, client=p)) == p.name


def test_the_backend_sees_the_client_pods_own_ip(env: Env) -> None:
    p = env.pod("srcip")
    env.whoami(p, 7000)
    vip = env.apply(service("srcip", {"app": "srcip"}, [{"port": 70, "targetPort": 7000}]))
    seen = eventually(lambda: env.tcp(vip, 70))
    assert env.client.ip in seen, seen


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_no_endpoints_is_refused_not_timed_out(env: Env, proto: str) -> None:
    name = f"empty-{proto.lower()}"
    vip = env.apply(service(name, {"app": name}, [{"port": 80, "protocol": proto}]))

    def refused() -> float:
        code, secs = env.connect_error(vip, 80, proto)
        assert code == errno.ECONNREFUSED, os.strerror(code)
        return secs

    eventually(refused)  # programmed
    # Refused at once, every time: never a retransmission or a timeout.
    assert max(refused() for _ in range(5)) < 0.5


def test_a_deleted_service_stops_answering(env: Env) -> None:
    p = env.pod("gone")
    env.http(p)
    vip = env.apply(service("gone", {"app": "gone"}, [{"port": 80}]))
    assert eventually(lambda: env.get(vip, 80)) == p.name
    env.delete("Service", "gone")

    def stopped() -> None:
        code, _ = env.connect_error(vip, 80, timeout=1)
        assert code != 0

    eventually(stopped)


def test_unconnected_udp_client_gets_replies_from_the_vip(env: Env) -> None:
    p = env.pod("udpvip")
    env.udp(p, 5000)
    vip = env.apply(
        service("udpvip", {"app": "udpvip"}, [{"port": 50, "protocol": "UDP", "targetPort": 5000}])
    )
    reply, peer = eventually(lambda: env.udp_ask(vip, 50))
    assert reply.startswith(p.name)
    assert peer == (vip, 50)


def test_a_replaced_udp_server_gets_a_fixed_source_port_within_a_second(env: Env) -> None:
    old = env.pod("udpswap")
    env.udp(old, 5001)
    vip = env.apply(
        service(
            "udpswap", {"app": "udpswap"}, [{"port": 51, "protocol": "UDP", "targetPort": 5001}]
        )
    )
    assert eventually(lambda: env.udp_ask(vip, 51, source_port=40001))[0].startswith(old.name)
    new = env.pod("udpswap")
    env.udp(new, 5001)
    env.delete("Pod", old.name)
    t0 = time.monotonic()

    def from_new() -> None:
        assert env.udp_ask(vip, 51, source_port=40001, timeout=0.2)[0].startswith(new.name)

    eventually(from_new, timeout=10, interval=0.02)
    assert time.monotonic() - t0 < 1.0


def test_session_affinity_sticks_switches_and_times_out(env: Env) -> None:
    pods = [env.pod("sticky") for _ in range(3)]
    for p in pods:
        env.http(p)
    ports = [{"port": 80}]
    sticky = {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 3}},
    }
    vip = env.apply(service("sticky", {"app": "sticky"}, ports, **sticky))
    eventually(lambda: env.get(vip, 80))
    # Affinity on: every connection from the client lands on one backend.
    assert len(hits(lambda: env.get(vip, 80), 30)) == 1
    # Off: spread again.
    env.apply(service("sticky", {"app": "sticky"}, ports))
    until(lambda: len(hits(lambda: env.get(vip, 80), 30)) > 1)
    # On again, then idle past the timeout: a new backend may be chosen.
    env.apply(service("sticky", {"app": "sticky"}, ports, **sticky))
    until(lambda: len(hits(lambda: env.get(vip, 80), 20)) == 1)
    chosen = set()
    for _ in range(8):
        chosen |= set(hits(lambda: env.get(vip, 80), 3))
        time.sleep(3.5)
    assert len(chosen) > 1


def test_the_maps_agree_with_the_registry(env: Env) -> None:
    p = env.pod("shown")
    env.http(p)
    vip = env.apply(service("shown", {"app": "shown"}, [{"port": 8081, "targetPort": 80}]))
    assert eventually(lambda: env.get(vip, 8081)) == p.name
    out = subprocess.run(
        [*EBPFLB, "maps", "--pin-dir", str(env.lb.pin_dir(env.node))],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    row = next(line.split() for line in out.splitlines() if line.startswith(f"{vip}:8081/TCP"))
    assert row == [f"{vip}:8081/TCP", "-", f"{p.ip}:80"]
    assert "dnat=" in out
