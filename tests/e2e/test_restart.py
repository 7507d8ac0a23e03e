"""Hitless agent restarts: kill -9 the agent under steady traffic, change the registry while
it is down, start it again: no failed connection, no reset, the same maps, the change applied."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ebpflb.cluster import Pod
from ebpflb.cluster.netns import Netns
from ebpflb.harness import LbCluster, eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]


def service(name: str, label: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": label}, "ports": [{"port": port, "targetPort": 80}]},
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

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._long) for _ in range(3)]
        threads.append(threading.Thread(target=self._short))
        for t in threads:
            t.start()
        return threads


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


@pytest.fixture(scope="module")
def lb() -> Iterator[LbCluster]:
    with LbCluster(nodes=1) as lb:
        yield lb


def add_web(lb: LbCluster, label: str, name: str, attached: bool = True) -> Pod:
    p = lb.cluster.add_pod(lb.cluster.nodes[0], name)
    lb.cluster.start_http_server(p, port=80)
    lb.register_pod(p, {"app": label}, [])
    if attached:
        lb.wait_attached(p)
    return p


def test_kill_9_and_restart_the_agent_under_traffic(lb: LbCluster) -> None:
    node = lb.cluster.nodes[0]
    client = lb.cluster.add_client_pod(node)
    lb.wait_attached(client)
    for i in range(2):
        add_web(lb, "steady", f"steady{i}")
    lb.apply(service("steady", "steady"))
    vip = lb.cluster_ip("steady")
    ns = lb.cluster.ns(client)

    def answers(ip: str, port: int) -> None:
        with ns.socket() as s:
            s.settimeout(2)
            s.connect((ip, port))

    eventually(lambda: answers(vip, 80))
    before = map_ids(str(lb.pin_dir(node)))
    traffic = Traffic(ns, vip, 80)
    threads = traffic.start()
    try:
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
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(timeout=30)
    assert traffic.failures == []
    assert traffic.long_requests > 50 and traffic.new_connections > 50
    assert map_ids(str(lb.pin_dir(node))) == before  # adopted, not recreated
    print(
        f"\nagent killed twice: {traffic.new_connections} new connections and "
        f"{traffic.long_requests} requests on 3 long connections, 0 failed"
    )


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
