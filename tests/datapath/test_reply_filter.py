"""The reply filter (reply_filter, bpf/filter.h lb_reply_may_exist): the program marks a
backend's address before it inserts a reverse entry, the GC pass rebuilds the filter, and once
both bitmaps are rebuilt a packet from a backend address with no reverse entry skips the
conntrack lookup while every reply of a live flow is still translated."""

from __future__ import annotations

import os
import random
import threading

import pytest

from ebpflb.datapath import conntrack, replyfilter
from ebpflb.datapath.conntrack import now_ns
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.replyfilter import ReplyFilter
from ebpflb.datapath.structs import CT_REVERSE, U32, U64, ip_to_be32
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import Lab

pytestmark = pytest.mark.datapath

B0, B1 = P.BACKENDS[0], P.BACKENDS[1]


def rf(lab: Lab) -> ReplyFilter:
    assert lab.dp.maps.reply_filter is not None
    return ReplyFilter(lab.dp.maps.reply_filter)


def svc(*backends: str, vip: str = P.VIP) -> Frontend:
    return Frontend(vip, 80, "TCP", tuple(Backend(b, 8080) for b in backends))


def reply(backend: str, sport: int = 40000) -> bytes:
    return P.tcp(src=backend, dst=P.CLIENT, sport=8080, dport=sport, flags="SA")


def translated(sport: int = 40000, vip: str = P.VIP) -> bytes:
    return P.tcp(src=vip, dst=P.CLIENT, sport=80, dport=sport, flags="SA")


def epoch_marks(lab: Lab, epoch: int) -> dict[int, int]:
    """An epoch's marks (clear bits, as set bits) by word offset in its bitmap."""
    m = lab.dp.maps.reply_filter
    assert m is not None
    lo = replyfilter.first_index(epoch)
    words = {
        k.value - lo: replyfilter.NONE ^ v.value
        for k, v in m.items()
        if lo <= k.value < lo + replyfilter.WORDS
    }
    return {o: w for o, w in words.items() if w}


def current(lab: Lab) -> int:
    return 1 if rf(lab).state() & replyfilter.EPOCH else 0


def test_not_ready_every_reply_is_looked_up(lab: Lab) -> None:
    """Maps as a migration or a test leaves them: zeros, which mark every address in both
    epochs. Every reply is looked up."""
    lab.sync(svc(B0), svc(B1, vip=P.VIP2))
    assert rf(lab).state() == 0 and epoch_marks(lab, 0) == epoch_marks(lab, 1)
    assert len(epoch_marks(lab, 0)) == replyfilter.WORDS
    lab.run(P.tcp())
    _, out = lab.run(reply(B0))
    P.assert_frame(out, translated())
    stray = reply(B1)  # a backend of no flow: looked up, not found
    assert lab.run(stray) == (TC_ACT_OK, stray)
    c = lab.counters()
    assert (c["rev_nat"], c["passed"], c["rev_skipped"]) == (1, 1, 0)


def test_the_program_marks_the_slot_the_agent_computes(lab: Lab) -> None:
    """A rebuilt filter, then 300 random backends, one flow each: the current epoch marks
    exactly Python's marks() of them (the slots agree), the other none; the next pass
    rewrites nothing, and every reply is translated."""
    rnd = random.Random(7)
    pairs = {
        f"10.{rnd.randrange(96, 112)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}": (
            f"10.245.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        )
        for _ in range(300)
    }
    lab.sync(*(svc(be, vip=vip) for vip, be in pairs.items()))
    assert lab.dp.gc().reply_filter_written == 2 * replyfilter.WORDS  # from zeros
    assert rf(lab).ready and epoch_marks(lab, 0) == epoch_marks(lab, 1) == {}
    for i, vip in enumerate(pairs):
        lab.run(P.tcp(dst=vip, sport=10000 + i))
    want = replyfilter.marks(ip_to_be32(be) for be in pairs.values())
    now = current(lab)
    assert epoch_marks(lab, now) == want and epoch_marks(lab, 1 - now) == {}
    assert lab.dp.gc().reply_filter_written == 0  # the scan's marks are the program's
    for i, (vip, be) in enumerate(pairs.items()):
        _, out = lab.run(reply(be, 10000 + i))
        P.assert_frame(out, translated(10000 + i, vip))
    assert (lab.counters()["rev_nat"], lab.counters()["rev_skipped"]) == (len(pairs), 0)


def test_a_backend_without_reverse_entries_skips_the_lookup(lab: Lab) -> None:
    """Rebuilt, the backend marked in neither epoch: its packets are passed without the
    lookup, which a reverse entry written behind the filter's back (not marked) proves; the
    next pass sees that entry in conntrack and its reply is translated again."""
    lab.sync(svc(B0))
    lab.run(P.tcp())
    saved = [(k, v) for k, v in lab.dp.maps.conntrack.items()]
    for k, _ in saved:
        lab.dp.maps.conntrack.delete(k)
    lab.dp.gc()  # not ready: both epochs rewritten
    assert rf(lab).ready and not rf(lab).may_exist(ip_to_be32(B0))
    for k, v in saved:
        lab.dp.maps.conntrack.update(k, v)
    frame = reply(B0)
    assert lab.run(frame) == (TC_ACT_OK, frame)
    c = lab.counters()
    assert (c["rev_nat"], c["passed"], c["rev_skipped"]) == (0, 1, 1)

    lab.dp.gc()
    assert rf(lab).may_exist(ip_to_be32(B0))
    _, out = lab.run(frame)
    P.assert_frame(out, translated())
    assert lab.counters()["rev_skipped"] == 1


def test_replies_of_flows_made_before_and_after_rebuilds_are_translated(lab: Lab) -> None:
    """Flows made in either epoch, across several passes: every reply is translated, none
    skipped; a backend of no flow is skipped."""
    lab.sync(svc(B0), svc(B1, vip=P.VIP2), svc(P.BACKENDS[2], vip="10.96.0.12"))
    lab.run(P.tcp(sport=40000))
    lab.dp.gc()
    lab.run(P.tcp(dst=P.VIP2, sport=40001))
    for _ in range(3):
        _, out = lab.run(reply(B0, 40000))
        P.assert_frame(out, translated(40000))
        _, out = lab.run(reply(B1, 40001))
        P.assert_frame(out, translated(40001, P.VIP2))
        lab.dp.gc()
    stray = reply(P.BACKENDS[2])
    assert lab.run(stray) == (TC_ACT_OK, stray)
    c = lab.counters()
    assert (c["rev_nat"], c["rev_skipped"]) == (6, 1)


def test_a_flow_made_after_the_flip_keeps_its_bit(lab: Lab) -> None:
    """The rebuild's steps one by one, a flow made after the flip and before the rewrite:
    the scan (taken before the flow) lacks it, but its bit is in the new epoch, which the
    rewrite leaves alone."""
    lab.sync(svc(B0))
    lab.dp.gc()
    f = rf(lab)
    old = f.flip()
    assert f.wait()  # membarrier: a grace period, on this 2-CPU machine
    scanned = [k.saddr for k, _ in lab.dp.maps.conntrack.items() if k.dir == CT_REVERSE]
    assert scanned == []
    lab.run(P.tcp())
    assert f.marked(ip_to_be32(B0), 1 - old) and not f.marked(ip_to_be32(B0), old)
    f.rewrite(old, scanned)
    _, out = lab.run(reply(B0))
    P.assert_frame(out, translated())
    lab.dp.gc()  # and the next pass finds it in conntrack
    _, out = lab.run(reply(B0))
    P.assert_frame(out, translated())
    assert (lab.counters()["rev_nat"], lab.counters()["rev_skipped"]) == (2, 0)


def test_a_collected_flow_loses_its_mark(lab: Lab) -> None:
    """A flow the GC collects: its mark is gone from the bitmap rewritten in that pass, and
    from the other (the epoch current then) in the next, after which its backend's packets
    skip the lookup."""
    lab.sync(svc(B0))
    lab.run(P.tcp())  # a SYN: 60 s
    lab.dp.gc()
    b0 = ip_to_be32(B0)
    assert rf(lab).may_exist(b0)
    later = now_ns() + 100 * 10**9
    stats = conntrack.collect(lab.dp.maps, later)
    assert stats.conntrack_deleted == 2
    assert rf(lab).may_exist(b0)  # still in the epoch that was current
    conntrack.collect(lab.dp.maps, later)
    assert not rf(lab).may_exist(b0)
    frame = reply(B0)
    assert lab.run(frame) == (TC_ACT_OK, frame)
    assert lab.counters()["rev_skipped"] == 1


def test_only_words_that_differ_are_written(lab: Lab) -> None:
    lab.sync(svc(B0), svc(B1, vip=P.VIP2))
    lab.run(P.tcp())
    lab.run(P.tcp(dst=P.VIP2))
    assert lab.dp.gc().reply_filter_written == 2 * replyfilter.WORDS  # from zeros, twice
    assert lab.dp.gc().reply_filter_written == 0
    assert lab.dp.gc().reply_filter_written == 0
    m = lab.dp.maps.reply_filter
    assert m is not None
    m.update(U32(replyfilter.first_index(current(lab)) + 5), U64(0))  # a stray mark
    assert lab.dp.gc().reply_filter_written == 1  # the next pass rewrites that epoch
    assert lab.dp.gc().reply_filter_written == 0


def test_no_gc_rebuild_leaves_it_not_ready(lab: Lab) -> None:
    """collect(reply_filter=False), as Datapath.gc() does while a migration waits."""
    lab.sync(svc(B0))
    lab.run(P.tcp())
    stats = conntrack.collect(lab.dp.maps, reply_filter=False)
    assert stats.reply_filter_written == -1 and rf(lab).state() == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="membarrier waits only with 2+ CPUs")
def test_rebuilds_while_flows_are_made(lab: Lab) -> None:
    """Flows to 64 backends made without pause on another thread while the GC collects
    every entry it scans and rebuilds, 20 times: after each pass every reverse entry then in
    conntrack has its backend marked (those made after the scan, in the current epoch)."""
    vips = [f"10.97.0.{i}" for i in range(1, 65)]
    backends = [f"10.245.0.{i}" for i in range(1, 65)]
    lab.sync(*(svc(be, vip=vip) for vip, be in zip(vips, backends, strict=True)))
    frames = [P.tcp(dst=vips[i % 64], sport=1024 + i) for i in range(4000)]
    stop = threading.Event()

    def make_flows() -> None:
        while not stop.is_set():
            for frame in frames:
                lab.run(frame)
                if stop.is_set():
                    return

    t = threading.Thread(target=make_flows)
    t.start()
    try:
        f = rf(lab)
        for _ in range(20):
            stats = conntrack.collect(lab.dp.maps, now_ns() + 10**12)  # everything is old
            assert stats.reply_filter_written >= 0
            live = {k.saddr for k, _ in lab.dp.maps.conntrack.items() if k.dir == CT_REVERSE}
            assert all(f.may_exist(a) for a in live)
    finally:
        stop.set()
        t.join()
    assert lab.counters()["errors"] == 0
