"""Where the multi-node e2e suite runs: a namespace cluster here, or the Vagrant VMs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[2]
TARGET_ENV = "EBPFLB_TARGET"
TARGETS = ("netns", "vagrant")

Completed = subprocess.CompletedProcess[str]


class TargetError(RuntimeError):
    """A step on the target failed (the message says which, with its output)."""


@dataclass(frozen=True)
class NodeRef:
    """A node: the name its agent registered, and its IP (what NodePort clients dial)."""

    name: str
    ip: str


class ClusterTarget(Protocol):
    """A running cluster the suite drives: nodes with an agent each, a registry, pods,
    and a client outside the cluster. Pods are named by the caller (unique per target).

    Objects go in and out as manifests, the dicts `ebpflb apply -f` reads and
    `ebpflb get -o json` prints, so a test reads the same on either target."""

    kind: str
    """"netns" or "vagrant"."""

    @property
    def nodes(self) -> tuple[NodeRef, ...]: ...

    def add_backend_pod(
        self, node: str, name: str, labels: Mapping[str, str], port: int = 80
    ) -> str:
        """A pod on `node` whose HTTP server answers "<name>\\n" on `port`, registered
        as a ready Pod with `labels` and that container port, with the datapath
        attached to its veth. Returns its IP."""
        ...

    def add_client_pod(self, node: str, name: str) -> str:
        """A pod on `node` to run clients in (not registered), datapath attached. Its IP."""
        ...

    def remove_pod(self, name: str) -> None:
        """Delete the Pod object (no grace period) and the pod itself."""
        ...

    def run_in_pod(self, pod: str, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        """Run argv inside the pod's network namespace; its exit code and output."""
        ...

    def run_external(self, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        """Run argv on the client outside the cluster (the namespace cluster's
        external namespace; the control VM), which has no route to any pod."""
        ...

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        """Create or update objects, all at once (`ebpflb apply`)."""
        ...

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """One object (namespace default, if the kind has namespaces) as a manifest."""
        ...

    def list(self, kind: str) -> list[dict[str, Any]]:
        """Every object of a kind, in all namespaces, as manifests."""
        ...

    def delete(self, kind: str, name: str) -> None:
        """Delete one object; a missing one is fine."""
        ...

    def close(self) -> None:
        """Undo what this target made (the namespace cluster: all of it; the VMs:
        the pods and objects, leaving the VMs, registry and agents running)."""
        ...


def pod_manifest(
    name: str, node: str, ip: str, labels: Mapping[str, str], port: int
) -> dict[str, Any]:
    """A ready, running Pod with one container port, as there is no kubelet to report it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "ports": [{"containerPort": port, "protocol": "TCP"}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def http_get(
    target: ClusterTarget, url: str, *, pod: str | None = None, max_time: float = 3.0
) -> str:
    """GET url with curl from a pod (or, with no pod, from outside); the body, stripped.
    Raises TargetError unless curl succeeds with a 2xx."""
    argv = ["curl", "-sS", "--fail", "--max-time", f"{max_time:g}", url]
    done = target.run_in_pod(pod, argv) if pod else target.run_external(argv)
    if done.returncode != 0:
        where = f"pod {pod}" if pod else "outside"
        raise TargetError(f"curl {url} from {where}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def selected_target() -> str:
    """$EBPFLB_TARGET, checked: "netns" (the default) or "vagrant"."""
    kind = os.environ.get(TARGET_ENV, "") or "netns"
    if kind not in TARGETS:
        raise ValueError(f"{TARGET_ENV}={kind!r}: want one of {', '.join(TARGETS)}")
    return kind


def make_target(nodes: int = 2) -> ClusterTarget:
    """The target $EBPFLB_TARGET names: a new `nodes`-node namespace cluster, or the VMs
    that `vagrant up` made (as many nodes as the Vagrantfile defines)."""
    if selected_target() == "vagrant":
        return VagrantTarget()
    return NetnsTarget(nodes)


def _kind(word: str) -> tuple[str, bool]:
    """(Kind name, namespaced) for a kind name or alias, as `ebpflb get` accepts them."""
    from ebpflb.objects import kind_named

    k = kind_named(word)
    return k.name, k.namespaced


# ------------------------------------------------------------------ namespaces


class NetnsTarget:
    """ebpflb.harness.LbCluster: nodes, pods and the external client as network
    namespaces on this machine (root), the registry on a unix socket."""

    kind = "netns"

    def __init__(self, nodes: int = 2) -> None:
        from ebpflb.harness import LbCluster

        self.lb = LbCluster(nodes)

    @property
    def nodes(self) -> tuple[NodeRef, ...]:
        return tuple(NodeRef(n.name, n.ip) for n in self.lb.cluster.nodes)

    def add_backend_pod(
        self, node: str, name: str, labels: Mapping[str, str], port: int = 80
    ) -> str:
        pod = self.lb.cluster.add_pod(node, name)
        self.lb.cluster.start_http_server(pod, port=port)
        self.lb.register_pod(pod, labels, [{"containerPort": port, "protocol": "TCP"}])
        self.lb.wait_attached(pod)
        return pod.ip

    def add_client_pod(self, node: str, name: str) -> str:
        pod = self.lb.cluster.add_pod(node, name)
        self.lb.wait_attached(pod)
        return pod.ip

    def remove_pod(self, name: str) -> None:
        self.delete("Pod", name)
        self.lb.cluster.remove_pod(name)

    def run_in_pod(self, pod: str, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        return self.lb.cluster.ns(pod).run(list(argv), timeout=timeout)

    def run_external(self, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        return self.lb.cluster.ns(self.lb.cluster.external).run(list(argv), timeout=timeout)

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        self.lb.apply(*manifests)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        from ebpflb.objects import DEFAULT_NAMESPACE, Key, to_manifest

        kind_name, namespaced = _kind(kind)
        ns = DEFAULT_NAMESPACE if namespaced else ""
        return to_manifest(self.lb.api.get(Key(kind_name, ns, name)))

    def list(self, kind: str) -> list[dict[str, Any]]:
        from ebpflb.objects import to_manifest

        return [to_manifest(o) for o in self.lb.api.list(_kind(kind)[0]).items]

    def delete(self, kind: str, name: str) -> None:
        from ebpflb.client import RegistryError
        from ebpflb.objects import DEFAULT_NAMESPACE, Key

        kind_name, namespaced = _kind(kind)
        key = Key(kind_name, DEFAULT_NAMESPACE if namespaced else "", name)
        try:
            self.lb.api.delete(key, grace_period_seconds=0 if kind_name == "Pod" else None)
        except RegistryError as e:
            if not e.not_found:
                raise

    def close(self) -> None:
        self.lb.close()


# ------------------------------------------------------------------ Vagrant VMs

CONTROL = "control"
"""The VM that runs the registry and plays the client outside the cluster."""
POD_SH = "/opt/ebpflb/deploy/pod.sh"
EBPFLB_BIN = "/opt/ebpflb/.venv/bin/ebpflb"


def _env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile that deploy/provision.sh wrote."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class VagrantTarget:
    """The VMs of the repo's Vagrantfile, after `vagrant up`, driven from this host.

    Commands run over ssh with the configuration `vagrant ssh-config` prints
    (the user, key and port `vagrant ssh NODE -c ...` would use): one Ruby start
    for the whole session instead of one per command, and clean stdin, stdout
    and stderr. Pods are made on the nodes by deploy/pod.sh; objects are applied
    with the `ebpflb` CLI on the control VM against the registry there."""

    kind = "vagrant"

    def __init__(self, project: Path = REPO, vagrant: str = "vagrant", ssh: str = "ssh") -> None:
        self.project = project
        self.vagrant = vagrant
        self.ssh_command = ssh
        self._workdir = Path(tempfile.mkdtemp(prefix="ebpflb-vagrant-"))
        self._pods: dict[str, str] = {}  # pod -> its VM
        self._machines: dict[str, str] = {}  # node name -> its VM
        self._applied: list[tuple[str, str]] = []  # (kind, name), in order
        try:
            machines = self._running_machines()
            if CONTROL not in machines:
                raise TargetError(f"no running {CONTROL} VM: run `vagrant up` in {project}")
            self._ssh_config = self._workdir / "ssh_config"
            self._ssh_config.write_text(self._vagrant("ssh-config", *machines).stdout)
            registry = _env_file(self._cat(CONTROL, "/etc/ebpflb/registry.env"))
            self.registry = registry["EBPFLB_LISTEN"]
            nodes = []
            for machine in machines:
                if machine != CONTROL:
                    node = self._node(machine)
                    self._machines[node.name] = machine
                    nodes.append(node)
            self._nodes = tuple(nodes)
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise

    # ------------------------------------------------------------ plumbing

    def _vagrant(self, *args: str, timeout: float = 120.0) -> Completed:
        argv = [self.vagrant, *args]
        done = subprocess.run(
            argv,
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"},
        )
        if done.returncode != 0:
            raise TargetError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def _running_machines(self) -> list[str]:
        """Names of the running VMs, in the Vagrantfile's order."""
        out = self._vagrant("status", "--machine-readable").stdout
        running = []
        for line in out.splitlines():
            fields = line.split(",")
            if len(fields) >= 4 and fields[2] == "state" and fields[3] == "running":
                running.append(fields[1])
        return running

    def ssh(
        self,
        machine: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 120.0,
        check: bool = False,
    ) -> Completed:
        """Run argv on a VM (as the vagrant user; prefix sudo for root)."""
        cmd = [
            self.ssh_command,
            "-F",
            str(self._ssh_config),
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "--",
            machine,
            shlex.join(argv),
        ]
        done = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise TargetError(
                f"{machine}: {shlex.join(argv)}: exit {done.returncode}: "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def _cat(self, machine: str, path: str) -> str:
        return self.ssh(machine, ["cat", path], check=True).stdout

    def _node(self, machine: str) -> NodeRef:
        env = _env_file(self._cat(machine, "/etc/ebpflb/node.env"))
        return NodeRef(env["EBPFLB_NODE"], env["EBPFLB_NODE_IP"])

    def _ebpflb(self, *args: str, input: str | None = None) -> Completed:
        """The CLI on the control VM, against the registry."""
        argv = [EBPFLB_BIN, "--registry", self.registry, *args]
        return self.ssh(CONTROL, argv, input=input, check=True)

    def _machine_of(self, node: str) -> str:
        try:
            return self._machines[node]
        except KeyError:
            raise KeyError(f"no node {node!r} (nodes: {', '.join(self._machines)})") from None

    def _add_pod(self, node: str, name: str, port: int) -> str:
        machine = self._machine_of(node)
        if name in self._pods:
            raise TargetError(f"pod {name} exists (on {self._pods[name]})")
        done = self.ssh(machine, ["sudo", POD_SH, "add", name, str(port)], check=True)
        self._pods[name] = machine
        return done.stdout.split()[-1]

    # ------------------------------------------------------------ ClusterTarget

    @property
    def nodes(self) -> tuple[NodeRef, ...]:
        return self._nodes

    def add_backend_pod(
        self, node: str, name: str, labels: Mapping[str, str], port: int = 80
    ) -> str:
        ip = self._add_pod(node, name, port)
        self.apply(pod_manifest(name, node, ip, labels, port))
        return ip

    def add_client_pod(self, node: str, name: str) -> str:
        return self._add_pod(node, name, 0)

    def remove_pod(self, name: str) -> None:
        self.delete("Pod", name)
        self._applied = [ref for ref in self._applied if ref != ("Pod", name)]
        machine = self._pods.pop(name, None)
        if machine is not None:
            self.ssh(machine, ["sudo", POD_SH, "del", name], check=True)

    def run_in_pod(self, pod: str, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        machine = self._pods[pod]
        return self.ssh(machine, ["sudo", "ip", "netns", "exec", pod, *argv], timeout=timeout)

    def run_external(self, argv: Sequence[str], timeout: float = 60.0) -> Completed:
        return self.ssh(CONTROL, argv, timeout=timeout)

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": [dict(m) for m in manifests]}
        self._ebpflb("apply", "-f", "-", input=json.dumps(doc))
        for m in manifests:
            ref = (_kind(str(m["kind"]))[0], str(m["metadata"]["name"]))
            if ref not in self._applied:
                self._applied.append(ref)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self._ebpflb("get", kind, name, "-o", "json").stdout)
        return obj

    def list(self, kind: str) -> list[dict[str, Any]]:
        doc = json.loads(self._ebpflb("get", kind, "-A", "-o", "json").stdout)
        items: list[dict[str, Any]] = doc["items"]
        return items

    def delete(self, kind: str, name: str) -> None:
        kind_name, _ = _kind(kind)
        grace = ["--grace-period", "0"] if kind_name == "Pod" else []
        self._ebpflb("delete", kind_name, name, "--ignore-not-found", *grace)

    def close(self) -> None:
        """Delete what this session made, newest first; the VMs stay up for the next run."""
        errors = []
        for pod in reversed(list(self._pods)):
            try:
                self.remove_pod(pod)
            except (TargetError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        for kind, name in reversed(self._applied):
            try:
                self.delete(kind, name)
            except (TargetError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        self._applied.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)
        if errors:
            raise TargetError("cleaning up the VMs: " + "; ".join(errors))
