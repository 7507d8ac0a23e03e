"""ctypes mirrors of the map key/value structs in bpf/lb_structs.h, and byte-order helpers."""

from __future__ import annotations

import ctypes
import socket
import sys
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

SVC_F_AFFINITY = 0x1
SVC_F_NODEPORT = 0x2

BE_F_LOCAL = 0x1

CT_FORWARD = 0
CT_REVERSE = 1
CT_F_HAIRPIN = 0x1
CT_F_ESTABLISHED = 0x2
CT_F_CLOSING = 0x4
CT_F_SNAT = 0x8

MAX_NODE_IPS = 4
MAX_EXT_IFACES = 8
IF_F_PARTIAL_CSUM = 0x1
IF_F_NO_XDP_TX = 0x2


def ip_to_be32(ip: str) -> int:
    """Dotted IPv4 -> the integer whose in-memory bytes are the address in network order."""
    return int.from_bytes(socket.inet_aton(ip), sys.byteorder)


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, sys.byteorder))


def port_to_be16(port: int) -> int:
    return socket.htons(port)


def be16_to_port(value: int) -> int:
    return socket.ntohs(value)


class U32(ctypes.Structure):
    """A bare __u32 key or value (backend ids, slots, the per-CPU array index)."""

    value: int
    _fields_ = [("value", c_uint32)]


class U64(ctypes.Structure):
    """A bare __u64 value (the address filter's words)."""

    value: int
    _fields_ = [("value", c_uint64)]


class SvcKey(ctypes.Structure):
    """Must match struct lb_svc_key in bpf/lb_structs.h."""

    vip: int
    port: int
    proto: int
    pad: int
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("pad", c_uint8)]


class SvcValue(ctypes.Structure):
    """Must match struct lb_svc_value in bpf/lb_structs.h."""

    svc_id: int
    count: int
    flags: int
    gen: int
    affinity_timeout: int
    _fields_ = [
        ("svc_id", c_uint32),
        ("count", c_uint16),
        ("flags", c_uint8),
        ("gen", c_uint8),
        ("affinity_timeout", c_uint32),
    ]


class BackendValue(ctypes.Structure):
    """Must match struct lb_backend_value in bpf/lb_structs.h."""

    addr: int
    port: int
    proto: int
    flags: int
    _fields_ = [("addr", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("flags", c_uint8)]


class SlotKey(ctypes.Structure):
    """Must match struct lb_slot_key in bpf/lb_structs.h."""

    svc_id: int
    slot: int
    _fields_ = [("svc_id", c_uint32), ("slot", c_uint32)]


class MemberKey(ctypes.Structure):
    """Must match struct lb_member_key in bpf/lb_structs.h."""

    svc_id: int
    backend_id: int
    _fields_ = [("svc_id", c_uint32), ("backend_id", c_uint32)]


class CtKey(ctypes.Structure):
    """Must match struct lb_ct_key in bpf/lb_structs.h."""

    saddr: int
    daddr: int
    sport: int
    dport: int
    proto: int
    dir: int
    pad: int
    _fields_ = [
        ("saddr", c_uint32),
        ("daddr", c_uint32),
        ("sport", c_uint16),
        ("dport", c_uint16),
        ("proto", c_uint8),
        ("dir", c_uint8),
        ("pad", c_uint16),
    ]


class CtValue(ctypes.Structure):
    """Must match struct lb_ct_value in bpf/lb_structs.h."""

    last_seen: int
    lifetime: int
    svc_id: int
    backend_id: int
    addr: int
    nat_addr: int
    port: int
    nat_port: int
    flags: int
    svc_gen: int
    pad2: int
    map_gen: int
    _fields_ = [
        ("last_seen", c_uint64),
        ("lifetime", c_uint32),
        ("svc_id", c_uint32),
        ("backend_id", c_uint32),
        ("addr", c_uint32),
        ("nat_addr", c_uint32),
        ("port", c_uint16),
        ("nat_port", c_uint16),
        ("flags", c_uint8),
        ("svc_gen", c_uint8),
        ("pad2", c_uint16),
        ("map_gen", c_uint32),
    ]


class AffinityKey(ctypes.Structure):
    """Must match struct lb_affinity_key in bpf/lb_structs.h."""

    svc_id: int
    client: int
    _fields_ = [("svc_id", c_uint32), ("client", c_uint32)]


class AffinityValue(ctypes.Structure):
    """Must match struct lb_affinity_value in bpf/lb_structs.h."""

    last_used: int
    backend_id: int
    pad: int
    _fields_ = [("last_used", c_uint64), ("backend_id", c_uint32), ("pad", c_uint32)]


class SockKey(ctypes.Structure):
    """Must match struct lb_sock_key in bpf/lb_structs.h."""

    cookie: int
    addr: int
    port: int
    proto: int
    pad: int
    _fields_ = [
        ("cookie", c_uint64),
        ("addr", c_uint32),
        ("port", c_uint16),
        ("proto", c_uint8),
        ("pad", c_uint8),
    ]


class SockValue(ctypes.Structure):
    """Must match struct lb_sock_value in bpf/lb_structs.h."""

    vip: int
    port: int
    pad: int
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class SockPeer(ctypes.Structure):
    """Must match struct lb_sock_peer in bpf/lb_structs.h (only the layout check uses it: the
    values live in the sockets, out of userspace's reach)."""

    addr: int
    vip: int
    port: int
    vip_port: int
    _fields_ = [
        ("addr", c_uint32),
        ("vip", c_uint32),
        ("port", c_uint16),
        ("vip_port", c_uint16),
    ]


COUNTER_FIELDS = (
    "packets",
    "passed",
    "other",
    "fragments",
    "malformed",
    "dnat",
    "rev_nat",
    "hairpin",
    "ct_hits",
    "ct_misses",
    "ct_expired",
    "reselects",
    "affinity_hits",
    "no_backend",
    "errors",
    "nodeport_xdp",
    "nodeport_tc",
    "xdp_pass_to_tc",
    "snat",
    "rev_snat",
    "snat_no_port",
    "fib_redirect",
    "fib_redirect_neigh",
    "fib_fail",
    "ct_created",
    "ct_lost",
    "sock_xlate",
    "sock_revnat",
    "rev_skipped",
)


class Counters(ctypes.Structure):
    """Must match struct lb_counters in bpf/lb_structs.h (one CPU's copy)."""

    _fields_ = [(name, c_uint64) for name in COUNTER_FIELDS]


class NodeConfig(ctypes.Structure):
    """Must match struct lb_node_config in bpf/lb_structs.h."""

    node_ips: ctypes.Array[c_uint32]
    ext_ifindex: ctypes.Array[c_uint32]
    ext_flags: ctypes.Array[c_uint32]
    snat_port_min: int
    snat_port_max: int
    pad: int
    _fields_ = [
        ("node_ips", c_uint32 * MAX_NODE_IPS),
        ("ext_ifindex", c_uint32 * MAX_EXT_IFACES),
        ("ext_flags", c_uint32 * MAX_EXT_IFACES),
        ("snat_port_min", c_uint16),
        ("snat_port_max", c_uint16),
        ("pad", c_uint32),
    ]


class IdState(ctypes.Structure):
    """Must match struct lb_id_state in bpf/lb_structs.h."""

    next_svc_id: int
    next_backend_id: int
    map_gen: int
    pad: int
    _fields_ = [
        ("next_svc_id", c_uint32),
        ("next_backend_id", c_uint32),
        ("map_gen", c_uint32),
        ("pad", c_uint32),
    ]
