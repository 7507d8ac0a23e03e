"""The node agent: registry state in, BPF map entries and attached programs out."""

from __future__ import annotations

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
from ebpflb.agent.watcher import Change, KindWatcher, Message, Relist, Synced
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient, RegistryError, TlsConfig
from ebpflb.datapath.loader import Datapath
from ebpflb.datapath.programmer import Programmer
from ebpflb.objects import wrap

log = logging.getLogger("ebpflb.agent")

WATCHED = ("Service", "EndpointSlice")
DEFAULT_PIN_ROOT = "/sys/fs/bpf/ebpflb"


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

    @property
    def pins(self) -> str:
        return self.pin_dir or f"{DEFAULT_PIN_ROOT}/{self.node}"


def detect_addresses(bridge: str) -> tuple[str, str]:
    """(node IP, pod CIDR) from this namespace's links: the node IP is the first IPv4
    address on an interface that is neither loopback, the bridge nor a veth on it; the
    pod CIDR is the bridge's subnet. Either is "" when not found."""
    node_ip = pod_cidr = ""
    with IPRoute() as ipr:
        links = {int(m["index"]): m for m in ipr.get_links()}
        bridge_idx = next(
            (i for i, m in links.items() if m.get_attr("IFLA_IFNAME") == bridge), None
        )
        for a in ipr.get_addr(family=2):
            idx = int(a["index"])
            link = links.get(idx)
            if link is None:
                continue
            name = link.get_attr("IFLA_IFNAME")
            ip = a.get_attr("IFA_ADDRESS")
            if idx == bridge_idx:
                pod_cidr = str(ipaddress.ip_interface(f"{ip}/{a['prefixlen']}").network)
            elif name != "lo" and link.get_attr("IFLA_MASTER") is None and not node_ip:
                node_ip = ip
    return node_ip, pod_cidr


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.stop = threading.Event()
        self.client = RegistryClient(cfg.registry, tls=cfg.tls)
        self.datapath = Datapath(cfg.pins)
        self.programmer = Programmer(self.datapath)
        self.state = DesiredState(cfg.node)
        self.queue: queue.Queue[Message] = queue.Queue()
        self.watchers = [KindWatcher(self.client, k, self.queue, self.stop) for k in WATCHED]
        self.ports = BridgePorts(cfg.bridge, self._attach, self._detach, self.stop)
        self.synced: set[str] = set()
        self.health = HealthChecks()
        self.syncs = 0

    def _attach(self, ifindex: int, ifname: str) -> None:
        # Ingress: the pod's packets (DNAT to a backend, reverse NAT of its replies).
        # Egress: packets to the pod (reverse NAT of replies that come from other nodes).
        self.datapath.attach(ifindex, "ingress")
        self.datapath.attach(ifindex, "egress")
        log.info("attached to %s (ifindex %d)", ifname, ifindex)

    def _detach(self, ifindex: int) -> None:
        log.info("pod veth %d is gone", ifindex)

    def register_node(self) -> None:
        """Apply this node's Node object; retried until the registry answers."""
        node_ip, pod_cidr = detect_addresses(self.cfg.bridge)
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
        if isinstance(msg, Change):
            self.state.update(msg.key, msg.obj)  # type: ignore[arg-type]
        elif isinstance(msg, Relist):
            self.synced.discard(msg.kind)
            self.state.reset(msg.kind)
        elif isinstance(msg, Synced):
            self.synced.add(msg.kind)

    def run(self) -> None:
        log.info(
            "node %s: pins in %s, pod bridge %s", self.cfg.node, self.cfg.pins, self.cfg.bridge
        )
        self.ports.start()
        threading.Thread(target=self.register_node, name="register", daemon=True).start()
        for w in self.watchers:
            w.start()
        full_resync = True
        last_gc = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    self._handle(self.queue.get(timeout=0.5))
                    while True:  # take everything that is queued before programming
                        self._handle(self.queue.get_nowait())
                except queue.Empty:
                    pass
                # Until both kinds are fully listed the maps are left as they are:
                # a restarted agent must not program a half-known state.
                if self.synced == set(WATCHED) and (self.state.dirty or full_resync):
                    try:
                        stats = self.programmer.sync(self.state.frontends(), full=full_resync)
                        self.health.sync(self.state.health_checks())
                        self.syncs += 1
                        full_resync = False
                        if self.syncs == 1:
                            log.info(
                                "synced: %d frontends programmed (%s)",
                                len(self.state.frontends()),
                                stats,
                            )
                        else:
                            log.debug("sync %d: %s", self.syncs, stats)
                    except Exception:
                        log.exception("programming the maps failed; a full resync follows")
                        full_resync = True
                        self.stop.wait(0.5)
                if time.monotonic() - last_gc > self.cfg.gc_interval:
                    last_gc = time.monotonic()
                    self.datapath.gc()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop.set()
        for w in self.watchers:
            w.cancel()
        self.health.close()
        self.ports.join(timeout=2)
        if self.cfg.cleanup:
            self.datapath.close(cleanup=True)
            log.info("cleaned up: programs detached, pins under %s removed", self.cfg.pins)
        else:
            self.datapath.close(cleanup=False)
            log.info("exiting; programs and maps stay in place (pinned in %s)", self.cfg.pins)
        self.client.close()


def run(cfg: AgentConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    agent = Agent(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()
