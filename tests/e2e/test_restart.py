"""Hitless agent restarts: kill -9 the agent under steady traffic, change the registry while
it is down, start it again: no failed connection, no reset, the same maps, the change applied."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ebpflb.cluster import Pod
from ebpflb.cluster.netns import Netns
from ebpflb.datapath.maps import LbMaps, Row
from ebpflb.harness import LbCluster, eventually, until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]


def service(name: str, label: str, port: int = 80, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": label}, "ports": [{"port": port, "targetPort": 80}], **spec},
    }


@dataclass
class Traffic:
    """Steady load on a VIP from a pod: long keep-alive connections sending a request
    every 50 ms, and new short connections at about 40 a second."""

    ns: Netns
    vip: str
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    long_requests: int = 0
    new_connections: int = 0
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def _long(self) -> None:
        try:
            with self.ns.socket() as s:
                s.settimeout(5)
                s.connect((self.vip, self.port))
                f = s.makefile("rb")
                while not self.stop.is_set():
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    status = f.readline()
                    length = 0
                    while (line := f.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    f.read(length)
                    if not status.startswith(b"HTTP/1.1 200"):
                        self._fail(f"long connection: {status!r}")
                        return
                    with self._lock:
                        self.long_requests += 1
                    time.sleep(0.05)
        except OSError as e:
            self._fail(f"long connection: {e!r}")

    def _short(self) -> None:
        while not self.stop.is_set():
            try:
                with self.ns.socket() as s:
                    s.settimeout(5)
                    s.connect((self.vip, self.port))
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    self._fail(f"new connection: {data[:40]!r}")
                with self._lock:
                    self.new_connections += 1
            except OSError as e:
                self._fail(f"new connection: {e!r}")
            time.sleep(0.025)

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        """The load runs inside the with block; on leaving it, it stops and is waited for."""
        threads = [threading.Thread(target=self._long) for _ in range(3)]
        threads.append(threading.Thread(target=self._short))
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=30)


def map_ids(pin_dir: str) -> dict[str, int]:
    out = {}
    for name in ("services", "backends", "conntrack", "affinity"):
        info = subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", f"{pin_dir}/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out[name] = int(json.loads(info)["id"])
    return out


def balancing_entries(pin_dir: Path) -> dict[str, set[tuple[Row, Row]]]:
    """What the agent programs: the entries of the four maps it writes."""
    maps = LbMaps.open(pin_dir)
    try:
        return {
            "services": set(maps.services.rows()),
            "backends": set(maps.backends.rows()),
            "service_backends": set(maps.service_backends.rows()),
            "service_members": set(maps.service_members.rows()),
        }
    finally:
        maps.close()


@pytest.fixture(scope="module")
def lb() -> Iterator[LbCluster]:
    with LbCluster(nodes=1) as lb:
        yield lb


def add_web(lb: LbCluster, label: str, name: str, attached: bool = True, node: int = 0) -> Pod:
    p = lb.cluster.add_pod(lb.cluster.nodes[node], name)
    lb.cluster.start_http_server(p, port=80)
    lb.register_pod(p, {"app": label}, [])
    if attached:
        lb.wait_attached(p)
    return p


@dataclass
class Steady:
    """A ClusterIP Service with two backends on node 0 and a client pod beside them."""

    ns: Netns
    vip: str

    def answers(self, ip: str, port: int) -> None:
        with self.ns.socket() as s:
            s.settimeout(2)
            s.connect((ip, port))


def steady_service(lb: LbCluster, label: str, client_name: str | None = None) -> Steady:
    """Two backends labelled `label`, a Service over them and a client pod; returns once
    the client reaches the Service."""
    node = lb.cluster.nodes[0]
    client = (
        lb.cluster.add_client_pod(node, client_name)
        if client_name
        else lb.cluster.add_client_pod(node)
    )
    lb.wait_attached(client)
    for i in range(2):
        add_web(lb, label, f"{label}{i}")
    lb.apply(service(label, label))
    steady = Steady(lb.cluster.ns(client), lb.cluster_ip(label))
    eventually(lambda: steady.answers(steady.vip, 80))
    return steady


def test_kill_9_and_restart_the_agent_under_traffic(lb: LbCluster) -> None:
    node = lb.cluster.nodes[0]
    steady = steady_service(lb, "steady")
    ns, vip, answers = steady.ns, steady.vip, steady.answers
    before = map_ids(str(lb.pin_dir(node)))
    traffic = Traffic(ns, vip, 80)
    with traffic.running():
        time.sleep(1)
        for round_ in range(2):
            lb.stop_agent(node, signal.SIGKILL)
            # While it is down: a new Service is created in the registry.
            name = f"while-down{round_}"
            pod = add_web(lb, name, f"{name}-pod", attached=False)
            lb.apply(service(name, name, port=8080))
            time.sleep(1)
            lb.start_agent(node)
            lb.wait_attached(pod)  # a veth made while the agent was down
            new_vip = lb.cluster_ip(name)
            eventually(lambda new_vip=new_vip: answers(new_vip, 8080), timeout=60)
            time.sleep(1)
    assert traffic.failures == []
    assert traffic.long_requests > 50 and traffic.new_connections > 50
    assert map_ids(str(lb.pin_dir(node))) == before  # adopted, not recreated
    print(
        f"\nagent killed twice: {traffic.new_connections} new connections and "
        f"{traffic.long_requests} requests on 3 long connections, 0 failed"
    )


def test_kill_9_and_restart_the_agent_under_node_port_traffic() -> None:
    """The same through a NodePort on a two-node cluster, from the outside client to node 0,
    whose agent is killed: backends on node 0 (DNAT) and on node 1 (DNAT + SNAT, the reply
    reverse-translated by node 0's external program), a NodePort Service made while it is
    down served after it returns."""
    with LbCluster(nodes=2) as lb:
        node = lb.cluster.nodes[0]
        for i in range(2):
            add_web(lb, "npsteady", f"npsteady{i}", node=i)
        port = lb.apply(service("npsteady", "npsteady", type="NodePort"))
        node_port = port.objects[0].service.spec.ports[0].node_port
        outside = lb.cluster.ns(lb.cluster.external)

        def answers(port: int) -> None:
            with outside.socket() as s:
                s.settimeout(2)
                s.connect((node.ip, port))

        eventually(lambda: answers(node_port))
        before = map_ids(str(lb.pin_dir(node)))
        traffic = Traffic(outside, node.ip, node_port)
        with traffic.running():
            time.sleep(1)
            for round_ in range(2):
                lb.stop_agent(node, signal.SIGKILL)
                name = f"np-while-down{round_}"
                pod = add_web(lb, name, f"{name}-pod", attached=False)
                svc = lb.apply(service(name, name, port=8080, type="NodePort"))
                new_port = svc.objects[0].service.spec.ports[0].node_port
                time.sleep(1)
                lb.start_agent(node)
                lb.wait_attached(pod)
                eventually(lambda new_port=new_port: answers(new_port), timeout=60)
                time.sleep(1)
        resets = sum("Reset" in f for f in traffic.failures)
        print(
            f"\nNodePort, agent killed twice: {traffic.new_connections} new connections and "
            f"{traffic.long_requests} requests on 3 long connections from outside, "
            f"{len(traffic.failures)} failed, {resets} resets"
        )
        assert traffic.failures == []
        assert traffic.long_requests > 50 and traffic.new_connections > 50
        assert map_ids(str(lb.pin_dir(node))) == before  # adopted, not recreated


def test_the_datapath_keeps_working_while_the_registry_is_down(lb: LbCluster) -> None:
    node = lb.cluster.nodes[0]
    client = lb.cluster.add_client_pod(node, "client-r")
    lb.wait_attached(client)
    add_web(lb, "regdown", "regdown0")
    lb.apply(service("regdown", "regdown"))
    vip = lb.cluster_ip("regdown")
    ns = lb.cluster.ns(client)

    def get() -> str:
        """The body (the backend pod's name); raises unless the answer is a 200."""
        with ns.socket() as s:
            s.settimeout(2)
            s.connect((vip, 80))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), head
        return body.strip()

    eventually(get)
    full_syncs = lb.agent_log(node).count("full sync (")
    assert full_syncs >= 1
    assert lb.registry_proc is not None
    lb.registry_proc.send_signal(signal.SIGKILL)
    lb.registry_proc.wait(timeout=10)
    assert {get() for _ in range(20)} == {"regdown0"}
    lb.start_registry()
    # The agent resumes its watch: a new backend added afterwards takes traffic.
    add_web(lb, "regdown", "regdown1")

    def both() -> None:
        assert {get() for _ in range(20)} == {"regdown0", "regdown1"}

    eventually(both, timeout=60)
    # It resumed from the revisions it had seen: no relist, no full reprogramming.
    log = lb.agent_log(node)
    assert "relisting" not in log
    assert log.count("full sync (") == full_syncs, log[-3000:]


def test_registry_kill_9_leaves_the_datapath_alone_and_the_watch_resumes(lb: LbCluster) -> None:
    """kill -9 the registry under ClusterIP traffic: while it is down the agent changes no map
    entry and traffic flows; after it restarts (same store) the agent resumes its watches from
    the revision it had (no relist, so no reprogramming from a fresh listing: the log says
    which), and a Service made then reaches the maps beside the old entries, all unchanged."""
    node = lb.cluster.nodes[0]
    steady = steady_service(lb, "regkill", "client-regkill")
    ns, vip, answers = steady.ns, steady.vip, steady.answers
    pins = lb.pin_dir(node)
    before = balancing_entries(pins)
    log_start = len(lb.agent_log(node))
    traffic = Traffic(ns, vip, 80)
    with traffic.running():
        time.sleep(1)
        assert lb.registry_proc is not None
        lb.registry_proc.send_signal(signal.SIGKILL)
        lb.registry_proc.wait(timeout=10)
        # Down long enough for the agent's watches to fail and retry several times.
        until(lambda: lb.agent_log(node)[log_start:].count("retrying in") >= 4, timeout=30)
        time.sleep(2)
        assert balancing_entries(pins) == before
        down_connections = traffic.new_connections
        lb.start_registry()
        lb.apply(service("regkill-after", "regkill", port=8080))
        new_vip = lb.cluster_ip("regkill-after")
        eventually(lambda: answers(new_vip, 8080), timeout=60)
        time.sleep(1)
    after = balancing_entries(pins)
    log = lb.agent_log(node)[log_start:]
    print(
        f"\nregistry killed: {traffic.new_connections} new connections "
        f"({down_connections} by the time it restarted) and {traffic.long_requests} requests "
        f"on 3 long connections, {len(traffic.failures)} failed; agent log: "
        f"{log.count('retrying in')} watch retries, {log.count('relisting')} relists, "
        f"{log.count('full sync (')} full syncs"
    )
    assert traffic.failures == []
    assert traffic.new_connections > down_connections > 0
    for name, entries in before.items():
        assert entries <= after[name], f"{name}: entries changed: {entries - after[name]}"
    assert len(after["services"]) == len(before["services"]) + 1
    assert "relisting" not in log and "full sync (" not in log
