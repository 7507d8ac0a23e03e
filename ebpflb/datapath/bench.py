"""Per-packet cost of the datapath by BPF_PROG_TEST_RUN: python -m ebpflb.datapath.bench."""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ebpflb.datapath import testrun
from ebpflb.datapath.loader import Datapath, DatapathConfig, remove_pins
from ebpflb.datapath.programmer import Backend, Frontend, Programmer

CLIENT, VIP, BACKEND, OTHER = "10.244.0.5", "10.96.0.10", "10.244.0.21", "10.244.0.99"
NODE_IP, EXTERNAL = "192.168.50.10", "192.168.50.200"
EMPTY_PROGRAM = b"""
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>
int empty(struct __sk_buff *skb) { return TC_ACT_OK; }
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: int = 0x10) -> bytes:
    """An Ethernet/IPv4/TCP frame with right checksums and 64 bytes of payload."""
    payload = bytes(64)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 64240, 0, 0) + payload
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = bytes.fromhex("0a580af400010a580af40005") + b"\x08\x00"
    return eth + ip + tcp


ROUNDS = 7


def _cost(fd: int, empty_fd: int, frame: bytes, repeat: int, xdp: bool = False) -> float:
    """ns per packet of the program on frame minus the empty program's: the median of
    ROUNDS rounds, each the empty program then this one on repeat / ROUNDS packets, so that
    a burst of other work on the machine spoils a round, not the figure."""
    n = max(repeat // ROUNDS, 1)
    diffs = []
    for _ in range(ROUNDS):
        empty = testrun.run(empty_fd, frame, n, xdp=xdp)[2]
        diffs.append(testrun.run(fd, frame, n, xdp=xdp)[2] - empty)
    return float(statistics.median(diffs))


def _cost_single(fd: int, empty_fd: int, frames: list[bytes]) -> float:
    """Median over frames of one run each (a new flow per frame), minus the empty program's
    run on the same frame just before."""
    return float(
        statistics.median(testrun.run(fd, f, 1)[2] - testrun.run(empty_fd, f, 1)[2] for f in frames)
    )


def measure(
    dp: Datapath, empty_fd: int, empty_xdp_fd: int, services: int, repeat: int
) -> dict[str, float]:
    """ns per packet for each path, minus the empty program's cost (of the same type)."""
    fd = dp.prog_fd
    dp.maps.clear()
    programmer = Programmer(dp)
    # The frontend under test, and one on its backend that points back at the VIP: a packet
    # rewritten by one is a conntrack hit of the other, so repeated runs stay on the hit
    # (and the reply) path with real rewrites.
    frontends = [
        Frontend(VIP, 80, "TCP", (Backend(BACKEND, 8080),)),
        Frontend(BACKEND, 8080, "TCP", (Backend(VIP, 80),)),
        Frontend(VIP, 81, "TCP", (Backend(VIP, 81),)),  # its own backend: nothing to rewrite
        # NodePort to a local backend, and back the same way (external interface programs).
        Frontend(NODE_IP, 30080, "TCP", (Backend(BACKEND, 8081, local=True),), nodeport=True),
        Frontend(BACKEND, 8081, "TCP", (Backend(NODE_IP, 30080, local=True),), nodeport=True),
    ]
    filler = Backend("10.244.200.1", 80)
    frontends += [
        Frontend(
            str(socket.inet_ntoa(struct.pack("!I", 0x0A600000 + 100 + i))), 80, "TCP", (filler,)
        )
        for i in range(max(services - 3, 0))
    ]
    programmer.sync(frontends)
    testrun.run(fd, tcp_frame(CLIENT, VIP, 40000, 80, 0x02), 1)  # create both flows
    testrun.run(fd, tcp_frame(CLIENT, BACKEND, 40000, 8080, 0x02), 1)
    testrun.run(fd, tcp_frame(CLIENT, VIP, 40000, 81, 0x02), 1)
    xdp_fd, ext_tc_fd = dp.external_fd("xdp"), dp.external_fd("tc")
    testrun.run(ext_tc_fd, tcp_frame(EXTERNAL, NODE_IP, 40000, 30080, 0x02), 1)
    testrun.run(ext_tc_fd, tcp_frame(EXTERNAL, BACKEND, 40000, 8081, 0x02), 1)
    nodeport = tcp_frame(EXTERNAL, NODE_IP, 40000, 30080)
    misses = [tcp_frame(CLIENT, VIP, 20000 + i, 80, 0x02) for i in range(2000)]
    paths = {
        "no service": tcp_frame(CLIENT, OTHER, 40000, 80),
        "conntrack hit": tcp_frame(CLIENT, VIP, 40000, 80),
        "conntrack hit, nothing to rewrite": tcp_frame(CLIENT, VIP, 40000, 81),
        "reverse NAT": tcp_frame(BACKEND, CLIENT, 8080, 40000),
    }
    result = {name: _cost(fd, empty_fd, frame, repeat) for name, frame in paths.items()}
    result["NodePort DNAT, conntrack hit (tc)"] = _cost(ext_tc_fd, empty_fd, nodeport, repeat)
    result["NodePort DNAT, conntrack hit (XDP)"] = _cost(
        xdp_fd, empty_xdp_fd, nodeport, repeat, xdp=True
    )
    result["no NodePort (XDP)"] = _cost(
        xdp_fd, empty_xdp_fd, tcp_frame(EXTERNAL, OTHER, 40000, 80), repeat, xdp=True
    )
    result["conntrack miss (new flow)"] = _cost_single(fd, empty_fd, misses)
    result["empty program (absolute)"] = float(
        testrun.run(empty_fd, paths["no service"], repeat)[2]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", default="1,100000", help="comma-separated service counts")
    ap.add_argument("--repeat", type=int, default=200_000)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.services.split(",")]

    from bcc import BPF

    empty: Any = BPF(text=EMPTY_PROGRAM)
    empty_fd = int(empty.load_func(b"empty", BPF.SCHED_CLS).fd)
    empty_xdp_fd = int(empty.load_func(b"empty_xdp", BPF.XDP).fd)
    pin_dir = Path("/sys/fs/bpf") / f"ebpflb-bench-{secrets.token_hex(4)}"
    config = DatapathConfig(max_services=max(131072, max(counts) + 16))
    dp = Datapath(pin_dir, config)
    try:
        table = {n: measure(dp, empty_fd, empty_xdp_fd, n, args.repeat) for n in counts}
    finally:
        dp.close(cleanup=True)
        remove_pins(pin_dir)
        empty.cleanup()
    paths = list(next(iter(table.values())))
    print(f"{'ns per packet (minus empty program)':38}" + "".join(f"{n:>12,}" for n in counts))
    fmt: Callable[[float], str] = lambda v: f"{v:12.0f}"  # noqa: E731
    for p in paths:
        print(f"{p:38}" + "".join(fmt(table[n][p]) for n in counts))
    print("(services: frontends in the map; conntrack hit and reverse NAT include the rewrite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
