"""ClusterIP and nodePort allocation: which values are free, which to hand out next."""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Container


class AllocationError(ValueError):
    """No value could be given: the range is full, or a requested value is out of it."""


class Range:
    """A range of integers [first, last] split, as Kubernetes does, into a lower
    band kept for values users ask for and an upper band handed out dynamically
    (so a fixed value like 10.96.0.10 is rarely taken by an automatic one)."""

    def __init__(self, first: int, last: int, rng: random.Random | None = None) -> None:
        if last < first:
            raise ValueError(f"empty range {first}-{last}")
        self.first = first
        self.last = last
        size = last - first + 1
        self.static_size = min(max(16, size // 16), 256) if size > 16 * 2 else 0
        self._rng = rng or random.Random()

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def allocate(self, used: Container[int], used_count: int) -> int:
        """A free value, preferring the dynamic band; AllocationError when none is free."""
        if used_count >= self.size:
            raise AllocationError("range is full")
        dyn_first = self.first + self.static_size
        for lo, hi in ((dyn_first, self.last), (self.first, dyn_first - 1)):
            if hi < lo:
                continue
            # A few random probes are enough while the band is not nearly full;
            # then walk it from a random start so a free value is always found.
            for _ in range(32):
                v = self._rng.randint(lo, hi)
                if v not in used:
                    return v
            start = self._rng.randint(lo, hi)
            n = hi - lo + 1
            for i in range(n):
                v = lo + (start - lo + i) % n
                if v not in used:
                    return v
        raise AllocationError("range is full")


class IPRange:
    """A service CIDR: every address but the network and broadcast ones."""

    def __init__(self, cidr: str, rng: random.Random | None = None) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as e:
            raise ValueError(f"invalid service CIDR {cidr!r}: {e}") from None
        if self.network.num_addresses < 4:
            raise ValueError(f"service CIDR {cidr} is too small")
        first = int(self.network.network_address) + 1
        last = int(self.network.broadcast_address) - 1
        self.range = Range(first, last, rng)

    def __str__(self) -> str:
        return str(self.network)

    def contains(self, ip: str) -> bool:
        """Whether ip, a dotted quad (ValueError for anything else), is in the range.
        inet_pton: as strict as ipaddress (no leading zeros), at a tenth of its cost."""
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            raise ValueError(f"not an IPv4 address: {ip!r}") from None
        return int.from_bytes(packed) in self.range

    def allocate(self, used: Container[str], used_count: int) -> str:
        class _Ints:
            def __contains__(self, v: object) -> bool:
                return isinstance(v, int) and str(ipaddress.IPv4Address(v)) in used

        return str(ipaddress.IPv4Address(self.range.allocate(_Ints(), used_count)))


def parse_port_range(text: str) -> Range:
    """'30000-32767' as a Range, with a clear error for anything else."""
    try:
        a, b = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ValueError(f"invalid node port range {text!r}: expected FIRST-LAST") from None
    if not (1 <= a <= b <= 65535):
        raise ValueError(f"invalid node port range {text!r}: must be within 1-65535")
    return Range(a, b)
