"""The address filter: which addresses may be a frontend's or a backend's (bpf/filter.h,
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

from ebpflb.datapath import _libbpf
from ebpflb.datapath.maps import BpfMap, MapLike
from ebpflb.datapath.structs import U32, U64

# Must match LB_ADDR_FILTER_* in bpf/lb_config.h and LB_ADDR_* in bpf/filter.h.
BITS = 20
SLOTS = 1 << BITS
WORDS = SLOTS // 32
MUL = 0x9E3779B1
FRONTEND, BACKEND = 1, 2
READY = 0  # the entry that says the words are complete

_M32 = 0xFFFFFFFF


def slots(addrs: Iterable[int]) -> list[int]:
    """The slot of each address as lb_structs.h stores it (the __be32 read as a host int):
    lb_addr_slot() of bpf/filter.h, shared by the address and the reply filter (inlined: it
    runs for every address of a bulk, and for every reverse entry of a GC pass)."""
    mul, m, shift = MUL, _M32, 32 - BITS
    return [((a ^ (a >> 16)) * mul & m) >> shift for a in addrs]


def slot(addr: int) -> int:
    return slots((addr,))[0]


def bit_number(addr: int, kind: int) -> int:
    """An address's kind as one bit of the whole filter: bit b is bit b % 64 of entry
    1 + b // 64 (2 bits per slot, the frontend's first)."""
    return 2 * slot(addr) + (kind - 1)


def position(addr: int, kind: int) -> tuple[int, int]:
    """(map index, bit mask) of an address's kind."""
    b = bit_number(addr, kind)
    return 1 + b // 64, 1 << (b % 64)


class AddrFilter:
    """Keeps the map's bits equal to the addresses it is told of, with their multiplicity
    (one per services entry with that VIP, one per backend with that address). Works on
    whole batches: a bulk Apply brings 100,000 addresses at once."""

    def __init__(self, bpf_map: MapLike[U32, U64]) -> None:
        self._map = bpf_map
        self._refs: dict[int, Counter[int]] = {FRONTEND: Counter(), BACKEND: Counter()}
        self._bits: Counter[int] = Counter()  # bit number -> addresses that need it
        self._words: dict[int, int] = {}  # index -> the word as this object last wrote it
        self._dirty: set[int] = set()
        self.ready = False  # the map holds our words and says so (entry 0)

    def rebuild(self, frontends: Iterable[int], backends: Iterable[int]) -> int:
        """Start over from every address (repeated as often as entries name it): the words
        that differ from the map's are written, then the filter is marked ready. Returns the
        entries written."""
        self._refs = {FRONTEND: Counter(frontends), BACKEND: Counter(backends)}
        self._bits = Counter()
        self._words = {}
        for kind, refs in self._refs.items():
            self._set(_bit_numbers(refs, kind))
        held = {k[0]: v[0] for k, v in self._map.rows() if v[0]}
        self._dirty = {i for i in set(self._words) | set(held) if held.get(i, 0) != self.word(i)}
        self._dirty.discard(READY)
        n = self.flush()
        if held.get(READY, 0) != 1:
            self._map.update(U32(READY), U64(1))
            n += 1
        self.ready = True
        return n

    def word(self, index: int) -> int:
        return self._words.get(index, 0)

    def add(self, kind: int, addrs: Iterable[int]) -> None:
        """Entries naming these addresses are about to be written (flush() before them)."""
        refs = self._refs[kind]
        addrs = list(addrs)
        new = set(addrs).difference(refs)
        refs.update(addrs)
        self._set(_bit_numbers(new, kind))

    def remove(self, kind: int, addrs: Iterable[int]) -> None:
        """Entries naming these addresses were deleted (flush() after them)."""
        refs = self._refs[kind]
        addrs = list(addrs)
        refs.subtract(addrs)
        gone = [a for a in set(addrs) if refs[a] <= 0]
        for a in gone:
            del refs[a]
        bits = self._bits
        numbers = _bit_numbers(gone, kind)
        bits.subtract(numbers)
        words = self._words
        for b in set(numbers):
            if bits[b] > 0:
                continue
            del bits[b]
            index = 1 + (b >> 6)
            word = words.get(index, 0) & ~(1 << (b & 63))
            if word:
                words[index] = word
            else:
                words.pop(index, None)
            self._dirty.add(index)

    def _set(self, numbers: list[int]) -> None:
        """Count addresses that now need these bits; set those that were clear."""
        bits, words = self._bits, self._words
        fresh = set(numbers).difference(bits)
        bits.update(numbers)
        for b in fresh:
            index = 1 + (b >> 6)
            words[index] = words.get(index, 0) | 1 << (b & 63)
        self._dirty.update(1 + (b >> 6) for b in fresh)

    def flush(self) -> int:
        """Write the words that changed; returns how many."""
        todo = sorted(self._dirty)
        self._dirty.clear()
        write_words(self._map, todo, [self._words.get(i, 0) for i in todo])
        return len(todo)

    def may_be(self, addr: int, kind: int) -> bool:
        """What the datapath answers for addr (from this object's words, not the map)."""
        index, mask = position(addr, kind)
        return not self.ready or bool(self._words.get(index, 0) & mask)


def write_words(bpf_map: MapLike[U32, U64], indices: list[int], words: list[int]) -> None:
    """Write words at these indices of an array map of u64 (a filter's): one syscall for a
    BpfMap, an array map takes batches."""
    if not indices:
        return
    if isinstance(bpf_map, BpfMap):
        keys, values = array("I", indices).tobytes(), array("Q", words).tobytes()
        _libbpf.map_update_batch(bpf_map.fd, keys, values, len(indices))
    else:
        for index, word in zip(indices, words, strict=True):
            bpf_map.update(U32(index), U64(word))


def read_words(bpf_map: MapLike[U32, U64], first: int, count: int) -> list[int]:
    """The words at indices first..first+count-1 (first > 0) of an array map of u64 (a
    filter's): one syscall for a BpfMap."""
    if isinstance(bpf_map, BpfMap):
        return array("Q", _libbpf.array_lookup_range(bpf_map.fd, first, count, 8)).tolist()
    words = [0] * count
    for (index, *_), (word, *_) in bpf_map.rows():
        if first <= index < first + count:
            words[index - first] = word
    return words


def _bit_numbers(addrs: Iterable[int], kind: int) -> list[int]:
    """bit_number() of each address."""
    k = kind - 1
    return [s << 1 | k for s in slots(addrs)]
