"""A namespace cluster running ebpflb: a registry, an agent per node, pods registered as Pods."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient
from ebpflb.cluster import Cluster, Node, Pod
from ebpflb.cluster.cleanup import cleanup_stale, untrack
from ebpflb.objects import from_manifest

PIN_ROOT = Path("/sys/fs/bpf/ebpflb")
EBPFLB = [sys.executable, "-m", "ebpflb"]
T = TypeVar("T")


def until(cond: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Wait for cond() to hold, retrying whatever it raises meanwhile."""

    def check() -> None:
        assert cond()

    eventually(check, timeout, interval)


def remove_cluster(prefix: str) -> list[str]:
    """Take down a cluster left running: its processes, namespaces, temp files and pins."""
    removed = cleanup_stale(prefix)
    for node_pins in PIN_ROOT.glob(f"{prefix}-*"):
        shutil.rmtree(node_pins, ignore_errors=True)
        removed.append(f"pins {node_pins}")
    _remove_pin_root()
    return removed


def _remove_pin_root() -> None:
    """rmdir the shared pin folder once no cluster (or agent) uses it."""
    with contextlib.suppress(OSError):
        PIN_ROOT.rmdir()


def eventually(fn: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """fn()'s first result that raises nothing, retried until timeout (then its last error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


class LbCluster:
    """Cluster + `ebpflb registry` + `ebpflb agent` in every node namespace.

    The registry listens on a unix socket in the cluster's work folder (no
    network). Each agent runs in its node's network namespace through
    `nsenter --net` (not `ip netns exec`, which remounts /sys and would hide the
    bpffs where the agent pins its maps). close() stops them all and removes
    their pins, also after a failure.

    With `cgroups` the cluster puts each node's processes (its agent included)
    in a cgroup of its own (see Cluster). `socket_lb` implies it and also
    tells each agent to attach the socket load balancer to its node's cgroup
    (`--socket-lb-cgroup`)."""

    def __init__(
        self,
        nodes: int = 1,
        *,
        start_agents: bool = True,
        agent_args: Sequence[str] = (),
        cgroups: bool = False,
        socket_lb: bool = False,
    ) -> None:
        self.socket_lb = socket_lb
        self.cluster = Cluster(nodes, cgroups=cgroups or socket_lb)
        self.prefix = self.cluster.prefix
        self.workdir = self.cluster.workdir
        self.address = f"unix://{self.workdir}/registry.sock"
        self.registry_proc: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_args = tuple(agent_args)  # added to every agent's command line
        self.client: RegistryClient | None = None
        try:
            self.start_registry()
            self.client = RegistryClient(self.address, timeout=30)
            if start_agents:
                for node in self.cluster.nodes:
                    self.start_agent(node)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ processes

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)

    def start_registry(self) -> None:
        with self._log("registry") as out:
            self.registry_proc = subprocess.Popen(
                [
                    *EBPFLB,
                    "registry",
                    "--listen",
                    self.address,
                    "--store",
                    f"sqlite://{self.workdir}/registry.db",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        probe = RegistryClient(self.address, timeout=2)
        try:

            def up() -> None:
                assert self.registry_proc is not None
                if self.registry_proc.poll() is not None:
                    raise SystemExit(f"the registry exited; see {self.workdir}/registry.log")
                probe.list(kind="Node")

            eventually(up, timeout=60)
        finally:
            probe.close()

    def pin_dir(self, node: Node) -> Path:
        return PIN_ROOT / f"{self.prefix}-{node.name}"

    def agent_argv(self, node: Node, extra: Sequence[str] = ()) -> list[str]:
        """The command line of `node`'s agent, in the node's namespace and cgroup."""
        socket_lb = ["--socket-lb-cgroup", str(node.cgroup)] if self.socket_lb else []
        return [
            *self.cluster.ns(node).exec_prefix(host_mounts=True),
            *EBPFLB,
            "agent",
            "--registry",
            self.address,
            "--node",
            node.name,
            "--node-ip",
            node.ip,
            "--pod-cidr",
            node.pod_cidr,
            "--pin-dir",
            str(self.pin_dir(node)),
            *socket_lb,
            *self.agent_args,
            *extra,
        ]

    def start_agent(self, node: Node, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        with self._log(f"agent-{node.name}") as out:
            proc = subprocess.Popen(
                self.agent_argv(node, extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "EBPFLB_CLUSTER": self.prefix},
            )
        self.agents[node.name] = proc
        return proc

    def stop_agent(self, node: Node, sig: int = signal.SIGTERM) -> None:
        proc = self.agents.pop(node.name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def agent_log(self, node: Node) -> str:
        p = self.workdir / f"agent-{node.name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_attached(self, pod: Pod, timeout: float = 60.0) -> None:
        """Until the pod's host veth has our program at tc ingress."""
        node = self.cluster.node(pod.node)
        ns = self.cluster.ns(node)

        from ebpflb.cluster.netns import in_netns
        from ebpflb.datapath.loader import tc_programs

        def attached() -> None:
            where = partial(tc_programs, pod.host_veth, "ingress")
            names = [name for name, _ in in_netns(ns.name, where)]
            if "from_pod" not in names:
                raise AssertionError(f"{pod.host_veth}: no program yet")

        eventually(attached, timeout=timeout, interval=0.1)

    # ------------------------------------------------------------ objects

    @property
    def api(self) -> RegistryClient:
        assert self.client is not None
        return self.client

    def apply(self, *docs: Mapping[str, Any]) -> pb.ApplyResponse:
        return self.api.apply([from_manifest(dict(d)) for d in docs])

    def register_pod(
        self,
        pod: Pod,
        labels: Mapping[str, str],
        ports: Sequence[Mapping[str, Any]] = (),
        *,
        ready: bool = True,
    ) -> pb.Object:
        """Apply `pod` as a Pod object: its IP, node, labels and container ports."""
        doc = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "labels": dict(labels)},
            "spec": {
                "nodeName": pod.node,
                "containers": [{"name": "main", "ports": [dict(p) for p in ports]}],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
        return self.apply(doc).objects[0]

    def cluster_ip(self, service: str, namespace: str = "default") -> str:
        from ebpflb.objects import Key

        return self.api.get(Key("Service", namespace, service)).service.spec.cluster_ip

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(Exception):
                self.stop_agent(self.cluster.node(name))
        if self.client is not None:
            self.client.close()
        if self.registry_proc is not None and self.registry_proc.poll() is None:
            self.registry_proc.terminate()
            try:
                self.registry_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.registry_proc.kill()
                self.registry_proc.wait(timeout=10)
        try:
            self.cluster.close()
        finally:
            for node_pins in PIN_ROOT.glob(f"{self.prefix}-*"):
                shutil.rmtree(node_pins, ignore_errors=True)
            _remove_pin_root()

    def keep(self) -> None:
        """Leave everything running when this process exits (`ebpflb demo --keep`);
        remove_cluster(prefix) takes it down later."""
        untrack(self.cluster)
        self.agents.clear()
        self.registry_proc = None

    def __enter__(self) -> LbCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
