"""The datapath fuzzed through BPF_PROG_TEST_RUN: from_pod, to_pod, nodeport_xdp and nodeport_tc
get valid packets mutated by a seeded mutator (truncated at every length, bad IHL and total
lengths, IP options, fragments, other EtherTypes and protocols, VLAN tags, bad TCP data offsets
and UDP lengths, every TCP flag combination, random bytes), with ClusterIP frontends and the
NodePort frontends of test_nodeport.py installed, in node 0's namespace (FIB lookups).

The oracle is written independently of the program, from the RFCs:
- a packet the load balancer must not touch (not a whole unfragmented IPv4 TCP/UDP packet, or
  no frontend and no live reverse conntrack entry for its tuple) comes out byte for byte
  unchanged with the pass verdict;
- a rewritten packet keeps its length, differs only where NAT may write (addresses, ports,
  checksums, and MACs when the program sends it itself), goes to a backend of the frontend it
  was sent to (forward) or gets the VIP and the client from the reverse entry (reply), and its
  IPv4 and TCP/UDP checksums are valid if they were valid before (full checksums: no
  interface here is flagged for partial ones);
- a refusal (a frontend without backends) is a TCP RST or ICMP error back to the sender, with
  valid checksums.

EBPFLB_FUZZ_EXAMPLES scales the number of inputs (as for every fuzz test); EBPFLB_FUZZ_SEED
picks the mutator's seed (printed with the counts)."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import (
    CT_REVERSE,
    CtKey,
    be16_to_port,
    be32_to_ip,
    ip_to_be32,
    port_to_be16,
)
from ebpflb.datapath.testrun import (
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
)
from tests.datapath import netns
from tests.datapath import packets as P
from tests.datapath.conftest import datapath, lab  # noqa: F401  (fixtures)
from tests.datapath.test_nodeport import (  # noqa: F401  (lan_node: a fixture)
    CLIENT,
    CLIENT2,
    NODE_IP,
    SNAT_MAX,
    SNAT_MIN,
    Ext,
    ext,
    lan_node,
    tcp_in,
    udp_in,
)
from tests.datapath.test_nodeport import (
    FRONTENDS as NODEPORT_FRONTENDS,
)
from tests.fuzz.common import examples, tally

pytestmark = pytest.mark.datapath

SEED = int(os.environ.get("EBPFLB_FUZZ_SEED", "6"))

# ClusterIP frontends beside test_nodeport's (whose 10.96.0.10:80 goes to pod b, the pod the
# runs come from: hairpin), with several backends each.
CLUSTER_FRONTENDS = (
    Frontend(P.VIP2, 80, "TCP", tuple(Backend(b, 8080) for b in P.BACKENDS)),
    Frontend(P.VIP2, 53, "UDP", tuple(Backend(b, 5353) for b in P.BACKENDS[:2])),
    Frontend(P.VIP, 53, "UDP", (Backend(P.BACKENDS[3], 53),)),
    Frontend(P.VIP2, 81, "TCP", ()),  # refuses
)
FRONTENDS = NODEPORT_FRONTENDS + CLUSTER_FRONTENDS
PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
CLIENTS = (CLIENT, CLIENT2, P.CLIENT, P.CLIENT2, *P.BACKENDS)

PROGRAMS = ("from_pod", "to_pod", "nodeport_xdp", "nodeport_tc")
# Verdicts by hook (tc's and XDP's numbers overlap: TC_ACT_SHOT is XDP_PASS).
PASS = {"tc": TC_ACT_OK, "xdp": XDP_PASS}
SENT = {"tc": {TC_ACT_REDIRECT}, "xdp": {XDP_TX, XDP_REDIRECT}}  # routed: MACs may change
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}


def kernel_refuses(program: str, frame: bytes) -> bool:
    """Whether BPF_PROG_TEST_RUN refuses the frame (EINVAL) before the program runs: shorter
    than an Ethernet header, or (tc: an skb) than the IPv4 or IPv6 header its EtherType
    announces. A real interface hands such frames over (test_veth.py)."""
    if len(frame) < 14:
        return True
    if program == "nodeport_xdp":
        return False
    return len(frame) < 14 + {b"\x08\x00": 20, b"\x86\xdd": 40}.get(frame[12:14], 0)


# -------------------------------------------------------------------- the independent parser


@dataclass(frozen=True)
class Parsed:
    """A whole unfragmented IPv4 TCP/UDP packet, as RFC 791/793/768 read it."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    l4: int  # offset of the TCP/UDP header
    tot: int  # IP total length


def parse(frame: bytes) -> Parsed | None:
    """None unless the frame is a whole unfragmented IPv4 TCP/UDP packet: EtherType 0x0800
    right after the MACs, version 4, IHL >= 5, total length covering the header and within the
    frame, no MF and no offset, the TCP header (data offset >= 5, within the total length) or
    the UDP header (within it) present."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
        return None
    ihl = (frame[14] & 0x0F) * 4
    tot = struct.unpack_from("!H", frame, 16)[0]
    proto = frame[23]
    if ihl < 20 or proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    if tot < ihl or 14 + tot > len(frame):
        return None
    if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:  # MF, offset
        return None
    l4 = 14 + ihl
    hlen = 20 if proto == socket.IPPROTO_TCP else 8
    if l4 + hlen > len(frame) or hlen > tot - ihl:
        return None
    if proto == socket.IPPROTO_TCP:
        doff = (frame[l4 + 12] >> 4) * 4
        if doff < 20 or doff > tot - ihl:
            return None
    sport, dport = struct.unpack_from("!HH", frame, l4)
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    return Parsed(src, dst, sport, dport, proto, l4, tot)


def checksums_valid(frame: bytes) -> bool:
    try:
        P.check_checksums(frame)
    except AssertionError:
        return False
    return True


def l4_checksum_offset(p: Parsed) -> int:
    return p.l4 + (16 if p.proto == socket.IPPROTO_TCP else 6)


def nat_offsets(p: Parsed, routed: bool) -> set[int]:
    """The bytes NAT may write: IP checksum and addresses, ports, the L4 checksum, and the
    MACs of a packet the program sends on itself."""
    offs = set(range(24, 34)) | set(range(p.l4, p.l4 + 4))
    csum = l4_checksum_offset(p)
    offs |= {csum, csum + 1}
    if routed:
        offs |= set(range(12))
    return offs


# -------------------------------------------------------------------- the oracle


class WrongRewrite(AssertionError):
    pass


@dataclass
class Target:
    """One program run in node 0's namespace, with the oracle's view of the installed state."""

    name: str
    ext: Ext
    run_frame: Callable[[bytes], tuple[int, bytes]]
    frontends: dict[tuple[str, int, int], Frontend]
    # Runs the flows' first packets where they come in (to_pod sees only replies).
    prime: Callable[[bytes], object] | None = None

    @property
    def hook(self) -> str:
        return "xdp" if self.name == "nodeport_xdp" else "tc"

    def passed(self, verdict: int) -> bool:
        return verdict == PASS[self.hook]

    def sent(self, verdict: int) -> bool:
        return verdict in SENT[self.hook]

    def dropped(self, verdict: int) -> bool:
        return verdict == DROP[self.hook]

    def reverse_entry(self, p: Parsed) -> tuple[str, int, str, int] | None:
        """(new source, its port, new destination, its port) from the reverse conntrack entry
        of p's tuple, or None."""
        key = CtKey(
            saddr=ip_to_be32(p.src),
            daddr=ip_to_be32(p.dst),
            sport=port_to_be16(p.sport),
            dport=port_to_be16(p.dport),
            proto=p.proto,
            dir=CT_REVERSE,
            pad=0,
        )
        v = self.ext.lab.dp.maps.conntrack.lookup(key)
        if v is None:
            return None
        return (
            be32_to_ip(v.addr),
            be16_to_port(v.port),
            be32_to_ip(v.nat_addr),
            be16_to_port(v.nat_port),
        )


@dataclass
class Outcomes:
    tried: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def judge(t: Target, frame: bytes, verdict: int, out: bytes) -> str:
    """The outcome's name if the program did right; raises WrongRewrite otherwise."""
    p = parse(frame)
    unchanged = t.passed(verdict) and out == frame
    if p is None:
        if not unchanged:
            raise WrongRewrite("not a whole unfragmented IPv4 TCP/UDP packet, yet touched")
        return "untouched: not parsed"
    fe = t.frontends.get((p.dst, p.dport, p.proto))
    if fe is not None:
        return judge_forward(t, p, frame, verdict, out, fe)
    rev = t.reverse_entry(p)
    if rev is None:
        if not unchanged:
            raise WrongRewrite("no frontend and no reverse entry, yet touched")
        return "untouched: no frontend"
    if unchanged:
        return "untouched: reverse entry not ours here"  # expired, or not SNATed (external)
    if t.dropped(verdict):
        return "dropped: reply"  # e.g. no route back to the client; its bytes do not matter
    check_rewrite(t, p, frame, verdict, out)
    got = rewritten_tuple(out, p)
    if got != rev:
        raise WrongRewrite(f"reply rewritten to {got}, the reverse entry says {rev}")
    return "reverse NAT"


def judge_forward(
    t: Target, p: Parsed, frame: bytes, verdict: int, out: bytes, fe: Frontend
) -> str:
    if t.passed(verdict) and out == frame:
        return "untouched: frontend, left to tc" if t.hook == "xdp" else "untouched: frontend"
    if t.dropped(verdict):
        return "dropped: frontend"  # no SNAT port, no route; its bytes do not matter
    if not fe.backends:
        return judge_refusal(t, p, verdict, out)
    check_rewrite(t, p, frame, verdict, out)
    src, sport, dst, dport = rewritten_tuple(out, p)
    if (dst, dport) not in {(b.ip, b.port) for b in fe.backends}:
        raise WrongRewrite(f"DNAT to {dst}:{dport}, not a backend of {fe.vip}:{fe.port}")
    if (src, sport) == (p.src, p.sport):
        return "DNAT"
    if src == NODE_IP and t.name.startswith("nodeport") and SNAT_MIN <= sport <= SNAT_MAX:
        return "DNAT+SNAT"
    if src == P.HAIRPIN and dst == p.src and sport == p.sport and t.name == "from_pod":
        return "DNAT hairpin"
    raise WrongRewrite(f"source rewritten to {src}:{sport}")


def judge_refusal(t: Target, p: Parsed, verdict: int, out: bytes) -> str:
    if not t.sent(verdict):
        raise WrongRewrite(f"refusal with verdict {verdict}")
    if not checksums_valid(out) or socket.inet_ntoa(out[30:34]) != p.src:
        raise WrongRewrite("refusal not a valid packet back to the sender")
    return "refused"


def rewritten_tuple(out: bytes, p: Parsed) -> tuple[str, int, str, int]:
    sport, dport = struct.unpack_from("!HH", out, p.l4)
    return socket.inet_ntoa(out[26:30]), sport, socket.inet_ntoa(out[30:34]), dport


def check_rewrite(t: Target, p: Parsed, frame: bytes, verdict: int, out: bytes) -> None:
    if not (t.passed(verdict) or t.sent(verdict)):
        raise WrongRewrite(f"rewritten with verdict {verdict}")
    if len(out) != len(frame):
        raise WrongRewrite(f"length {len(frame)} became {len(out)}")
    allowed = nat_offsets(p, t.sent(verdict))
    changed = [i for i, (a, b) in enumerate(zip(frame, out, strict=True)) if a != b]
    if stray := [i for i in changed if i not in allowed]:
        raise WrongRewrite(f"bytes NAT must not write changed: {stray[:8]}")
    if checksums_valid(frame) and not checksums_valid(out):
        raise WrongRewrite("valid checksums became invalid")
    if p.proto == socket.IPPROTO_UDP:
        off = l4_checksum_offset(p)
        if (frame[off : off + 2] == b"\0\0") != (out[off : off + 2] == b"\0\0"):
            raise WrongRewrite("UDP checksum 0 (none) appeared or vanished")


# -------------------------------------------------------------------- the inputs


def fix_checksums(frame: bytes) -> bytes:
    """The IPv4 header checksum and the TCP/UDP checksum made right where the header says
    enough to compute them (over the total length's segment)."""
    b = bytearray(frame)
    if len(b) < 34 or b[12:14] != b"\x08\x00":
        return frame
    ihl = (b[14] & 0x0F) * 4
    if ihl < 20 or 14 + ihl > len(b):
        return frame
    struct.pack_into("!H", b, 24, 0)
    struct.pack_into("!H", b, 24, 0xFFFF - P.ones_sum(bytes(b[14 : 14 + ihl])))
    tot = struct.unpack_from("!H", b, 16)[0]
    proto, l4 = b[23], 14 + ihl
    end = 14 + tot
    off = l4 + (16 if proto == socket.IPPROTO_TCP else 6)
    if proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) or tot < ihl or end > len(b):
        return bytes(b)
    if off + 2 > end or (proto == socket.IPPROTO_UDP and b[off : off + 2] == b"\0\0"):
        return bytes(b)
    struct.pack_into("!H", b, off, 0)
    pseudo = bytes(b[26:34]) + struct.pack("!BBH", 0, proto, end - l4)
    csum = 0xFFFF - P.ones_sum(pseudo + bytes(b[l4:end]))
    struct.pack_into("!H", b, off, csum or (0xFFFF if proto == socket.IPPROTO_UDP else 0))
    return bytes(b)


def _set_byte(f: bytearray, off: int, value: int) -> None:
    if off < len(f):
        f[off] = value & 0xFF


def _set_u16(f: bytearray, off: int, value: int) -> None:
    if off + 2 <= len(f):
        struct.pack_into("!H", f, off, value & 0xFFFF)


def _l4(f: bytearray) -> int:
    return 14 + (f[14] & 0x0F) * 4 if len(f) > 14 else 34


def _options(rng: random.Random, f: bytearray) -> bytearray:
    """IP options inserted after the header, IHL and total length raised to match (or not)."""
    if len(f) < 34:
        return f
    n = rng.choice([4, 8, 20, 40])
    opts = rng.choice([P.RTR_ALERT * (n // 4), b"\x01" * (n - 1) + b"\x00", rng.randbytes(n)])
    g = f[:34] + opts + f[34:]
    g[14] = 0x40 | min(15, 5 + len(opts) // 4)
    _set_u16(g, 16, struct.unpack_from("!H", f, 16)[0] + len(opts))
    return g


def _vlan(rng: random.Random, f: bytearray) -> bytearray:
    tpid = rng.choice([b"\x81\x00", b"\x88\xa8"])
    return f[:12] + tpid + rng.randbytes(2) + f[12:]


MUTATIONS: list[Callable[[random.Random, bytearray], bytearray | None]] = [
    lambda r, f: f[: r.randrange(len(f) + 1)],  # truncated
    lambda r, f: _set_byte(f, 14, 0x40 | r.randrange(16)),  # IHL
    lambda r, f: _set_byte(f, 14, r.randrange(16) << 4 | 5),  # version
    lambda r, f: _set_u16(f, 16, r.randrange(0x10000)),  # total length, anything
    lambda r, f: _set_u16(f, 16, len(f) - 14 + r.randrange(1, 64)),  # beyond the frame
    lambda r, f: _set_u16(f, 16, r.randrange(0, 48)),  # shorter than the headers
    _options,
    lambda r, f: _set_u16(f, 20, 0x2000 | r.randrange(0x2000) * r.randrange(2)),  # MF
    lambda r, f: _set_u16(f, 20, r.randrange(1, 0x2000) | r.choice([0, 0x4000])),  # offset
    lambda r, f: _set_byte(f, 23, r.choice([1, 2, 4, 41, 47, 50, 58, 132, 136, r.randrange(256)])),
    lambda r, f: _set_u16(f, 12, r.choice([0x86DD, 0x0806, 0x8100, 0x88A8, 0x8847, 0x0800, 0])),
    _vlan,
    lambda r, f: _set_byte(f, _l4(f) + 12, r.randrange(16) << 4),  # TCP data offset
    lambda r, f: _set_u16(f, _l4(f) + 4, r.randrange(0x10000)),  # UDP length
    lambda r, f: _set_byte(f, _l4(f) + 13, r.randrange(256)),  # TCP flags
    lambda r, f: _set_byte(f, r.randrange(len(f)), r.randrange(256)) if f else None,
    lambda r, f: f + r.randbytes(r.randrange(1, 32)),  # trailing bytes past the total length
    lambda r, f: _set_u16(f, _l4(f) + 6 if len(f) > 23 and f[23] == 17 else 0, 0),  # no UDP csum
]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    f = bytearray(frame)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        g = rng.choice(MUTATIONS)(rng, f)
        if g is not None:
            f = g
    out = bytes(f)
    return fix_checksums(out) if rng.random() < 0.8 else out


def replies(t: Target, rng: random.Random) -> list[bytes]:
    """Replies to flows the program has seen: the exact tuples of reverse conntrack entries."""
    frames = []
    keys = [k for k, _ in t.ext.lab.dp.maps.conntrack.items() if k.dir == CT_REVERSE]
    # In a fixed order (the map's is not), so that a seed makes the same inputs.
    keys.sort(key=lambda k: (k.saddr, k.daddr, k.sport, k.dport, k.proto))
    for k in keys:
        src, dst = be32_to_ip(k.saddr), be32_to_ip(k.daddr)
        sport, dport = be16_to_port(k.sport), be16_to_port(k.dport)
        if k.proto == socket.IPPROTO_TCP:
            flags = rng.choice(["SA", "A", "PA", "FA", "R"])
            frames.append(P.tcp(src, dst, sport, dport, flags, payload=rng.randbytes(8)))
        else:
            frames.append(P.udp(src, dst, sport, dport, payload=rng.randbytes(8)))
    return frames


def requests(rng: random.Random) -> list[bytes]:
    """Valid packets to every frontend, to no frontend, from pods and from outside."""
    out = []
    for fe in FRONTENDS:
        for src in (rng.choice(CLIENTS), rng.choice(CLIENTS)):
            sport = rng.randrange(1024, 65536)
            flags = rng.choice(["S", "S", "A", "PA", "SA", "F", "R", "SFRPAUEC", ""])
            payload = rng.randbytes(rng.choice([0, 1, 13, 200]))
            if fe.protocol == "TCP":
                frame = P.tcp(src, fe.vip, sport, fe.port, flags, payload=payload)
            else:
                frame = P.udp(src, fe.vip, sport, fe.port, payload=payload)
            out.append(frame)
    out += [
        P.tcp(CLIENT, NODE_IP, 40000, 22),
        P.tcp(P.CLIENT, P.OTHER, 40000, 80),
        P.udp(P.CLIENT, P.VIP2, 40000, 54),
        P.tcp(CLIENT, P.VIP2, 40000, 80, options=P.MAX_OPTIONS),
        tcp_in(30080, options=P.RTR_ALERT),
        udp_in(30054, no_checksum=True),
        P.udp(P.CLIENT, P.VIP2, 40000, 53, no_checksum=True),
        P.icmp_echo(),
        P.arp_request(),
        P.ipv6_tcp(),
        rng.randbytes(rng.randrange(14, 120)),
    ]
    return out


def inputs(t: Target, rng: random.Random, n: int) -> Iterator[bytes]:
    """n frames: every truncation of a few valid ones, then valid and mutated ones, the pool
    renewed (with the replies of the flows made meanwhile) every few hundred."""
    whole = [tcp_in(30080, payload=b"x"), udp_in(30054), P.tcp(dport=80), P.udp(P.CLIENT, P.VIP2)]
    sweep = [w[:i] for w in whole for i in range(len(w) + 1)]
    yield from sweep[:n]
    pool: list[bytes] = []
    for i in range(n - len(sweep)):
        if i % 500 == 0:
            pool = requests(rng)
            if t.prime is not None:
                for frame in pool:
                    t.prime(frame)
            pool += replies(t, rng)
        frame = rng.choice(pool)
        yield frame if rng.random() < 0.25 else mutate(rng, frame)


# -------------------------------------------------------------------- the test


@pytest.fixture
def fuzz_ext(ext: Ext) -> Ext:  # noqa: F811  (test_nodeport's fixture)
    """test_nodeport's node with our ClusterIP frontends added."""
    ext.lab.sync(*FRONTENDS)
    return ext


def targets(e: Ext) -> dict[str, Target]:
    lb = e.lab
    runs: dict[str, Callable[[bytes], tuple[int, bytes]]] = {
        "from_pod": lambda f: lb.run(f, e.pod_veth),
        "to_pod": lb.run_egress,
        "nodeport_xdp": lambda f: lb.run_external("xdp", f, e.eth0),
        "nodeport_tc": lambda f: lb.run_external("tc", f, e.eth0),
    }
    every = {(fe.vip, fe.port, PROTO[fe.protocol]): fe for fe in FRONTENDS}
    nodeports = {k: fe for k, fe in every.items() if fe.nodeport}
    out = {
        name: Target(name, e, run, every if name == "from_pod" else nodeports)
        for name, run in runs.items()
    }
    # to_pod does reverse NAT only: its flows are made by from_pod.
    out["to_pod"].frontends = {}
    out["to_pod"].prime = runs["from_pod"]
    return out


@pytest.mark.parametrize("program", PROGRAMS)
def test_fuzz_datapath(fuzz_ext: Ext, program: str) -> None:
    t = targets(fuzz_ext)[program]
    rng = random.Random(f"{SEED}-{program}")
    target = tally(f"datapath {program} (seed {SEED})")
    wrong: list[str] = []
    target.outcomes["wrong rewrite"] += 0  # listed even when none
    with netns.inside(fuzz_ext.ns):
        for frame in inputs(t, rng, examples(6000)):
            target.tried += 1
            try:
                verdict, out = t.run_frame(frame)
            except OSError as e:
                if e.errno == errno.EINVAL and kernel_refuses(program, frame):
                    target.outcomes["refused by BPF_PROG_TEST_RUN: too short"] += 1
                    continue
                target.crashes += 1
                wrong.append(f"run error {e} on {frame.hex()}")
                continue
            try:
                target.outcomes[judge(t, frame, verdict, out)] += 1
            except WrongRewrite as e:
                target.outcomes["wrong rewrite"] += 1
                wrong.append(f"{e}: verdict {verdict}\n{frame.hex()}\n{out.hex()}")
    errors = fuzz_ext.lab.counters()["errors"]
    target.outcomes["datapath errors counter"] += errors
    assert not wrong, f"{len(wrong)} wrong results, the first:\n" + "\n".join(wrong[:40])


def test_the_oracle_catches_wrong_rewrites(fuzz_ext: Ext) -> None:
    """The oracle above is not vacuous: a right DNAT passes it, and each way of spoiling it
    (a byte NAT must not write, a broken checksum, a destination that is no backend, a packet
    that is no frontend's rewritten) is a WrongRewrite."""
    t = targets(fuzz_ext)["from_pod"]
    frame = P.tcp(P.CLIENT, P.VIP2, 40000, 80, "S")
    with netns.inside(fuzz_ext.ns):
        verdict, out = t.run_frame(frame)
    assert judge(t, frame, verdict, out) == "DNAT"
    ttl = bytearray(out)
    ttl[22] -= 1
    bad_csum = bytearray(out)
    bad_csum[50] ^= 0xFF
    elsewhere = out[:30] + bytes([10, 244, 0, 99]) + out[34:]
    for spoiled in (bytes(ttl), bytes(bad_csum), fix_checksums(elsewhere)):
        with pytest.raises(WrongRewrite):
            judge(t, frame, verdict, spoiled)
    other = P.tcp(P.CLIENT, P.OTHER, 40000, 80)
    with pytest.raises(WrongRewrite):
        judge(t, other, TC_ACT_OK, fix_checksums(other[:30] + out[30:34] + other[34:]))
