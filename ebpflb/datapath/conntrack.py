"""Conntrack and affinity garbage collection, and a readable listing of conntrack entries."""

from __future__ import annotations

from dataclasses import dataclass

from ebpflb.datapath import _libbpf, kclock
from ebpflb.datapath.maps import BpfMap, LbMaps, Row
from ebpflb.datapath.replyfilter import ReplyFilter
from ebpflb.datapath.structs import (
    CT_F_CLOSING,
    CT_F_ESTABLISHED,
    CT_F_HAIRPIN,
    CT_F_SNAT,
    CT_REVERSE,
    PROTOCOL_NAMES,
    SVC_F_AFFINITY,
    AffinityKey,
    CtKey,
    CtValue,
    be16_to_port,
    be32_to_ip,
)

NSEC_PER_SEC = 1_000_000_000


def now_ns() -> int:
    """The datapath's clock, what lb_now() in bpf/conntrack.h returns now: ns since boot
    from the kernel's jiffies (tick resolution), or CLOCK_MONOTONIC_COARSE where their HZ
    is unknown (see kclock.clock())."""
    return kclock.now()


def ct_expired(value: CtValue, now: int) -> bool:
    """Same rule as ct_expired() in bpf/conntrack.h."""
    return max(now - value.last_seen, 0) > value.lifetime * NSEC_PER_SEC


@dataclass(frozen=True)
class GcStats:
    """What one collect() looked at and removed."""

    conntrack_scanned: int = 0
    conntrack_deleted: int = 0
    affinity_scanned: int = 0
    affinity_deleted: int = 0
    reply_filter_written: int = -1  # words of the reply filter rewritten; -1: not rebuilt


def collect(maps: LbMaps, now: int | None = None, *, reply_filter: bool = True) -> GcStats:
    """Delete expired conntrack entries, and affinity entries that are idle past their
    service's timeout or whose service is gone or no longer has affinity; rebuild the reply
    filter (if the maps have one and reply_filter says so) around the conntrack scan (see
    replyfilter.py: its epoch flipped before, the reverse entries kept marked after; while
    it is not ready, a round on a scan of its own first).

    An entry is read again just before it is deleted, so one the datapath refreshed
    meanwhile survives (the window left is a few microseconds; losing an entry
    then only rebalances the flow by the same hash).
    """
    rf = ReplyFilter(maps.reply_filter) if reply_filter and maps.reply_filter is not None else None
    rf_written = -1
    if rf is not None:
        rf_written = 0 if rf.ready else rf.round(lambda: _reverse_backends(maps.conntrack.rows()))
        old_epoch = rf.flip()
        rf.wait()
    t = now_ns() if now is None else now
    rows = maps.conntrack.rows()
    ct_deleted = 0
    backends = []  # the saddr of every reverse entry left
    for key_row, (last_seen, lifetime, *_) in rows:
        if max(t - last_seen, 0) > lifetime * NSEC_PER_SEC:
            key = CtKey(*key_row)
            again = maps.conntrack.lookup(key)
            if again is not None and ct_expired(again, t) and maps.conntrack.delete(key):
                ct_deleted += 1
                continue
        if key_row[5] == CT_REVERSE:
            backends.append(key_row[0])
    if rf is not None:
        rf_written += rf.rewrite(old_epoch, backends)
        rf.set_ready()

    timeouts = {
        svc_id: timeout
        for _, (svc_id, _, flags, _, timeout) in maps.services.rows()
        if flags & SVC_F_AFFINITY
    }
    aff_rows = maps.affinity.rows()
    aff_deleted = 0
    for (svc_id, client), (last_used, *_) in aff_rows:
        timeout = timeouts.get(svc_id)
        idle = timeout is None or max(t - last_used, 0) > timeout * NSEC_PER_SEC
        if idle and maps.affinity.delete(AffinityKey(svc_id, client)):
            aff_deleted += 1
    return GcStats(len(rows), ct_deleted, len(aff_rows), aff_deleted, rf_written)


def _reverse_backends(rows: list[tuple[Row, Row]]) -> list[int]:
    """The saddr of every reverse entry of conntrack rows."""
    return [key[0] for key, _ in rows if key[5] == CT_REVERSE]


@dataclass(frozen=True)
class CtFill:
    """How full the conntrack map is. When it is full, every new flow evicts the least
    recently used entry (the counters' ct_lost says how many flows then lost theirs)."""

    entries: int
    capacity: int  # max_entries (DatapathConfig.max_conntrack); 0 if unknown
    expired: int  # of the entries: expired, not yet collected

    @property
    def percent(self) -> float:
        return 100.0 * self.entries / self.capacity if self.capacity else 0.0

    def __str__(self) -> str:
        return (
            f"conntrack: {self.entries}/{self.capacity} entries ({self.percent:.1f}%), "
            f"{self.expired} expired"
        )


def fill(maps: LbMaps, now: int | None = None) -> CtFill:
    """Count the conntrack entries (one batched walk of the map) against its capacity."""
    t = now_ns() if now is None else now
    rows = maps.conntrack.rows()
    expired = sum(
        max(t - last_seen, 0) > lifetime * NSEC_PER_SEC for _, (last_seen, lifetime, *_) in rows
    )
    ct = maps.conntrack
    capacity = _libbpf.map_info(ct.fd).max_entries if isinstance(ct, BpfMap) else 0
    return CtFill(len(rows), capacity, expired)


@dataclass(frozen=True)
class CtEntry:
    """One conntrack entry in readable form."""

    direction: str  # "forward" (client -> VIP) or "reverse" (backend -> client)
    protocol: str
    src: str  # "ip:port" as the key has it
    dst: str
    nat: str  # forward: backend ip:port (new destination); reverse: VIP ip:port (new source)
    nat_peer: str  # forward: new source (client, hairpin or SNAT); reverse: client (new dest)
    svc_id: int
    backend_id: int
    state: str  # "syn", "established", "closing", "udp"; "+hairpin", "+snat"
    age_s: float
    lifetime_s: int
    expired: bool


def entries(maps: LbMaps, now: int | None = None) -> list[CtEntry]:
    """Every conntrack entry, for dumps and debugging."""
    t = now_ns() if now is None else now
    out = []
    for k, v in maps.conntrack.items():
        proto = PROTOCOL_NAMES.get(k.proto, str(k.proto))
        if proto != "TCP":
            state = "udp"
        elif v.flags & CT_F_CLOSING:
            state = "closing"
        elif v.flags & CT_F_ESTABLISHED:
            state = "established"
        else:
            state = "syn"
        if v.flags & CT_F_HAIRPIN:
            state += "+hairpin"
        if v.flags & CT_F_SNAT:
            state += "+snat"
        out.append(
            CtEntry(
                direction="reverse" if k.dir == CT_REVERSE else "forward",
                protocol=proto,
                src=f"{be32_to_ip(k.saddr)}:{be16_to_port(k.sport)}",
                dst=f"{be32_to_ip(k.daddr)}:{be16_to_port(k.dport)}",
                nat=f"{be32_to_ip(v.addr)}:{be16_to_port(v.port)}",
                nat_peer=f"{be32_to_ip(v.nat_addr)}:{be16_to_port(v.nat_port)}",
                svc_id=v.svc_id,
                backend_id=v.backend_id,
                state=state,
                age_s=max(t - v.last_seen, 0) / NSEC_PER_SEC,
                lifetime_s=v.lifetime,
                expired=ct_expired(v, t),
            )
        )
    return out
