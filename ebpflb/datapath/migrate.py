"""Copies the datapath's state from maps of one layout into maps of another, field by name."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ebpflb.datapath import _libbpf
from ebpflb.datapath.layout import Layout, StructLayout, ctype
from ebpflb.datapath.maps import BpfMap, PerCpuArray

log = logging.getLogger(__name__)

# Maps whose entries the datapath writes: copied again after the swap, for the flows that
# the old programs created after the first copy.
FLOW_MAPS = ("conntrack", "affinity")
# Maps the new programs start with empty, whatever the old ones held. The reply filter
# marks only the reverse entries inserted by programs or seen by a rebuild: those copied
# here, the last of them after the swap, are neither, so it starts as zeros (every address
# marked: every reverse lookup done) until the agent's next GC pass rebuilds it.
NOT_COPIED = ("reply_filter",)

Convert = Callable[[bytes], "bytes | None"]


def converter(old: StructLayout, new: StructLayout, key: bool) -> Convert:
    """A function turning an old key (key True) or value into the new layout's bytes, None
    if it cannot be converted."""
    if old == new:
        return lambda b: b
    olds = {f[0]: f for f in old.fields}
    plan = []  # (new offset, new element size, new count, old offset, old element, old count)
    for name, off, size, elem in new.fields:
        if name in olds:
            _, o_off, o_size, o_elem = olds[name]
            plan.append((off, elem, size // elem, o_off, o_elem, o_size // o_elem))
    # Old fields the new layout lacks: a key must not lose anything (two keys would merge).
    lost = [(o, s) for n, o, s, _ in old.fields if n not in {f[0] for f in new.fields}]

    def convert(data: bytes) -> bytes | None:
        if key and any(data[o : o + s].strip(b"\0") for o, s in lost):
            return None
        out = bytearray(new.size)
        for off, elem, count, o_off, o_elem, o_count in plan:
            for i in range(o_count):  # elements the new array lacks must be zero
                v = int.from_bytes(data[o_off + i * o_elem : o_off + (i + 1) * o_elem], "little")
                if i >= count or v >> (8 * elem):
                    if v:
                        return None  # does not fit
                    continue
                out[off + i * elem : off + (i + 1) * elem] = v.to_bytes(elem, "little")
        return bytes(out)

    return convert


@dataclass
class CopyStats:
    copied: int = 0
    dropped: int = 0  # not convertible, or no room in the new map


@dataclass
class Migration:
    """The old maps (pinned in pin_dir, layout old) and the new (in staging, layout new).

    Every entry is copied field by field by name: a field both layouts have keeps its
    value (widened or narrowed), a new field starts at zero, a field the new layout lacks
    is left behind. An entry that cannot be converted (see converter) is dropped and
    counted, as is one the new map has no room for. The loader swaps the programs, then
    copy_flows(), carry_counters() and move_pins() (see Datapath.finish_migration).

    Configuration maps (services, backends, ...) are converted like the flows rather than
    left empty for the agent: conntrack and affinity entries name their ids, so established
    flows keep their backend only if the ids survive. The agent still writes its full
    state into them before the swap.

    Socket storage (sock_peer) is not copied: its values live in the sockets, out of
    userspace's reach. share_socket_storage() hands the old map itself to the new programs
    when its layout is unchanged; otherwise the new programs start with an empty one, and
    the sockets connected before read their backend as their peer.

    The reply filter is not copied (NOT_COPIED): the new one starts as zeros, skipping
    nothing.
    """

    pin_dir: Path
    staging: Path
    old: Layout
    new: Layout
    stats: dict[str, CopyStats] = field(default_factory=dict)
    _maps: dict[str, tuple[BpfMap[ctypes.Structure, ctypes.Structure], ...]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        try:
            for name in self.old.keys() & self.new.keys():
                if self.new[name].map_type == _libbpf.BPF_MAP_TYPE_PERCPU_ARRAY:
                    continue  # counters: carry_counters()
                types = {self.old[name].map_type, self.new[name].map_type}
                if _libbpf.BPF_MAP_TYPE_SK_STORAGE in types:
                    continue  # cannot be listed: share_socket_storage()
                if name in NOT_COPIED:
                    continue
                self._maps[name] = (self._open(self.pin_dir, name, self.old),)
                self._maps[name] += (self._open(self.staging, name, self.new),)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(d: Path, name: str, layout: Layout) -> BpfMap[ctypes.Structure, ctypes.Structure]:
        m = layout[name]
        return BpfMap.open_pinned(d / name, ctype(m.key, "Key"), ctype(m.value, "Value"))

    def copy_state(self) -> None:
        """Copy every map's entries into the new maps (the first pass)."""
        for name in sorted(self._maps):
            self.stats[name] = self._copy(name, _libbpf.BPF_ANY)

    def copy_flows(self) -> None:
        """Copy the flow entries the new maps do not have yet (made by the old programs
        since copy_state); those the new programs wrote meanwhile win."""
        for name in FLOW_MAPS:
            if name in self._maps:
                more = self._copy(name, _libbpf.BPF_NOEXIST)
                s = self.stats[name]
                s.copied += more.copied
                s.dropped += more.dropped

    def _copy(self, name: str, flags: int) -> CopyStats:
        old_map, new_map = self._maps[name]
        o, n = self.old[name], self.new[name]
        conv_k, conv_v = converter(o.key, n.key, True), converter(o.value, n.value, False)
        stats = CopyStats()
        for k, v in old_map.raw_items():
            nk, nv = conv_k(k), conv_v(v)
            if nk is None or nv is None:
                stats.dropped += 1
                continue
            err = new_map.update_raw(nk, nv, flags)
            if err == 0:
                stats.copied += 1
            elif err != errno.EEXIST:  # EEXIST: the new programs have it already
                stats.dropped += 1
        return stats

    def carry_counters(self) -> None:
        """Add the old counters to the new ones, CPU by CPU, by field name."""
        for name, m in self.new.items():
            if m.map_type != _libbpf.BPF_MAP_TYPE_PERCPU_ARRAY or name not in self.old:
                continue
            old_t, new_t = ctype(self.old[name].value, "Old"), ctype(m.value, "New")
            old = PerCpuArray.open_pinned(self.pin_dir / name, old_t)
            new = PerCpuArray.open_pinned(self.staging / name, new_t)
            try:
                scalars = [f[0] for f in m.value.fields if f[2] == f[3]]
                common = [f for f in scalars if f in {g[0] for g in self.old[name].value.fields}]
                for index in range(m.max_entries):
                    values = new.lookup_percpu(index)
                    for o, v in zip(old.lookup_percpu(index), values, strict=True):
                        for f in common:
                            setattr(v, f, getattr(v, f) + getattr(o, f))
                    new.update_percpu(index, values)
            finally:
                old.close()
                new.close()

    def move_pins(self) -> None:
        """Put the staging pins in the old ones' place (each replaced in one step), remove
        the old pins the new datapath has no use for (maps of the old layout, programs it no
        longer has), and the staging directory."""
        moved = set(os.listdir(self.staging))
        for name in moved:
            os.rename(self.staging / name, self.pin_dir / name)
        for name in set(os.listdir(self.pin_dir)) - moved:
            (self.pin_dir / name).unlink(missing_ok=True)
        self.staging.rmdir()

    def summary(self) -> str:
        return ", ".join(
            f"{name} {s.copied} copied" + (f" {s.dropped} dropped" if s.dropped else "")
            for name, s in sorted(self.stats.items())
        )

    def close(self) -> None:
        for pair in self._maps.values():
            for m in pair:
                m.close()
        self._maps.clear()


def share_socket_storage(pin_dir: Path, staging: Path, old: Layout, new: Layout) -> list[str]:
    """Pin in staging, before the new datapath is compiled there, the old socket storage
    maps whose layout the new one keeps, so that bcc adopts them and the new programs read
    what the old ones wrote into the sockets. Returns their names: the caller must check
    that the compiled layout has them unchanged."""
    shared = []
    for name, m in old.items():
        if m.map_type != _libbpf.BPF_MAP_TYPE_SK_STORAGE or new.get(name) != m:
            continue
        fd = _libbpf.obj_get(str(pin_dir / name))
        try:
            _libbpf.obj_pin(fd, staging / name)
        finally:
            os.close(fd)
        shared.append(name)
    return shared


def remove_staging(staging: Path) -> None:
    """Remove a staging directory and what is pinned in it (an unfinished migration's)."""
    if not staging.exists():
        return
    for name in os.listdir(staging):
        (staging / name).unlink()
    staging.rmdir()
