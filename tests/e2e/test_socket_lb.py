"""Socket-level load balancing end to end: two nodes whose agents run with
--socket-lb-cgroup (each node's processes in a cgroup of its own). A client process in a
pod reaches local and remote backends through a ClusterIP with no NAT on any packet, reads
the VIP as its peer, and keeps working across an agent kill; a process outside the cgroup
(a socket this test process makes in the pod's namespace) still gets the tc path."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ebpflb.cluster import Pod, tcp_request
from ebpflb.cluster.cgroups import attached_programs
from ebpflb.datapath.compile import SOCK_ATTACH_TYPES
from ebpflb.datapath.maps import LbMaps
from ebpflb.harness import LbCluster, eventually, until
from tests.datapath.conftest import SOCK_LB_HOOKS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, BPF and cgroups"),
]

# argv: JSON list of [kind, ip, port]; prints a JSON list of {"peer": [ip, port] the socket
# reports (getpeername, or the datagram's source), "answer": the server's line, "error"};
# a connected UDP socket reports both: "peer" from getpeername, "from" the datagram's source.
CLIENT = """
import json, socket, sys
def run(kind, ip, port):
    out = {"peer": None, "from": None, "answer": None, "error": None}
    try:
        if kind == "tcp":
            with socket.create_connection((ip, port), timeout=3) as s:
                out["peer"] = s.getpeername()
                s.shutdown(socket.SHUT_WR)
                got = b""
                while d := s.recv(4096):
                    got += d
        elif kind == "udp-connected":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((ip, port))
                out["peer"] = s.getpeername()
                s.send(b"ping")
                got, out["from"] = s.recvfrom(4096)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(b"ping", (ip, port))
                got, out["peer"] = s.recvfrom(4096)
        out["answer"] = got.decode().strip()
    except OSError as e:
        out["error"] = str(e)
    return out
print(json.dumps([run(*c) for c in json.loads(sys.argv[1])]))
"""


def service(name: str, label: str, port: int, protocol: str = "TCP") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": label},
            "ports": [{"port": port, "targetPort": port, "protocol": protocol}],
        },
    }


@pytest.fixture(scope="module")
def lb() -> Iterator[LbCluster]:
    with LbCluster(2, socket_lb=True) as lb:
        yield lb


def dial(lb: LbCluster, pod: Pod, calls: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Run the client as a process of the pod (so in its node's cgroup)."""
    done = lb.cluster.ns(pod).run(
        [sys.executable, "-c", CLIENT, json.dumps(calls)], timeout=60, check=True
    )
    return list(json.loads(done.stdout))


def counters(lb: LbCluster, node: int) -> dict[str, int]:
    maps = LbMaps.open(lb.pin_dir(lb.cluster.nodes[node]))
    try:
        return maps.counter_totals()
    finally:
        maps.close()


def ours_attached(lb: LbCluster, node: int) -> Counter[tuple[str, str]]:
    """(hook, program name) of the programs attached to the node's cgroup."""
    cgroup = lb.cluster.nodes[node].cgroup
    assert cgroup is not None
    return Counter((p.attach_type, p.name) for p in attached_programs(cgroup))


OUR_HOOKS = SOCK_LB_HOOKS  # one program per hook, none at sock_release


def test_pods_reach_local_and_remote_backends_without_nat(lb: LbCluster) -> None:
    assert {name for _, name in OUR_HOOKS} == set(SOCK_ATTACH_TYPES)
    nodes = lb.cluster.nodes
    client = lb.cluster.add_client_pod(nodes[0], "sclient")
    backends = []
    for i, node in enumerate(nodes):
        p = lb.cluster.add_pod(node, f"sweb{i}")
        lb.register_pod(p, {"app": "sweb"}, [])
        lb.cluster.start_whoami_server(p, port=80)
        lb.cluster.start_udp_echo_server(p, port=53)
        backends.append(p)
    for p in (client, *backends):
        lb.wait_attached(p)
    tcp_ip = lb.apply(service("sweb", "sweb", 80)).objects[0].service.spec.cluster_ip
    udp_ip = lb.apply(service("sdns", "sweb", 53, "UDP")).objects[0].service.spec.cluster_ip
    until(lambda: "sweb1" in tcp_request(lb.cluster.ns(client), tcp_ip, 80, b""), timeout=30)
    until(lambda: ours_attached(lb, 0) == OUR_HOOKS)

    before = counters(lb, 0)
    calls = [("tcp", tcp_ip, 80)] * 40 + [("udp", udp_ip, 53)] * 20
    calls += [("udp-connected", udp_ip, 53)] * 10
    results = dial(lb, client, calls)
    after = counters(lb, 0)

    assert [r["error"] for r in results] == [None] * len(calls)
    assert {tuple(r["peer"]) for r in results[:40]} == {(tcp_ip, 80)}
    assert {tuple(r["peer"]) for r in results[40:]} == {(udp_ip, 53)}
    assert {tuple(r["from"]) for r in results[60:]} == {(udp_ip, 53)}
    # Each answer names the backend and the source it saw: the client pod itself.
    answered = Counter(r["answer"].split()[0] for r in results)
    assert set(answered) == {"sweb0", "sweb1"}
    assert {r["answer"].split()[1].rsplit(":", 1)[0] for r in results} == {client.ip}
    assert after["sock_xlate"] - before["sock_xlate"] == len(calls)
    # No packet of those connections was DNATed by tc (counters are node-wide: the
    # agent's health checks make none here).
    assert after["dnat"] == before["dnat"]

    # A socket of a process in no node's cgroup (this one's, made in the pod's namespace)
    # takes the tc path: DNATed per packet.
    def outside_cgroup() -> str:
        with socket.create_connection((tcp_ip, 80), timeout=3) as s:
            s.shutdown(socket.SHUT_WR)
            return s.recv(4096).decode()

    assert "sweb" in lb.cluster.ns(client).call(outside_cgroup)
    assert counters(lb, 0)["dnat"] > after["dnat"]


def test_an_agent_killed_and_restarted_keeps_one_attachment_and_balancing(
    lb: LbCluster,
) -> None:
    node = lb.cluster.nodes[0]
    client = lb.cluster.add_client_pod(node, "sclient2")
    web = lb.cluster.add_pod(node, "sweb9")
    lb.register_pod(web, {"app": "sweb9"}, [])
    lb.cluster.start_whoami_server(web, port=80)
    lb.wait_attached(client)
    lb.wait_attached(web)
    ip = lb.apply(service("sweb9", "sweb9", 80)).objects[0].service.spec.cluster_ip
    until(lambda: "sweb9" in tcp_request(lb.cluster.ns(client), ip, 80, b""), timeout=30)

    lb.stop_agent(node, signal.SIGKILL)
    # While no agent runs, the attachment (and the pinned maps) keep balancing.
    down = dial(lb, client, [("tcp", ip, 80)] * 5)
    assert [r["error"] for r in down] == [None] * 5
    assert {tuple(r["peer"]) for r in down} == {(ip, 80)}

    lb.start_agent(node)
    lb.wait_attached(client)
    assert eventually(lambda: ours_attached(lb, 0)) == OUR_HOOKS
    up = dial(lb, client, [("tcp", ip, 80)] * 5)
    assert [r["answer"].split()[0] for r in up] == ["sweb9"] * 5
