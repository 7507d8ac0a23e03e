"""The reply filter's words and the rebuild's steps on in-memory maps (replyfilter.py)."""

from __future__ import annotations

import random

import pytest

from ebpflb.datapath import addrfilter, conntrack, replyfilter
from ebpflb.datapath.fake import DictMap, fake_maps
from ebpflb.datapath.replyfilter import EPOCH, READY, WORDS, ReplyFilter, first_index, marks
from ebpflb.datapath.structs import CT_FORWARD, CT_REVERSE, U32, U64, CtKey, CtValue

pytestmark = pytest.mark.unit


def test_both_filters_share_the_slot() -> None:
    """slots() is the address filter's slot (2 bits each there) and the reply filter's (1)."""
    rnd = random.Random(3)
    addrs = [rnd.getrandbits(32) for _ in range(1000)]
    got = addrfilter.slots(addrs)
    assert got == [addrfilter.slot(a) for a in addrs]
    assert all(0 <= s < addrfilter.SLOTS for s in got)
    for a, s in zip(addrs, got, strict=True):
        assert addrfilter.position(a, addrfilter.BACKEND) == (1 + s // 32, 2 << 2 * (s % 32))


def test_layout() -> None:
    assert (WORDS, replyfilter.ENTRIES) == (16384, 32769)
    assert (first_index(0), first_index(1)) == (1, 1 + WORDS)
    a = 0x1500F40A  # 10.244.0.21 as the __be32 reads on a little-endian host
    (s,) = addrfilter.slots([a])
    assert marks([a, a]) == {s // 64: 1 << s % 64}
    rnd = random.Random(4)
    addrs = [rnd.getrandbits(32) for _ in range(5000)]
    words = marks(addrs)
    assert sum(bin(w).count("1") for w in words.values()) == len(set(addrfilter.slots(addrs)))
    assert all(words[addrfilter.slot(x) // 64] >> addrfilter.slot(x) % 64 & 1 for x in addrs)


def test_the_steps() -> None:
    f = ReplyFilter(DictMap(U32, U64, "reply_filter"))
    a, b = 0x1500F40A, 0x1600F40A
    assert (f.state(), f.ready, f.may_exist(a), f.may_exist(b)) == (0, False, True, True)
    assert f.flip() == 0 and f.state() == EPOCH
    assert f.wait()  # not a kernel map: nothing to wait for
    assert f.rewrite(0, [a]) == WORDS  # from zeros: every word
    assert f.marked(a, 0) and not f.marked(b, 0)
    assert f.may_exist(b)  # epoch 1, never rewritten, marks every address
    assert f.round(lambda: [a]) == WORDS and f.state() == 0  # epoch 1 rewritten, 0 current
    f.set_ready()
    assert f.state() == READY and f.may_exist(a) and not f.may_exist(b)
    assert f.rewrite(1, [a]) == 0  # nothing differs
    # a gone: unmarked in epoch 0 (current until then), and in epoch 1 a round later.
    assert f.round(lambda: []) == 1 and f.may_exist(a)
    assert f.round(lambda: []) == 1 and not f.may_exist(a)
    assert f.state() == READY  # ready kept by the flips


def test_a_rebuild_from_zeros_rewrites_both_bitmaps() -> None:
    f = ReplyFilter(DictMap(U32, U64, "reply_filter"))
    a, b = 0x1500F40A, 0x1600F40A
    assert f.rebuild(lambda: [a]) == 2 * WORDS
    assert f.ready and f.may_exist(a) and not f.may_exist(b)
    assert f.rebuild(lambda: [a]) == 0


def test_collect_rebuilds_from_the_reverse_entries_it_keeps() -> None:
    maps = fake_maps()
    now = conntrack.now_ns()
    live, old, fwd = 0x1500F40A, 0x1600F40A, 0x1700F40A
    for saddr, direction, last_seen in (
        (live, CT_REVERSE, now),
        (old, CT_REVERSE, now - 10**12),  # expired: deleted, so not in the rewrite
        (fwd, CT_FORWARD, now),  # a client's address: never a reverse key
    ):
        maps.conntrack.update(
            CtKey(saddr, 1, 2, 3, 6, direction, 0), CtValue(last_seen=last_seen, lifetime=60)
        )
    stats = conntrack.collect(maps, now)
    assert stats.conntrack_deleted == 1 and stats.reply_filter_written == 2 * WORDS
    assert maps.reply_filter is not None
    f = ReplyFilter(maps.reply_filter)
    assert f.ready and f.may_exist(live)
    assert f.marked(old, 0)  # the not-ready round's scan had it; gone a pass later
    assert not f.marked(old, 1) and not f.may_exist(fwd)
    assert conntrack.collect(maps, now).reply_filter_written == 1
    assert not f.may_exist(old)
    assert conntrack.collect(maps, now, reply_filter=False).reply_filter_written == -1
