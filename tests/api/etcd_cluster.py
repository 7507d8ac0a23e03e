"""A real etcd cluster on loopback for the tests: members on free ports, data in a temp
folder, every process killed and every file removed on the way out."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_ports(n: int) -> list[int]:
    """n ports nothing listens on now (held open together, so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


class EtcdCluster:
    """`size` etcd members on 127.0.0.1."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        ports = free_ports(2 * size)
        self.members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}") for i in range(size)
        ]

    def start(self, timeout: float = 60) -> None:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for m in self.members:
            peer = f"http://127.0.0.1:{m.peer_port}"
            with open(self.root / f"{m.name}.log", "ab") as log:
                m.proc = subprocess.Popen(
                    [
                        ETCD,
                        f"--name={m.name}",
                        f"--data-dir={m.data_dir}",
                        f"--listen-client-urls={m.client_url}",
                        f"--advertise-client-urls={m.client_url}",
                        f"--listen-peer-urls={peer}",
                        f"--initial-advertise-peer-urls={peer}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-state=new",
                        f"--initial-cluster-token=ebpflb-test-{self.members[0].client_port}",
                        # An Apply of many objects is one transaction (README).
                        "--max-txn-ops=10000",
                        "--max-request-bytes=33554432",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + timeout
        for m in self.members:
            while not self.healthy(m):
                assert m.proc is not None
                if m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: see {self.root}/{m.name}.log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not healthy after {timeout}s")
                time.sleep(0.1)

    @staticmethod
    def healthy(m: Member) -> bool:
        try:
            with urllib.request.urlopen(m.client_url + "/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def leader(self) -> int:
        """The index of the member that leads now."""
        for m in self.members:
            if m.proc is None:
                continue
            req = urllib.request.Request(m.client_url + "/v3/maintenance/status", data=b"{}")
            with urllib.request.urlopen(req, timeout=5) as r:
                status = json.loads(r.read())
            ids = {int(status["header"]["member_id"]): m}
            leader = int(status["leader"])
            for i, other in enumerate(self.members):
                if ids.get(leader) is other:
                    return i
            # Asked a follower: find the leader's index from its member list.
            req = urllib.request.Request(m.client_url + "/v3/cluster/member/list", data=b"{}")
            with urllib.request.urlopen(req, timeout=5) as r:
                members = json.loads(r.read())["members"]
            name = next(x["name"] for x in members if int(x["ID"]) == leader)
            return next(i for i, other in enumerate(self.members) if other.name == name)
        raise RuntimeError("no member runs")

    def url(self, prefix: str, order: list[int] | None = None) -> str:
        """The store URL with the members in `order` (default: as started)."""
        order = order if order is not None else list(range(len(self.members)))
        return "etcd://" + ",".join(self.members[i].endpoint for i in order) + prefix

    def keys(self, prefix: str) -> list[str]:
        """The keys under prefix, read straight from etcd."""
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        body = json.dumps(
            {
                "key": base64.b64encode(start).decode(),
                "range_end": base64.b64encode(end).decode(),
                "keys_only": True,
            }
        ).encode()
        for m in self.members:
            if m.proc is None:
                continue
            req = urllib.request.Request(m.client_url + "/v3/kv/range", data=body)
            with urllib.request.urlopen(req, timeout=5) as r:
                kvs = json.loads(r.read()).get("kvs", [])
            return [base64.b64decode(kv["key"]).decode() for kv in kvs]
        raise RuntimeError("no member runs")

    def kill(self, i: int) -> None:
        """kill -9 member i."""
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        self.members[i].proc = None

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)


@contextmanager
def etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    """A running cluster, gone (processes and data) when the block ends however it ends."""
    root = Path(tempfile.mkdtemp(prefix="ebpflb-etcd-"))
    cluster = EtcdCluster(root, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
