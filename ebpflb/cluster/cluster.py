"""The namespace cluster: nodes with CNI-bridged pods, an underlay joining them, an outsider."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ebpflb.cluster.cgroups import CgroupError, cgroup2_root, make_cgroup, remove_cgroup
from ebpflb.cluster.cleanup import (
    cleanup_stale,
    critical,
    new_prefix,
    track,
    untrack,
    write_owner,
)
from ebpflb.cluster.cni import Attachment, BridgeNetwork, CniError, cni_add, cni_del
from ebpflb.cluster.netns import (
    MARKER_ENV,
    Netns,
    NetnsError,
    add_netns,
    delete_netns,
    ip_batch,
    kill_pids,
    netns_id,
    netns_path,
    pids_in_netns,
    stop_process_groups,
)
from ebpflb.cluster.servers import (
    Server,
    start_http_server,
    start_udp_echo_server,
    start_whoami_server,
)

log = logging.getLogger(__name__)

POD_NETWORK = "10.244.0.0/16"
"""Node i's pods get 10.244.i.0/24, gateway 10.244.i.1 on its bridge."""
UNDERLAY_NETWORK = "192.168.50.0/24"
"""Node i is 192.168.50.(10+i); the external client is 192.168.50.200."""
EXTERNAL_IP = "192.168.50.200"
BRIDGE = "cni0"
UNDERLAY_BRIDGE = "br0"
MAX_NODES = 100

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

# Set in every namespace we make. IPv6 off: no router solicitations, MLD or
# DAD chatter on the veths, so every packet a datapath sees was sent on
# purpose. rp_filter off: the host may default to strict, and a NATing
# datapath makes asymmetric-looking flows on purpose.
_COMMON_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": 1,
    "net.ipv6.conf.default.disable_ipv6": 1,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
}


class ClusterError(RuntimeError):
    """Building or tearing down the cluster failed."""


@dataclass(frozen=True)
class Node:
    """A node: a namespace with the pods' bridge and an interface on the underlay."""

    name: str
    index: int
    netns: str
    ip: str
    """Node IP on the underlay (what NodePort clients dial)."""
    pod_cidr: str
    gateway: str
    """The bridge's address, the pods' default gateway."""
    bridge: str = BRIDGE
    """Made by the CNI plugin at the node's first pod."""
    ifname: str = "eth0"
    """The node's underlay interface."""
    underlay_port: str = ""
    """The peer of `ifname` on the underlay switch's bridge."""
    cgroup: Path | None = None
    """The cgroup v2 folder holding the node's processes and its pods' (None: no cgroups)."""


@dataclass(frozen=True)
class Pod:
    """A pod: a namespace attached to its node's bridge by CNI ADD."""

    name: str
    node: str
    netns: str
    ip: str
    gateway: str
    mac: str
    ifname: str
    """The pod's interface inside its namespace (eth0)."""
    host_veth: str
    """The host side of the pod's veth, in the node's namespace, a port of its bridge."""
    container_id: str


@dataclass(frozen=True)
class External:
    """A client outside the cluster: on the underlay, no route to any pod CIDR."""

    name: str
    netns: str
    ip: str
    ifname: str = "eth0"


Target = Node | Pod | External


class Cluster:
    """N nodes, their pods, an underlay switch and an external client, as network namespaces.

    Everything is named `<prefix>-...` (prefix elb-<6 hex>), lives in
    namespaces this object makes (nothing in the root namespace, no route out)
    and is removed by close(), also at interpreter exit or on SIGTERM.

    With `cgroups`, the cluster also gets a cgroup v2 folder `<prefix>` with
    one child per node (`Node.cgroup`): every process started in a node's
    namespace or in one of its pods', and every socket `Netns.socket` makes
    there, is in that node's cgroup, so BPF programs attached to it (socket
    load balancing) see exactly that node. The underlay and the external
    client stay out. Off by default, because with it sockets come from a
    helper process per namespace (not a thread of this one) and the host
    needs a writable cgroup2 mount.
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        prefix: str | None = None,
        external: bool = True,
        ready_timeout: float = 30.0,
        cgroups: bool = False,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
        self.prefix = prefix or new_prefix()
        self.ready_timeout = ready_timeout
        self.underlay = f"{self.prefix}-underlay"
        self._ns: dict[str, Netns] = {}
        self._nodes: list[Node] = []
        self._networks: dict[str, BridgeNetwork] = {}
        self._pods: dict[str, Pod] = {}
        self._attachments: dict[str, Attachment] = {}
        self._external: External | None = None
        self.cgroup: Path | None = None
        """The cluster's cgroup v2 folder, parent of the nodes' (None without cgroups)."""
        self._closing = False
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        write_owner(self.workdir)
        track(self)
        try:
            self._build(nodes, external, cgroups)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    # Building

    def _new_ns(
        self, name: str, sysctls: dict[str, int] | None = None, cgroup: Path | None = None
    ) -> Netns:
        ns = Netns(name, marker=self.prefix, cgroup=cgroup)
        self._ns[name] = ns  # first, so close() removes it even if `ip netns add` is cut short
        add_netns(name)
        ns.set_sysctls({**_COMMON_SYSCTLS, **(sysctls or {})})
        ns.ip("link", "set", "lo", "up")
        return ns

    def _plug_into_underlay(self, ns: Netns, port: str, ip: str) -> None:
        ip_batch(
            [
                f"link add {port} type veth peer name eth0 netns {ns.name}",
                f"link set {port} master {UNDERLAY_BRIDGE} up",
            ],
            netns=self.underlay,
        )
        ip_batch([f"addr add {ip}/24 dev eth0", "link set eth0 up"], netns=ns.name)

    def _build(self, nodes: int, external: bool, cgroups: bool) -> None:
        if cgroups:
            cgroup = cgroup2_root() / self.prefix
            make_cgroup(cgroup)
            self.cgroup = cgroup
        self._new_ns(self.underlay)
        ip_batch(
            [f"link add {UNDERLAY_BRIDGE} type bridge", f"link set {UNDERLAY_BRIDGE} up"],
            netns=self.underlay,
        )
        for i in range(nodes):
            node = Node(
                name=f"node{i}",
                index=i,
                netns=f"{self.prefix}-node{i}",
                ip=f"192.168.50.{10 + i}",
                pod_cidr=f"10.244.{i}.0/24",
                gateway=f"10.244.{i}.1",
                underlay_port=f"node{i}",
                cgroup=self.cgroup / f"node{i}" if self.cgroup else None,
            )
            if node.cgroup is not None:
                make_cgroup(node.cgroup)
            ns = self._new_ns(node.netns, {"net.ipv4.ip_forward": 1}, cgroup=node.cgroup)
            self._plug_into_underlay(ns, node.underlay_port, node.ip)
            self._nodes.append(node)
            self._networks[node.name] = BridgeNetwork(
                name=f"{self.prefix}-{node.name}",
                bridge=node.bridge,
                subnet=node.pod_cidr,
                gateway=node.gateway,
                data_dir=self.workdir / "cni" / node.name,
            )
        for node in self._nodes:
            routes = [
                f"route add {other.pod_cidr} via {other.ip} dev {node.ifname}"
                for other in self._nodes
                if other is not node
            ]
            if routes:
                ip_batch(routes, netns=node.netns)
        if external:
            ext = External(name="external", netns=f"{self.prefix}-external", ip=EXTERNAL_IP)
            self._plug_into_underlay(self._new_ns(ext.netns), "external", ext.ip)
            self._external = ext

    # Looking things up

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    @property
    def pods(self) -> tuple[Pod, ...]:
        return tuple(self._pods.values())

    @property
    def external(self) -> External:
        if self._external is None:
            raise ClusterError("this cluster was made with external=False")
        return self._external

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Names of every namespace this cluster has made and not yet removed."""
        return tuple(self._ns)

    def node(self, which: int | str) -> Node:
        """A node by index or name ("node0")."""
        for node in self._nodes:
            if which in (node.index, node.name):
                return node
        raise KeyError(f"no node {which!r}")

    def pod(self, name: str) -> Pod:
        return self._pods[name]

    def ns(self, target: Target | str) -> Netns:
        """The namespace handle of a node, pod, the external client, or a namespace name."""
        if isinstance(target, str):
            if target in self._ns:
                return self._ns[target]
            if target in self._pods:
                return self._ns[self._pods[target].netns]
            return self._ns[self.node(target).netns]
        return self._ns[target.netns]

    # Pods

    def add_pod(self, node: Node | int | str, name: str) -> Pod:
        """Make pod `name` on `node`: a namespace attached to the node's bridge by CNI ADD."""
        self._check_open()
        node = node if isinstance(node, Node) else self.node(node)
        if not _NAME.match(name):
            raise ValueError(f"pod name {name!r}: lowercase letters, digits, '-', up to 32")
        if name in self._pods:
            raise ClusterError(f"pod {name} exists (on {self._pods[name].node})")
        netns = f"{self.prefix}-{node.name}-{name}"
        self._new_ns(netns, cgroup=node.cgroup)
        network = self._networks[node.name]
        try:
            att = cni_add(
                network,
                run_in=node.netns,
                cgroup=node.cgroup,
                container_id=netns,
                netns_path=str(netns_path(netns)),
                extra_env={MARKER_ENV: self.prefix},
                timeout=max(60.0, self.ready_timeout),
            )
        except BaseException:
            with critical(), contextlib.suppress(Exception):
                self._cni_del(node, netns, None)
                self._ns.pop(netns)
                delete_netns(netns)
            raise
        pod = Pod(
            name=name,
            node=node.name,
            netns=netns,
            ip=att.ip,
            gateway=att.gateway,
            mac=att.mac,
            ifname=att.ifname,
            host_veth=att.host_veth,
            container_id=att.container_id,
        )
        self._pods[name] = pod
        self._attachments[name] = att
        return pod

    def add_client_pod(self, node: Node | int | str, name: str | None = None) -> Pod:
        """A pod to run clients in (client, client-2, ... unless named)."""
        if name is None:
            n = 1
            name = "client"
            while name in self._pods:
                n += 1
                name = f"client-{n}"
        return self.add_pod(node, name)

    def _cni_del(self, node: Node, container_id: str, att: Attachment | None) -> None:
        path = netns_path(container_id)
        cni_del(
            self._networks[node.name],
            run_in=node.netns,
            cgroup=node.cgroup,
            container_id=container_id,
            netns_path=str(path) if path.exists() else None,
            prev_result=att.result if att else None,
            extra_env={MARKER_ENV: self.prefix},
            timeout=max(60.0, self.ready_timeout),
        )

    def _kill_all_in(self, names: list[str], grace: float) -> None:
        procs = [proc for name in names for proc in self._ns[name].processes]
        stop_process_groups(procs, grace)
        for name in names:
            self._ns[name].stop_all(0)
        # Processes started some other way (an agent's children, ip netns exec by hand).
        ids = [i for n in names if (i := netns_id(netns_path(n)))]
        if pids := pids_in_netns(ids):
            kill_pids(pids, grace)

    def remove_pod(self, pod: Pod | str) -> None:
        """Stop the pod's processes, CNI DEL it and delete its namespace."""
        pod = self._pods[pod] if isinstance(pod, str) else pod
        self._kill_all_in([pod.netns], grace=5.0)
        self._cni_del(self.node(pod.node), pod.container_id, self._attachments.get(pod.name))
        delete_netns(pod.netns)
        self._ns.pop(pod.netns, None)
        self._pods.pop(pod.name, None)
        self._attachments.pop(pod.name, None)

    # Servers

    def _server_args(self, target: Target) -> tuple[Netns, str, str]:
        self._check_open()
        return self.ns(target), target.name, target.ip

    def start_http_server(self, target: Target, port: int = 80, body: str | None = None) -> Server:
        """nginx in `target` answering `body` (default "<name>\\n") on `port`; returns once it
        answers a probe made from inside `target`'s namespace."""
        ns, name, ip = self._server_args(target)
        return start_http_server(
            ns,
            name=name,
            ip=ip,
            port=port,
            workdir=self.workdir,
            body=body,
            timeout=self.ready_timeout,
        )

    def start_udp_echo_server(self, target: Target, port: int) -> Server:
        """A UDP server in `target` answering "<name> <client ip>:<client port>"."""
        ns, name, ip = self._server_args(target)
        return start_udp_echo_server(
            ns, name=name, ip=ip, port=port, workdir=self.workdir, timeout=self.ready_timeout
        )

    def start_whoami_server(self, target: Target, port: int) -> Server:
        """A TCP server in `target` telling each client "<name> <peer ip>:<peer port>"."""
        ns, name, ip = self._server_args(target)
        return start_whoami_server(
            ns, name=name, ip=ip, port=port, workdir=self.workdir, timeout=self.ready_timeout
        )

    # Teardown

    def _check_open(self) -> None:
        if self._closing:
            raise ClusterError(f"cluster {self.prefix} is closed")

    def close(self) -> None:
        """Remove everything: processes, pods (CNI DEL), namespaces, cgroups, the work directory.

        Keeps going past errors and raises ClusterError listing them at the end.
        Idempotent, and resumable: every step can be redone, so a close() that
        was cut short is finished by the next call (the atexit hook's).
        SIGTERM/SIGHUP wait until it is done.
        """
        if self._closed:
            return
        self._closing = True
        with critical():
            self._close()

    def _close(self) -> None:
        errors: list[str] = []
        try:
            self._kill_all_in(list(self._ns), grace=5.0)
        except Exception as e:
            errors.append(f"stopping processes: {e}")
        for pod in reversed(list(self._pods.values())):
            if not netns_path(self.node(pod.node).netns).exists():
                continue  # a resumed close: the node, its bridge and veths are gone already
            try:
                self._cni_del(self.node(pod.node), pod.container_id, self._attachments[pod.name])
            except (CniError, NetnsError, OSError) as e:
                errors.append(str(e))
        # Pods, then the external client and nodes, then the switch.
        for name in sorted(self._ns, key=lambda n: (n == self.underlay, -len(n))):
            try:
                delete_netns(name)
            except NetnsError as e:
                errors.append(str(e))
        self._ns.clear()
        self._pods.clear()
        self._attachments.clear()
        # Before the work directory: stale_prefixes() finds a cluster by it.
        if self.cgroup is not None:
            try:
                # Whoever attached a program should have detached it: say so.
                for prog in remove_cgroup(self.cgroup):
                    log.warning("closing cluster %s detached %s", self.prefix, prog)
            except (CgroupError, OSError) as e:
                errors.append(str(e))
        shutil.rmtree(self.workdir, ignore_errors=True)
        # Whatever carries the prefix and escaped the steps above: a namespace
        # whose creation was interrupted, a process started around popen().
        if swept := cleanup_stale(self.prefix):
            log.warning("closing cluster %s also removed %s", self.prefix, swept)
        self._closed = True
        untrack(self)
        if errors:
            raise ClusterError(f"closing cluster {self.prefix}: " + "; ".join(errors))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except ClusterError:
            if exc is None:
                raise
            log.exception("while handling %r", exc)

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"{len(self._nodes)} nodes, {len(self._pods)} pods"
        return f"Cluster({self.prefix}: {state})"
