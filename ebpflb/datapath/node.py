"""This node's settings in the datapath's node_config map: addresses, SNAT ports, interfaces."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ebpflb.datapath.maps import MapLike
from ebpflb.datapath.structs import (
    MAX_EXT_IFACES,
    MAX_NODE_IPS,
    U32,
    NodeConfig,
    be32_to_ip,
    ip_to_be32,
)

# Source ports of SNATed NodePort flows. Above Linux's default ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999), so that a reply to one of the
# node's own connections is never taken for a SNATed flow's; below it are the
# nodePorts (30000-32767). 4536 ports per (backend, port, protocol).
DEFAULT_SNAT_PORTS = (61000, 65535)


@dataclass(frozen=True)
class NodeSettings:
    """What node_config holds, readable.

    node_ips: the node's addresses; the first is the source of SNATed flows (every other
    node must route it back here). A reply the datapath translates to come from one of
    them is routed by the program (the kernel drops such a source as martian).
    interfaces: external interface ifindex -> LB_IF_F_* flags.
    """

    node_ips: tuple[str, ...] = ()
    snat_ports: tuple[int, int] = (0, 0)
    interfaces: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.node_ips) > MAX_NODE_IPS:
            raise ValueError(f"at most {MAX_NODE_IPS} node addresses, not {len(self.node_ips)}")
        if len(set(self.node_ips)) != len(self.node_ips):
            raise ValueError(f"node addresses given twice: {self.node_ips}")
        for ip in self.node_ips:
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                raise ValueError(f"node address {ip!r} is not an IPv4 address") from None
        lo, hi = self.snat_ports
        if (lo, hi) != (0, 0) and not 1 <= lo <= hi <= 65535:
            raise ValueError(f"SNAT ports {lo}-{hi} are not a port range")
        if len(self.interfaces) > MAX_EXT_IFACES:
            raise ValueError(f"at most {MAX_EXT_IFACES} external interfaces")
        object.__setattr__(self, "interfaces", dict(sorted(self.interfaces.items())))


def read(m: MapLike[U32, NodeConfig]) -> NodeSettings:
    cfg = m.lookup(U32(0)) or NodeConfig()
    return NodeSettings(
        node_ips=tuple(be32_to_ip(a) for a in cfg.node_ips if a),
        snat_ports=(cfg.snat_port_min, cfg.snat_port_max),
        interfaces={i: f for i, f in zip(cfg.ext_ifindex, cfg.ext_flags, strict=True) if i},
    )


def write(m: MapLike[U32, NodeConfig], settings: NodeSettings) -> None:
    cfg = NodeConfig()
    for i, ip in enumerate(settings.node_ips):
        cfg.node_ips[i] = ip_to_be32(ip)
    for i, (ifindex, flags) in enumerate(settings.interfaces.items()):
        cfg.ext_ifindex[i] = ifindex
        cfg.ext_flags[i] = flags
    cfg.snat_port_min, cfg.snat_port_max = settings.snat_ports
    m.update(U32(0), cfg)


def with_node_ips(
    s: NodeSettings, node_ips: Sequence[str], snat_ports: tuple[int, int]
) -> NodeSettings:
    return NodeSettings(tuple(node_ips), snat_ports, s.interfaces)


def with_interface(s: NodeSettings, ifindex: int, flags: int | None) -> NodeSettings:
    """s with an external interface added or changed (flags), or removed (None)."""
    interfaces = {i: f for i, f in s.interfaces.items() if i != ifindex}
    if flags is not None:
        interfaces[ifindex] = flags
    return NodeSettings(s.node_ips, s.snat_ports, interfaces)
