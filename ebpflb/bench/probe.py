"""Reads what an agent has written into its pinned maps: frontends and their backend counts."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from ebpflb.datapath.maps import LbMaps
from ebpflb.datapath.structs import PROTOCOLS, SvcKey, ip_to_be32, port_to_be16


class MapProbe:
    """The pinned maps of one node, opened read-only in spirit (nothing is written)."""

    def __init__(self, pin_dir: str | os.PathLike[str]) -> None:
        self.pin_dir = Path(pin_dir)
        self.maps = LbMaps.open(self.pin_dir)

    @classmethod
    def wait(cls, pin_dir: str | os.PathLike[str], timeout: float = 120.0) -> MapProbe:
        """Open the maps once the agent has pinned them."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(pin_dir)
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def close(self) -> None:
        self.maps.close()

    @staticmethod
    def key(vip: str, port: int, protocol: str = "TCP") -> SvcKey:
        return SvcKey(
            vip=ip_to_be32(vip), port=port_to_be16(port), proto=PROTOCOLS[protocol], pad=0
        )

    def backend_count(self, vip: str, port: int, protocol: str = "TCP") -> int | None:
        """How many backends the frontend has in the map (None: no such frontend)."""
        value = self.maps.services.lookup(self.key(vip, port, protocol))
        return None if value is None else int(value.count)

    def frontends(self) -> int:
        return len(self.maps.services.items())

    @staticmethod
    def keys(wanted: Iterable[tuple[str, int]]) -> frozenset[tuple[int, int]]:
        """(vip, port) pairs as complete() takes them."""
        return frozenset((ip_to_be32(vip), port_to_be16(port)) for vip, port in wanted)

    def complete(self, keys: frozenset[tuple[int, int]], backends: int) -> int:
        """How many of the keys() TCP frontends have `backends` backends. Cheap (one
        batch read of the services map as rows), so that polling it while the agent
        works does not take the CPU the agent needs."""
        return sum(
            1
            for (vip, port, _, _), (_, count, _, _, _) in self.maps.services.rows()
            if count == backends and (vip, port) in keys
        )

    def __enter__(self) -> MapProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
