"""The address filter: which addresses may be a frontend's or a backend's (bpf/lb.h,
lb_addr_may_be), so that the datapath skips the services and reverse conntrack lookups of
packets that cannot need them.

The map (addr_filter in bpf/lb_maps.h) is an array of 64-bit words: entry 0 says the filter
is complete ("ready"), entries 1.. hold 2 bits per slot, 32 slots each. An address's slot is
a hash of it, so several addresses may share a slot: a slot's bit stays set while any
address of that kind maps to it (counted here), and a shared slot only costs a lookup.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from itertools import chain

from ebpflb.datapath import _libbpf
from ebpflb.datapath.maps import BpfMap, MapLike
from ebpflb.datapath.structs import U32, U64

# Must match LB_ADDR_FILTER_* in bpf/lb_config.h and LB_ADDR_* in bpf/lb.h.
SLOTS = 1 << 20
WORDS = SLOTS // 32
SEED = 0x9E3779B9
FRONTEND, BACKEND = 1, 2
READY = 0  # the entry that says the words are complete

_M32 = 0xFFFFFFFF


def mix32(h: int) -> int:
    """lb_mix32() of bpf/lb.h."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


@lru_cache(maxsize=1 << 17)  # the same pod addresses, again and again
def slot(addr: int) -> int:
    """The slot of an address as lb_structs.h stores it (the __be32 read as a host int)."""
    return mix32(addr ^ SEED) & (SLOTS - 1)


def position(addr: int, kind: int) -> tuple[int, int]:
    """(map index, bit) of an address's kind."""
    s = slot(addr)
    return 1 + s // 32, kind << (2 * (s % 32))


class AddrFilter:
    """Keeps the map's bits equal to the addresses it is told of, with their multiplicity
    (one per services entry with that VIP, one per backend with that address)."""

    def __init__(self, bpf_map: MapLike[U32, U64]) -> None:
        self._map = bpf_map
        self._refs: Counter[tuple[int, int]] = Counter()  # (addr, kind) -> entries
        self._bits: Counter[tuple[int, int]] = Counter()  # (index, bit) -> addresses
        self._words: dict[int, int] = {}  # index -> the word as this object last wrote it
        self._dirty: set[int] = set()
        self.ready = False  # the map holds our words and says so (entry 0)

    def rebuild(self, frontends: Iterable[int], backends: Iterable[int]) -> int:
        """Start over from every address (repeated as often as entries name it): the words
        that differ from the map's are written, then the filter is marked ready. Returns the
        entries written."""
        fes, bes = ((a, FRONTEND) for a in frontends), ((a, BACKEND) for a in backends)
        self._refs = Counter(chain(fes, bes))
        self._bits = Counter(position(a, k) for a, k in self._refs)
        words: dict[int, int] = {}
        for index, bit in self._bits:
            words[index] = words.get(index, 0) | bit
        held = {k[0]: v[0] for k, v in self._map.rows() if v[0]}
        self._words = words
        self._dirty = set(words) | set(held)
        self._dirty -= {i for i in self._dirty if held.get(i, 0) == words.get(i, 0)}
        self._dirty.discard(READY)
        n = self.flush()
        if held.get(READY, 0) != 1:
            self._map.update(U32(READY), U64(1))
            n += 1
        self.ready = True
        return n

    def add(self, kind: int, addrs: Iterable[int]) -> None:
        """Entries naming these addresses are about to be written (flush() before them)."""
        for a in addrs:
            self._refs[a, kind] += 1
            if self._refs[a, kind] == 1:
                self._bit(position(a, kind), 1)

    def remove(self, kind: int, addrs: Iterable[int]) -> None:
        """Entries naming these addresses were deleted (flush() after them)."""
        for a in addrs:
            n = self._refs[a, kind] - 1
            if n > 0:
                self._refs[a, kind] = n
                continue
            self._refs.pop((a, kind), None)
            if n == 0:
                self._bit(position(a, kind), -1)

    def _bit(self, pos: tuple[int, int], step: int) -> None:
        n = self._bits[pos] + step
        if n > 0:
            self._bits[pos] = n
            if n > 1 or step < 0:
                return  # the bit was set already, and stays
        else:
            del self._bits[pos]
        index, bit = pos
        word = self._words.get(index, 0)
        word = word | bit if step > 0 else word & ~bit
        if word:
            self._words[index] = word
        else:
            self._words.pop(index, None)
        self._dirty.add(index)

    def flush(self) -> int:
        """Write the words that changed; returns how many."""
        todo = sorted(self._dirty)
        self._dirty.clear()
        if not todo:
            return 0
        words = [self._words.get(i, 0) for i in todo]
        if isinstance(self._map, BpfMap):  # one syscall: an array map takes batches
            keys, values = array("I", todo).tobytes(), array("Q", words).tobytes()
            _libbpf.map_update_batch(self._map.fd, keys, values, len(todo))
        else:
            for index, word in zip(todo, words, strict=True):
                self._map.update(U32(index), U64(word))
        return len(todo)

    def may_be(self, addr: int, kind: int) -> bool:
        """What the datapath answers for addr (from this object's words, not the map)."""
        index, bit = position(addr, kind)
        return not self.ready or bool(self._words.get(index, 0) & bit)
