"""What the datapath needs to know of a network interface: its driver, a veth peer's XDP."""

from __future__ import annotations

import array
import ctypes
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
IFNAMSIZ = 16


class _DrvInfo(ctypes.Structure):
    """struct ethtool_drvinfo (linux/ethtool.h), up to what we read."""

    _fields_ = [
        ("cmd", ctypes.c_uint32),
        ("driver", ctypes.c_char * 32),
        ("version", ctypes.c_char * 32),
        ("fw_version", ctypes.c_char * 32),
        ("bus_info", ctypes.c_char * 32),
        ("erom_version", ctypes.c_char * 32),
        ("reserved2", ctypes.c_char * 12),
        ("n_priv_flags", ctypes.c_uint32),
        ("n_stats", ctypes.c_uint32),
        ("testinfo_len", ctypes.c_uint32),
        ("eedump_len", ctypes.c_uint32),
        ("regdump_len", ctypes.c_uint32),
    ]


def driver(ifname: str) -> str:
    """The interface's driver ("veth", "virtio_net", "bridge"...), "" if it has none to say.

    Asked with ETHTOOL_GDRVINFO on a socket of the calling thread's network namespace
    (/sys/class/net shows the namespace sysfs was mounted in, not the thread's)."""
    if len(ifname.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {ifname!r} is too long")
    info = _DrvInfo(cmd=ETHTOOL_GDRVINFO)
    ifreq = array.array("B", struct.pack(f"{IFNAMSIZ}sP", ifname.encode(), ctypes.addressof(info)))
    ifreq.extend(bytes(40 - len(ifreq)))  # sizeof(struct ifreq)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError as e:
            if e.errno in (95, 22):  # EOPNOTSUPP, EINVAL: a device without ethtool
                return ""
            raise
    return str(info.driver.decode(errors="replace"))


def ifname(ifindex: int) -> str:
    return socket.if_indextoname(ifindex)


def veth_peer_has_native_xdp(ifindex: int) -> bool | None:
    """For a veth: whether its peer runs a native XDP program, which native XDP_TX on the
    veth needs (the veth hands XDP frames to the peer's NAPI, which only runs then);
    None if the peer cannot be found. Asked over netlink, also when the peer is in
    another network namespace (IFLA_IF_NETNSID)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifindex)
        peer = link.get_attr("IFLA_LINK")
        nsid = link.get_attr("IFLA_LINK_NETNSID")
        if not peer:
            return None
        try:
            if nsid is None:
                (peer_link,) = ipr.get_links(peer)
            else:
                (peer_link,) = ipr.link("get", index=peer, IFLA_IF_NETNSID=nsid)
        except NetlinkError:
            return None
    xdp = peer_link.get_attr("IFLA_XDP")
    return xdp is not None and bool(xdp.get_attr("IFLA_XDP_DRV_PROG_ID"))
