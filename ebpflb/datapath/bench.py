"""Per-packet cost of the datapath by BPF_PROG_TEST_RUN: python -m ebpflb.datapath.bench.

Every Service count gets datapaths of its own (own pin directories; two, see Subject), all
loaded at once, and every figure is taken in rounds: the empty program, then each datapath, on
the same frame, in an order rotated from round to round. A burst of other work on the machine
spoils one round of every count alike instead of the figure of one count, and no count always
runs first (or always right after the empty program). A count's figure is the median of its
rounds; its ratio to the smallest count is the median of the per-round ratios, each of two
figures taken moments apart.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import struct
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ebpflb.datapath import testrun
from ebpflb.datapath.loader import Datapath, DatapathConfig, remove_pins
from ebpflb.datapath.programmer import Backend, Frontend, Programmer

CLIENT, VIP, BACKEND, OTHER = "10.244.0.5", "10.96.0.10", "10.244.0.21", "10.244.0.99"
IDLE_BACKEND = "10.244.0.30"  # a backend of no flow (its clients connect to it directly)
NODE_IP, EXTERNAL = "192.168.50.10", "192.168.50.200"
EMPTY_PROGRAM = b"""
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>
int empty(struct __sk_buff *skb) { return TC_ACT_OK; }
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""

ROUNDS = 25
INSTANCES = 2  # datapaths per Service count (see Subject)
# The new-flow path: a ring of frontends, each the backend of the one before, so that every
# run of a BPF_PROG_TEST_RUN loop (which feeds each run the packet as the last one left it)
# is the first packet of a flow: the packet to RING[i] is DNATed to RING[i + 1], a tuple new
# to conntrack. A loop of RING_SIZE runs stays on new flows. Each measured loop starts from a
# client port of its own, right after a loop from another one that brings the program and
# the ring's service entries into the caches: what is measured is a new flow to services
# in use, whose conntrack buckets and LRU nodes are new (cold) as they would be.
RING_SIZE = 32
RING_BASE = 0x0A620000  # 10.98.0.0/16, clear of VIP and of the filler frontends
RING_PORTS = 10000  # client ports of the ring's loops: two per round
FILLER_BASE = 0x0A600000 + 100  # 10.96.0.100 on: up to 10.97.134.x for 100,000
COLD_FRAMES = 2000  # frames of the single-run miss, each a new flow once
COLD_PORTS = 30000  # their client ports

Hook = Literal["from_pod", "nodeport_tc", "nodeport_xdp"]


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


def _ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", value))


RING = [_ip(RING_BASE + i) for i in range(RING_SIZE)]


def fixed_frontends() -> list[Frontend]:
    """The frontends every datapath holds, whatever its Service count."""
    # The frontend under test, and one on its backend that points back at the VIP: a packet
    # rewritten by one is a conntrack hit of the other, so repeated runs stay on the hit
    # (and the reply) path with real rewrites.
    return [
        Frontend(VIP, 80, "TCP", (Backend(BACKEND, 8080),)),
        Frontend(BACKEND, 8080, "TCP", (Backend(VIP, 80),)),
        Frontend(VIP, 81, "TCP", (Backend(VIP, 81),)),  # its own backend: nothing to rewrite
        # NodePort to a local backend, and back the same way (external interface programs).
        Frontend(NODE_IP, 30080, "TCP", (Backend(BACKEND, 8081, local=True),), nodeport=True),
        Frontend(BACKEND, 8081, "TCP", (Backend(NODE_IP, 30080, local=True),), nodeport=True),
        Frontend("10.96.0.11", 80, "TCP", (Backend(IDLE_BACKEND, 8080),)),
    ] + [
        Frontend(vip, 80, "TCP", (Backend(RING[(i + 1) % RING_SIZE], 80),))
        for i, vip in enumerate(RING)
    ]


FIXED = len(fixed_frontends())


def frontends(services: int) -> list[Frontend]:
    """max(services, FIXED) frontends: the fixed ones, then fillers (one backend each)."""
    filler = Backend("10.244.200.1", 80)
    return fixed_frontends() + [
        Frontend(_ip(FILLER_BASE + i), 80, "TCP", (filler,)) for i in range(services - FIXED)
    ]


@dataclass(frozen=True)
class PathSpec:
    """One path through a program: a frame run as it is, or one made from a client port
    (frame(port)) where each loop must start on flows that are new."""

    name: str
    hook: Hook
    frame: bytes | Callable[[int], bytes]

    @property
    def xdp(self) -> bool:
        return self.hook == "nodeport_xdp"


NEW_FLOW = "conntrack miss (new flow)"
COLD_NEW_FLOW = "conntrack miss, single runs (cold)"
EMPTY = "empty program (absolute)"

NO_SERVICE = tcp_frame(CLIENT, OTHER, 40000, 80)
PATHS = (
    PathSpec("no service", "from_pod", NO_SERVICE),
    PathSpec("conntrack hit", "from_pod", tcp_frame(CLIENT, VIP, 40000, 80)),
    PathSpec("conntrack hit, nothing to rewrite", "from_pod", tcp_frame(CLIENT, VIP, 40000, 81)),
    PathSpec("reverse NAT", "from_pod", tcp_frame(BACKEND, CLIENT, 8080, 40000)),
    # Socket-level load balancing: a backend's packet to its client, no flow in conntrack.
    PathSpec("from a backend, no flow", "from_pod", tcp_frame(IDLE_BACKEND, CLIENT, 8080, 40000)),
    PathSpec(
        "NodePort DNAT, conntrack hit (tc)",
        "nodeport_tc",
        tcp_frame(EXTERNAL, NODE_IP, 40000, 30080),
    ),
    PathSpec(
        "NodePort DNAT, conntrack hit (XDP)",
        "nodeport_xdp",
        tcp_frame(EXTERNAL, NODE_IP, 40000, 30080),
    ),
    PathSpec("no NodePort (XDP)", "nodeport_xdp", tcp_frame(EXTERNAL, OTHER, 40000, 80)),
    PathSpec(NEW_FLOW, "from_pod", lambda sport: tcp_frame(CLIENT, RING[0], sport, 80, 0x02)),
)


@dataclass(eq=False)
class Subject:
    """One Service count under test: its datapaths, and what was measured: per path its cost
    in every round and the ratio to the first subject's in the same round.

    A count has several datapaths (instances, same code and entries) and its cost in a round
    is their mean: two identical datapaths differ by up to 5-7% in the hit paths, the same in
    every round (where the kernel put their programs and maps), which one instance per
    count would take for the count's doing."""

    services: int
    instances: Sequence[Datapath]
    name: str = ""  # its column: the Service count unless given
    samples: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.services:,}"

    def fd(self, hook: Hook, instance: int = 0) -> int:
        dp = self.instances[instance]
        if hook == "from_pod":
            return dp.prog_fd
        return dp.external_fd("xdp" if hook == "nodeport_xdp" else "tc")

    def prepare(self) -> None:
        """Program the frontends and open the flows the hit paths run on, in every instance;
        then a GC pass, as the agent makes every few seconds (the reply filter ready)."""
        for i, dp in enumerate(self.instances):
            dp.maps.clear()
            Programmer(dp).sync(frontends(self.services))
            for frame in (
                tcp_frame(CLIENT, VIP, 40000, 80, 0x02),
                tcp_frame(CLIENT, BACKEND, 40000, 8080, 0x02),
                tcp_frame(CLIENT, VIP, 40000, 81, 0x02),
            ):
                testrun.run(dp.prog_fd, frame, 1)
            for frame in (
                tcp_frame(EXTERNAL, NODE_IP, 40000, 30080, 0x02),
                tcp_frame(EXTERNAL, BACKEND, 40000, 8081, 0x02),
            ):
                testrun.run(self.fd("nodeport_tc", i), frame, 1)
            dp.gc()


@dataclass
class Empty:
    """The empty tc and XDP programs, whose cost every figure has taken off."""

    tc: int
    xdp: int

    def fd(self, path: PathSpec) -> int:
        return self.xdp if path.xdp else self.tc


def _round(subjects: Sequence[Subject], n: int, path: PathSpec, loops: int, empty: Empty) -> None:
    """Round n of a path: the empty program, then each subject's instances (the first of
    each, then the second..., the order rotated by n), on the path's frame loops times; each
    subject's cost (its instances' mean) recorded with its ratio to the first subject's in
    the round. A frame made per client port gets two ports per round: a loop from the first
    warms up, the second is measured."""
    if isinstance(path.frame, bytes):
        warm, frame = None, path.frame
    else:
        warm, frame = path.frame(RING_PORTS + 2 * n), path.frame(RING_PORTS + 2 * n + 1)

    def cost(fd: int) -> int:
        if warm is not None:
            testrun.run(fd, warm, loops, xdp=path.xdp)
        return testrun.run(fd, frame, loops, xdp=path.xdp)[2]

    base = cost(empty.fd(path))
    most = max(len(s.instances) for s in subjects)
    runs = [(s, i) for i in range(most) for s in subjects if i < len(s.instances)]
    k = n % len(runs)
    each = {(s, i): cost(s.fd(path.hook, i)) - base for s, i in [*runs[k:], *runs[:k]]}
    costs = {s: statistics.fmean(each[s, i] for i in range(len(s.instances))) for s in subjects}
    first = costs[subjects[0]]
    for s in subjects:
        s.samples.setdefault(path.name, []).append(costs[s])
        if s is not subjects[0] and first > 0:
            s.ratios.setdefault(path.name, []).append(costs[s] / first)


def measure_rounds(
    subjects: Sequence[Subject],
    empty: Empty,
    repeat: int,
    rounds: int = ROUNDS,
    paths: Sequence[PathSpec] = PATHS,
) -> None:
    """The repeat-based paths: rounds of (empty program, each subject) per path, each run on
    repeat // rounds packets (on the ring's length for the new flow)."""
    n = max(repeat // rounds, 1)
    for r in range(rounds):
        for path in paths:
            _round(subjects, r, path, RING_SIZE if path.name == NEW_FLOW else n, empty)
        absolute = float(testrun.run(empty.tc, NO_SERVICE, n)[2])
        for s in subjects:
            s.samples.setdefault(EMPTY, []).append(absolute)


def measure_cold(subjects: Sequence[Subject], empty: Empty, frames: int = COLD_FRAMES) -> None:
    """A flow's first packet, one run per BPF_PROG_TEST_RUN call, so the program's code and
    data may have been pushed out of the caches by the system call and Python in between.
    Each frame goes to the empty program, then to every subject (each has its own
    conntrack: the frame is a new flow to each)."""
    for i in range(frames):
        frame = tcp_frame(CLIENT, VIP, COLD_PORTS + i, 80, 0x02)
        _round(subjects, i, PathSpec(COLD_NEW_FLOW, "from_pod", frame), 1, empty)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_tables(subjects: Sequence[Subject], what: str = "Service") -> None:
    """The medians (ns), then the medians of the per-round ratios to the first subject."""
    first, rest = subjects[0], subjects[1:]
    paths = [p for p in subjects[0].samples if p != EMPTY] + [EMPTY]
    print(
        f"{'ns per packet (minus empty program)':38}" + "".join(f"{s.name:>12}" for s in subjects)
    )
    for p in paths:
        print(f"{p:38}" + "".join(f"{median(s.samples[p]):12.0f}" for s in subjects))
    if rest:
        title = f"ratio to {first.name} {what}{'' if first.name == '1' else 's'} (median of rounds)"
        print()
        print(f"{title:50}" + "".join(f"{s.name:>12}" for s in rest))
        for p in first.samples:
            if p in rest[0].ratios:
                print(f"{p:50}" + "".join(f"{median(s.ratios[p]):12.3f}" for s in rest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", default="1,100000", help="comma-separated service counts")
    ap.add_argument("--repeat", type=int, default=200_000, help="packets per path and count")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--instances", type=int, default=INSTANCES, help="datapaths per count")
    args = ap.parse_args(argv)
    counts = sorted({int(x) for x in args.services.split(",")})
    if not counts or counts[0] < 1 or min(args.repeat, args.rounds, args.instances) < 1:
        ap.error("service counts, --repeat, --rounds and --instances must be positive")

    from bcc import BPF

    empty_prog: Any = BPF(text=EMPTY_PROGRAM)
    empty = Empty(
        int(empty_prog.load_func(b"empty", BPF.SCHED_CLS).fd),
        int(empty_prog.load_func(b"empty_xdp", BPF.XDP).fd),
    )
    config = DatapathConfig(max_services=max(131072, counts[-1] + FIXED))
    tag = secrets.token_hex(4)
    with ExitStack() as stack:
        stack.callback(empty_prog.cleanup)
        instances: dict[int, list[Datapath]] = {n: [] for n in counts}
        for i in range(args.instances):  # loaded in turns, every other turn backwards
            for n in counts if i % 2 == 0 else counts[::-1]:
                pin_dir = Path("/sys/fs/bpf") / f"ebpflb-bench-{tag}-{n}-{i}"
                stack.callback(remove_pins, pin_dir)
                dp = Datapath(pin_dir, config)
                stack.callback(dp.close, cleanup=True)
                instances[n].append(dp)
        subjects = [Subject(n, instances[n]) for n in counts]
        for s in subjects:
            s.prepare()
        measure_rounds(subjects, empty, args.repeat, args.rounds)
        measure_cold(subjects, empty)
    print_tables(subjects)
    print()
    print(
        f"(services: frontends in the map, at least the {FIXED} every datapath holds; conntrack "
        "hit and reverse NAT include the rewrite; the new flow runs a ring of frontends so "
        "that each run of a loop is a new flow, the single runs one packet per call)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
