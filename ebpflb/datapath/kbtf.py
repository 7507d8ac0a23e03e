"""What the datapath needs to know of the running kernel's types, from its BTF.

bcc 0.26 cannot call kfuncs (it has no kfunc relocation), so the tc programs emit the call
instruction themselves (lb_skb_ip_summed() in bpf/nat.h) and need two facts of this kernel:
the BTF id of the kfunc bpf_cast_to_kern_ctx, and where struct sk_buff keeps its ip_summed
bits. Both are read here from /sys/kernel/btf/vmlinux (format: the kernel's
Documentation/bpf/btf.rst), once per process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# BTF kinds, and the bytes that follow a type's 12-byte header: (fixed, per vlen item).
KIND_STRUCT, KIND_UNION, KIND_FUNC = 4, 5, 12
_TRAILER = {
    1: (4, 0),  # INT
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}


class BtfError(ValueError):
    """The BTF blob cannot be read."""


@dataclass(frozen=True)
class SkbFacts:
    """The kfunc bpf_cast_to_kern_ctx's BTF id, and skb->ip_summed (2 bits): the byte of
    struct sk_buff that holds it, and its shift within that byte."""

    kern_ctx_kfunc: int
    ip_summed_byte: int
    ip_summed_shift: int

    def cflags(self) -> dict[str, int]:
        return {
            "LB_SKB_IP_SUMMED_OFF": self.ip_summed_byte,
            "LB_SKB_IP_SUMMED_SHIFT": self.ip_summed_shift,
        }


@dataclass(frozen=True)
class _Btf:
    """A BTF blob, its types indexed by id (id 0 is void) but decoded only when asked."""

    blob: bytes
    strings: bytes
    heads: list[tuple[int, int, int]]  # by id - 1: (kind, name offset, blob offset of the type)

    @classmethod
    def parse(cls, blob: bytes) -> _Btf:
        if len(blob) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        heads: list[tuple[int, int, int]] = []
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info = struct.unpack_from("<II", blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in _TRAILER:
                raise BtfError(f"unknown BTF kind {kind} at type {len(heads) + 1}")
            heads.append((kind, name_off, pos))
            fixed, each = _TRAILER[kind]
            pos += 12 + fixed + each * vlen
        return cls(blob, strings, heads)

    def find(self, kind: int, name: str) -> int | None:
        """The id of the first type of this kind and name (a struct: with members)."""
        want = name.encode() + b"\0"
        composite = kind in (KIND_STRUCT, KIND_UNION)
        for i, (k, name_off, pos) in enumerate(self.heads):
            if (
                k == kind
                and self.strings.startswith(want, name_off)
                and (not composite or self._vlen(pos))
            ):
                return i + 1
        return None

    def _vlen(self, pos: int) -> int:
        return int(struct.unpack_from("<I", self.blob, pos + 4)[0] & 0xFFFF)

    def member(self, type_id: int, want: str) -> tuple[int, int] | None:
        """(bit offset, bitfield bits) of member want of a struct or union, looking into
        its anonymous structs and unions (sk_buff keeps most fields in a struct_group)."""
        if not 0 < type_id <= len(self.heads):
            return None
        kind, _name, pos = self.heads[type_id - 1]
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        info = struct.unpack_from("<I", self.blob, pos + 4)[0]
        kind_flag = bool(info >> 31)
        want_b = want.encode() + b"\0"
        for i in range(info & 0xFFFF):
            m_name, m_type, m_off = struct.unpack_from("<III", self.blob, pos + 12 + 12 * i)
            bits, offset = (m_off >> 24, m_off & 0xFFFFFF) if kind_flag else (0, m_off)
            if m_name and self.strings.startswith(want_b, m_name):
                return offset, bits
            if not m_name:
                inner = self.member(m_type, want)
                if inner is not None:
                    return offset + inner[0], inner[1]
        return None


def skb_facts_of(blob: bytes) -> SkbFacts | None:
    """The facts, or None if the kernel lacks the kfunc or sk_buff's ip_summed is not a
    2-bit field within one byte."""
    btf = _Btf.parse(blob)
    kfunc = btf.find(KIND_FUNC, "bpf_cast_to_kern_ctx")
    skb = btf.find(KIND_STRUCT, "sk_buff")
    if kfunc is None or skb is None:
        return None
    found = btf.member(skb, "ip_summed")
    if found is None or found[1] != 2 or found[0] % 8 > 6:
        return None
    return SkbFacts(kfunc, found[0] // 8, found[0] % 8)


@cache
def skb_facts() -> SkbFacts | None:
    """The running kernel's facts; None if it has no BTF or they are not there."""
    try:
        return skb_facts_of(VMLINUX_BTF.read_bytes())
    except (OSError, BtfError):
        return None
