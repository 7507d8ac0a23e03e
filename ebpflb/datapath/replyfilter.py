"""The reply filter: which backend addresses may have a reverse conntrack entry (bpf/filter.h,
lb_reply_may_exist), so that the datapath skips the reverse lookup of a packet from a backend
of no balanced flow (with socket-level load balancing: every packet of its connections).

The map (reply_filter in bpf/lb_maps.h) is an array of 64-bit words: entry 0 holds the current
EPOCH (and READY, below), then two bitmaps of one bit per address filter slot (the same hash
of an address, addrfilter.slots()), epoch 0's and epoch 1's. A set bit says "no reverse entry
here"; an address is marked (may have one) where its bit is clear, so a map of zeros marks
every address. The datapath marks an address in the current epoch's bitmap before it inserts
a reverse entry, and skips the lookup of an address marked in neither. The agent rebuilds at
every conntrack GC pass (conntrack.collect), a round of:

1. flip(): make the other epoch current; programs mark addresses there now;
2. wait(): every program that may have read the old epoch has finished;
3. scan conntrack (the GC's own scan, after its deletions);
4. rewrite(): the old epoch's bitmap marks exactly the scanned reverse entries' slots
   (no program writes it now);

two rounds while not READY (a new or cleared map: one bitmap would still mark everything),
then READY is set. The datapath never reads READY.

Why no live reverse entry is ever unmarked in both bitmaps: bpf/README.md, "The reply
filter". A slot shared with another address, or the mark of a flow collected since, only
costs the lookup; a collected flow's mark is gone after at most two passes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable

from ebpflb.datapath.addrfilter import SLOTS, read_words, slots, write_words
from ebpflb.datapath.maps import BpfMap, MapLike
from ebpflb.datapath.structs import U32, U64

log = logging.getLogger(__name__)

# Must match LB_RF_EPOCH in bpf/filter.h and LB_REPLY_FILTER_WORDS in bpf/lb_config.h.
READY, EPOCH = 0x1, 0x2  # entry 0's bits; READY only for the agent: both bitmaps rewritten
WORDS = SLOTS // 64  # per epoch
ENTRIES = 1 + 2 * WORDS
NONE = (1 << 64) - 1  # a word of slots none of whose addresses has a reverse entry

MEMBARRIER_CMD_GLOBAL = 1  # linux/membarrier.h
SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
FALLBACK_WAIT = 0.05  # seconds: where membarrier cannot wait; programs run for microseconds


def first_index(epoch: int) -> int:
    """The map index of an epoch's first word (lb_rf_index() of bpf/filter.h for slot 0)."""
    return 1 + epoch * WORDS


def marks(addrs: Iterable[int]) -> dict[int, int]:
    """The slots of these addresses as bits of words, by offset in a bitmap (nonzero only):
    the bits a bitmap that marks exactly them has clear."""
    words: dict[int, int] = {}
    for s in set(slots(addrs)):
        words[s >> 6] = words.get(s >> 6, 0) | 1 << (s & 63)
    return words


_warned = False


def wait_for_programs() -> bool:
    """Return once every BPF program running when called has finished. True: waited for
    certain, by membarrier(MEMBARRIER_CMD_GLOBAL), which is synchronize_rcu() while more than
    one CPU is online (kernel/sched/membarrier.c), and tc and XDP programs run inside RCU
    read-side sections (rcu_read_lock_bh or BH-disabled softirq; BPF_PROG_TEST_RUN under
    rcu_read_lock), for which synchronize_rcu() waits. False: slept FALLBACK_WAIT instead
    (no such system call here, nohz_full, a seccomp filter, a single CPU)."""
    global _warned
    nr = SYS_MEMBARRIER.get(platform.machine())
    if nr is not None and (os.sysconf("SC_NPROCESSORS_ONLN") or 0) > 1:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(ctypes.c_long(nr), ctypes.c_int(MEMBARRIER_CMD_GLOBAL), 0) == 0:
            return True
        why = os.strerror(ctypes.get_errno())
    else:
        why = "not on this machine"
    if not _warned:
        log.warning("membarrier: %s; the reply filter waits %.2f s instead", why, FALLBACK_WAIT)
        _warned = True
    time.sleep(FALLBACK_WAIT)
    return False


class ReplyFilter:
    """The agent's side of the map: the rebuild's steps, and what the datapath would answer.
    One process at a time may rebuild (the agent's GC): two would rewrite each other's
    current bitmaps."""

    def __init__(self, bpf_map: MapLike[U32, U64]) -> None:
        self._map = bpf_map

    def state(self) -> int:
        """Entry 0: READY | EPOCH."""
        v = self._map.lookup(U32(0))
        return 0 if v is None else int(v.value)

    @property
    def ready(self) -> bool:
        """Both bitmaps have been rewritten (else one may still mark every address)."""
        return bool(self.state() & READY)

    def flip(self) -> int:
        """Step 1: make the other epoch current (READY as it was); returns the old one."""
        state = self.state()
        old = 1 if state & EPOCH else 0
        self._map.update(U32(0), U64((state & READY) | (0 if old else EPOCH)))
        return old

    def wait(self) -> bool:
        """Step 2: no program can still be marking addresses in the old epoch's bitmap
        (unless the map is not a kernel map: nothing runs on it then)."""
        return wait_for_programs() if isinstance(self._map, BpfMap) else True

    def rewrite(self, epoch: int, backends: Iterable[int]) -> int:
        """Step 4: the epoch's bitmap marks exactly these addresses (the reverse entries'
        saddr, as the key holds it); only the words that differ are written. Returns how
        many."""
        marked = marks(backends)
        lo = first_index(epoch)
        have = read_words(self._map, lo, WORDS)
        todo = [o for o, word in enumerate(have) if word != NONE ^ marked.get(o, 0)]
        write_words(self._map, [lo + o for o in todo], [NONE ^ marked.get(o, 0) for o in todo])
        return len(todo)

    def round(self, scan: Callable[[], Iterable[int]]) -> int:
        """Steps 1 to 4, scan() reading the reverse entries' addresses from conntrack after
        the wait. Returns the words written."""
        old = self.flip()
        self.wait()
        return self.rewrite(old, scan())

    def set_ready(self) -> None:
        state = self.state()
        if not state & READY:
            self._map.update(U32(0), U64(state | READY))

    def rebuild(self, scan: Callable[[], Iterable[int]]) -> int:
        """A whole pass: one round, two while not ready; then ready. Returns the words
        written."""
        written = 0 if self.ready else self.round(scan)
        written += self.round(scan)
        self.set_ready()
        return written

    def marked(self, addr: int, epoch: int) -> bool:
        """addr is marked (its bit clear) in the epoch's bitmap."""
        (s,) = slots((addr,))
        word = self._map.lookup(U32(first_index(epoch) + (s >> 6)))
        return word is None or not word.value >> (s & 63) & 1

    def may_exist(self, addr: int) -> bool:
        """What lb_reply_may_exist() answers for addr now (read from the map)."""
        return self.marked(addr, 0) or self.marked(addr, 1)
