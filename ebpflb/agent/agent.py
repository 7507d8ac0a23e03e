"""The node agent: registry state in, BPF map entries and attached programs out."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

from ebpflb.agent.desired import DesiredState
from ebpflb.agent.healthcheck import HealthChecks
from ebpflb.agent.links import BridgePorts
from ebpflb.agent.watcher import Changes, KindWatcher, Message, Relist, Synced
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient, RegistryError, TlsConfig
from ebpflb.datapath.loader import (
    EXTERNAL_MODES,
    Datapath,
    DatapathConfig,
    ExternalMode,
    TcAttach,
)
from ebpflb.datapath.programmer import Programmer
from ebpflb.heap import bulk_objects
from ebpflb.objects import wrap

log = logging.getLogger("ebpflb.agent")

WATCHED = ("Service", "EndpointSlice")
DEFAULT_PIN_ROOT = "/sys/fs/bpf/ebpflb"
MAX_NODE_IPS = 4  # LB_MAX_NODE_IPS in bpf/lb_structs.h
TRIM_AFTER = 10_000  # map entries written or deleted by one programming (a bulk)
BULK_SERVICES = 500  # Services programmed at once that make a bulk of objects


@dataclass(frozen=True)
class AgentConfig:
    registry: str
    node: str
    bridge: str = "cni0"
    pin_dir: str = ""  # default DEFAULT_PIN_ROOT/<node>
    node_ip: str = ""  # default: autodetected
    pod_cidr: str = ""  # default: the bridge's subnet
    external_ifaces: tuple[str, ...] = ()  # IFACE or IFACE:MODE; default: autodetected
    cleanup: bool = False  # on exit, detach and remove the pins
    tls: TlsConfig | None = None  # mTLS to a host:port registry (ignored for a unix socket)
    gc_interval: float = 10.0
    resync_interval: float = 300.0  # a full mark-and-sweep of the maps this often (safety net)
    max_conntrack: int = DatapathConfig.max_conntrack  # entries; a change is migrated
    socket_lb_cgroup: str = ""  # a cgroup v2 directory: socket-level LB for its processes
    tc_attach: TcAttach = "auto"  # tcx hooks or clsact filters; auto: tcx where the kernel has it

    @property
    def pins(self) -> str:
        return self.pin_dir or f"{DEFAULT_PIN_ROOT}/{self.node}"


@dataclass(frozen=True)
class NodeLinks:
    """What this namespace's links say about the node."""

    node_ips: tuple[str, ...]  # IPv4 addresses on the external interfaces
    external: tuple[str, ...]  # with an address, neither lo, the bridge nor a port of it
    pod_cidr: str  # the bridge's subnet ("" before the first pod made it)


def detect_links(bridge: str) -> NodeLinks:
    """The node's addresses, external interfaces and pod CIDR, from netlink."""
    node_ips: list[str] = []
    external: list[str] = []
    pod_cidr = ""
    with IPRoute() as ipr:
        links = {int(m["index"]): m for m in ipr.get_links()}
        names = {i: str(m.get_attr("IFLA_IFNAME")) for i, m in links.items()}
        bridge_idx = next((i for i, n in names.items() if n == bridge), None)
        for a in ipr.get_addr(family=2):
            idx = int(a["index"])
            link = links.get(idx)
            if link is None:
                continue
            ip = str(a.get_attr("IFA_ADDRESS"))
            if idx == bridge_idx:
                pod_cidr = str(ipaddress.ip_interface(f"{ip}/{a['prefixlen']}").network)
            elif names[idx] != "lo" and link.get_attr("IFLA_MASTER") is None:
                node_ips.append(ip)
                if names[idx] not in external:
                    external.append(names[idx])
    return NodeLinks(tuple(node_ips), tuple(external), pod_cidr)


def parse_external(spec: str) -> tuple[str, ExternalMode | None]:
    """IFACE or IFACE:MODE (MODE xdp, xdp-generic or tc)."""
    name, _, mode = spec.partition(":")
    if not mode:
        return name, None
    if mode not in EXTERNAL_MODES:
        modes = ", ".join(EXTERNAL_MODES)
        raise ValueError(f"--external-iface {spec}: the mode must be one of {modes}")
    return name, mode


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.stop = threading.Event()
        self.links = detect_links(cfg.bridge)
        # The datapath holds up to MAX_NODE_IPS addresses (the first is the SNAT source).
        self.node_ips = ((cfg.node_ip,) if cfg.node_ip else self.links.node_ips)[:MAX_NODE_IPS]
        self.external = [parse_external(x) for x in cfg.external_ifaces] or [
            (name, None) for name in self.links.external
        ]
        self.client = RegistryClient(cfg.registry, tls=cfg.tls)
        # Maps of another layout (an upgrade) are migrated, but the new programs are swapped
        # in only after the first sync has written the registry's state into the new maps.
        self.datapath = Datapath(
            cfg.pins,
            DatapathConfig(max_conntrack=cfg.max_conntrack),
            defer_migration=True,
            tc_attach=cfg.tc_attach,
        )
        log.info("tc programs on %s", "tcx hooks" if self.datapath.tcx else "clsact filters")
        self.programmer = Programmer(self.datapath)
        self.state = DesiredState(cfg.node, self.node_ips)
        self.queue: queue.Queue[Message] = queue.Queue()
        self.watchers = [
            KindWatcher(self.client, k, self.queue, self.stop, self.state.record) for k in WATCHED
        ]
        self.ports = BridgePorts(cfg.bridge, self._attach, self._detach, self.stop)
        self.synced: set[str] = set()
        self.health = HealthChecks()
        self.syncs = 0
        # Why the next programming compares every entry ("" = it need not): at start,
        # after a relist or a failure, and every resync_interval. Otherwise only the
        # Services changed since the last one are written (a watch that resumed after
        # a registry outage is no reason: it missed nothing).
        self.full_resync = "start"

    def _attach(self, ifindex: int, ifname: str) -> None:
        # Ingress: the pod's packets (DNAT to a backend, reverse NAT of its replies).
        # Egress: packets to the pod (reverse NAT of replies that come from other nodes).
        self.datapath.attach(ifindex, "ingress")
        self.datapath.attach(ifindex, "egress")
        log.info("attached to %s (ifindex %d)", ifname, ifindex)

    def _detach(self, ifindex: int) -> None:
        log.info("pod veth %d is gone", ifindex)

    def attach_external(self) -> None:
        """NodePort on the external interfaces, in the mode asked for or the faster one
        for the interface's kind; the node's first address is the SNAT source."""
        if self.node_ips:
            self.datapath.set_node(self.node_ips)
        with IPRoute() as ipr:
            for name, mode in self.external:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    log.warning("external interface %s does not exist", name)
                    continue
                chosen = self.datapath.attach_external(int(found[0]), mode)
                log.info("NodePort on %s (%s) for %s", name, chosen, ", ".join(self.node_ips))

    def start_attaching(self) -> None:
        """NodePort on the external interfaces, socket-level load balancing for the cgroup
        asked for, our programs on every pod veth."""
        self.attach_external()
        if self.cfg.socket_lb_cgroup:
            self.datapath.attach_cgroup(self.cfg.socket_lb_cgroup)
        self.ports.start()

    def register_node(self) -> None:
        """Apply this node's Node object; retried until the registry answers."""
        node_ip = self.node_ips[0] if self.node_ips else ""
        pod_cidr = detect_links(self.cfg.bridge).pod_cidr
        node = pb.Node(api_version="v1", kind="Node")
        node.metadata.name = self.cfg.node
        ip = self.cfg.node_ip or node_ip
        if ip:
            node.status.addresses.add(type="InternalIP", address=ip)
        node.status.addresses.add(type="Hostname", address=self.cfg.node)
        ready = node.status.conditions.add(type="Ready", status="True", reason="AgentReady")
        ready.message = "ebpflb agent is running"
        ready.last_heartbeat_time.GetCurrentTime()
        ready.last_heartbeat_time.nanos = 0
        cidr = self.cfg.pod_cidr or pod_cidr
        if cidr:
            node.spec.pod_cidr = cidr
            node.spec.pod_cidrs.append(cidr)
        backoff = 0.1
        while not self.stop.is_set():
            try:
                self.client.apply([wrap(node)])
                log.info(
                    "registered node %s (ip %s, pod CIDR %s)", self.cfg.node, ip or "-", cidr or "-"
                )
                return
            except RegistryError as e:
                log.warning("registering node: %s", e.details)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Changes):
            for change in msg.changes:
                self.state.update(change.key, change.obj)  # type: ignore[arg-type]
        elif isinstance(msg, Relist):
            self.synced.discard(msg.kind)
            self.state.reset(msg.kind)
            self.full_resync = f"relist of {msg.kind}"
        elif isinstance(msg, Synced):
            self.synced.add(msg.kind)

    def run(self) -> None:
        log.info(
            "node %s: pins in %s, pod bridge %s", self.cfg.node, self.cfg.pins, self.cfg.bridge
        )
        if not self.datapath.migrating:
            self.start_attaching()
        threading.Thread(target=self.register_node, name="register", daemon=True).start()
        for w in self.watchers:
            w.start()
        last_gc = last_full = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    self._handle(self.queue.get(timeout=0.5))
                    while True:  # take everything that is queued before programming
                        self._handle(self.queue.get_nowait())
                except queue.Empty:
                    pass
                if time.monotonic() - last_full > self.cfg.resync_interval:
                    self.full_resync = self.full_resync or "periodic"
                # Until both kinds are fully listed the maps are left as they are:
                # a restarted agent must not program a half-known state.
                if self.synced == set(WATCHED) and (self.state.dirty or self.full_resync):
                    if self.full_resync:
                        last_full = time.monotonic()
                    self._program()
                if self.syncs and self.datapath.migrating:
                    # A failure raises: the agent exits, the old datapath left as it was.
                    self.datapath.finish_migration()
                    self.start_attaching()
                if time.monotonic() - last_gc > self.cfg.gc_interval:
                    last_gc = time.monotonic()
                    self.datapath.gc()
        finally:
            self.shutdown()

    def _program(self) -> None:
        """Bring the maps up to date: a full mark-and-sweep when full_resync says why,
        else an update of the Services changed since the last time. A failure makes
        the next one full."""
        reason = self.full_resync
        try:
            # The records and the map image are acyclic and live long (heap.bulk_objects).
            with bulk_objects(bool(reason) or self.state.pending >= BULK_SERVICES):
                if reason:
                    stats = self.programmer.sync(self.state.by_service(), full=True)
                else:
                    stats = self.programmer.update(self.state.changes())
            self.health.sync(self.state.health_checks())
            self.syncs += 1
            self.full_resync = ""
        except Exception:
            log.exception("programming the maps failed; a full resync follows")
            self.full_resync = "after a failure"
            self.stop.wait(0.5)
            return
        if reason:
            log.info("full sync (%s): %d Services; %s", reason, len(self.state.services), stats)
        else:
            log.debug("sync %d: %s", self.syncs, stats)
        if stats.written + stats.deleted >= TRIM_AFTER:
            release_free_memory()

    def shutdown(self) -> None:
        self.stop.set()
        for w in self.watchers:
            w.cancel()
        self.health.close()
        if self.ports.is_alive():
            self.ports.join(timeout=2)
        if self.cfg.cleanup:
            self.datapath.close(cleanup=True)
            log.info("cleaned up: programs detached, pins under %s removed", self.cfg.pins)
        else:
            self.datapath.close(cleanup=False)
            log.info("exiting; programs and maps stay in place (pinned in %s)", self.cfg.pins)
        self.client.close()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc only): a bulk's watch
    messages are parsed there, and what they leave free would stay in the agent's RSS."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def run(cfg: AgentConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    agent = Agent(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()
