"""Test packets: scapy builders, checksum checks written from RFC 1071, a runner."""

from __future__ import annotations

import socket
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ebpflb.datapath import testrun

POD_MAC = "0a:58:0a:f4:00:05"  # the client pod's eth0
GW_MAC = "0a:58:0a:f4:00:01"  # cni0, the pod's gateway
CLIENT = "10.244.0.5"
CLIENT2 = "10.244.0.6"
VIP = "10.96.0.10"
VIP2 = "10.96.0.11"
OTHER = "10.244.0.99"  # a pod that is no frontend
BACKENDS = ("10.244.0.21", "10.244.0.22", "10.244.0.23", "10.244.0.24")
HAIRPIN = "169.254.42.1"

# Router Alert (RFC 2113), 4 bytes: IHL 6.
RTR_ALERT = b"\x94\x04\x00\x00"
# The longest header: 40 bytes of options (NOPs then End of Options), IHL 15.
MAX_OPTIONS = b"\x01" * 39 + b"\x00"


def tcp(
    src: str = CLIENT,
    dst: str = VIP,
    sport: int = 40000,
    dport: int = 80,
    flags: str = "S",
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
    options: bytes = b"",
    src_mac: str = POD_MAC,
    dst_mac: str = GW_MAC,
    frag: int = 0,
    mf: bool = False,
) -> bytes:
    ip = IP(src=src, dst=dst, ttl=64, id=7, frag=frag, flags="MF" if mf else "DF")
    if options:
        ip.options = [Raw(options)]
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240)
    return bytes(Ether(src=src_mac, dst=dst_mac) / ip / l4 / Raw(payload))


def udp(
    src: str = CLIENT,
    dst: str = VIP,
    sport: int = 40000,
    dport: int = 53,
    payload: bytes = b"query",
    no_checksum: bool = False,
    options: bytes = b"",
    src_mac: str = POD_MAC,
    dst_mac: str = GW_MAC,
    frag: int = 0,
    mf: bool = False,
) -> bytes:
    ip = IP(src=src, dst=dst, ttl=64, id=7, frag=frag, flags="MF" if mf else 0)
    if options:
        ip.options = [Raw(options)]
    l4 = UDP(sport=sport, dport=dport, chksum=0 if no_checksum else None)
    return bytes(Ether(src=src_mac, dst=dst_mac) / ip / l4 / Raw(payload))


def icmp_echo(src: str = CLIENT, dst: str = VIP) -> bytes:
    return bytes(Ether(src=POD_MAC, dst=GW_MAC) / IP(src=src, dst=dst) / ICMP() / Raw(b"ping"))


def arp_request(src: str = CLIENT, dst: str = VIP) -> bytes:
    return bytes(
        Ether(src=POD_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=src, pdst=dst, hwsrc=POD_MAC)
    )


def ipv6_tcp() -> bytes:
    from scapy.layers.inet6 import IPv6

    return bytes(
        Ether(src=POD_MAC, dst=GW_MAC)
        / IPv6(src="fd00::5", dst="fd00::10")
        / TCP(sport=40000, dport=80, flags="S")
    )


# -- reading frames -------------------------------------------------------------


def ihl(frame: bytes) -> int:
    return (frame[14] & 0x0F) * 4


def l4_offset(frame: bytes) -> int:
    return 14 + ihl(frame)


def ip_addrs(frame: bytes) -> tuple[str, str]:
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])


def ports(frame: bytes) -> tuple[int, int]:
    sport, dport = struct.unpack("!HH", frame[l4_offset(frame) : l4_offset(frame) + 4])
    return sport, dport


def with_macs(frame: bytes, src_mac: str, dst_mac: str) -> bytes:
    """frame with other Ethernet addresses."""
    return (
        bytes.fromhex(dst_mac.replace(":", ""))
        + bytes.fromhex(src_mac.replace(":", ""))
        + frame[12:]
    )


def dst(frame: bytes) -> tuple[str, int]:
    """(daddr, dport) of a TCP/UDP frame."""
    return ip_addrs(frame)[1], ports(frame)[1]


# -- checksums, from RFC 1071, independent of scapy and of the kernel ----------


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def set_tot_len(frame: bytes, tot_len: int) -> bytes:
    """frame with the IP total length changed and the header checksum made right again."""
    b = bytearray(frame)
    struct.pack_into("!H", b, 16, tot_len)
    struct.pack_into("!H", b, 24, 0)
    struct.pack_into("!H", b, 24, 0xFFFF - ones_sum(bytes(b[14 : 14 + ihl(frame)])))
    return bytes(b)


def check_checksums(frame: bytes) -> None:
    """Assert the IPv4 header checksum and the TCP/UDP/ICMP checksum are right."""
    assert frame[12:14] == b"\x08\x00", "not IPv4"
    hl = ihl(frame)
    header = frame[14 : 14 + hl]
    assert ones_sum(header) == 0xFFFF, "bad IPv4 header checksum"
    total_len = struct.unpack("!H", frame[16:18])[0]
    assert 14 + total_len <= len(frame), "IP total length beyond the frame"
    segment = frame[14 + hl : 14 + total_len]
    proto = frame[23]
    if proto == socket.IPPROTO_ICMP:
        assert ones_sum(segment) == 0xFFFF, "bad ICMP checksum"
        return
    if proto == socket.IPPROTO_UDP and segment[6:8] == b"\0\0":
        return  # no checksum
    pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(segment))
    assert ones_sum(pseudo + segment) == 0xFFFF, f"bad L4 checksum (proto {proto})"


def udp_checksum_field(frame: bytes) -> int:
    off = l4_offset(frame)
    return int(struct.unpack("!H", frame[off + 6 : off + 8])[0])


# -- running -------------------------------------------------------------------


def run(prog_fd: int, frame: bytes, *, xdp: bool = False, ifindex: int = 0) -> tuple[int, bytes]:
    verdict, out, _ = testrun.run(prog_fd, frame, xdp=xdp, ifindex=ifindex)
    return verdict, out


def describe(frame: bytes) -> str:
    try:
        return str(Ether(frame).show(dump=True))
    except Exception:  # a truncated frame
        return frame.hex()


def assert_frame(got: bytes, want: bytes) -> None:
    """Byte-for-byte equality, with both frames decoded on failure."""
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        raise AssertionError(
            f"frames differ (lengths {len(got)} / {len(want)}, first difference at byte "
            f"{first}):\n--- got\n{describe(got)}\n--- want\n{describe(want)}"
        )


# -- the datapath's backend choice, replicated (bpf/lb.h: lb_mix32, lb_flow_hash) ---


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int, seed: int = 0x5EED1B5) -> int:
    """lb_flow_hash() of a client's packet: fields as the program loads them (wire order)."""
    from ebpflb.datapath.structs import ip_to_be32

    h = _mix32(seed ^ ip_to_be32(src))
    h = _mix32(h ^ ip_to_be32(dst))
    h = _mix32(h ^ ((socket.htons(sport) << 16) | socket.htons(dport)))
    return _mix32(h ^ proto)
