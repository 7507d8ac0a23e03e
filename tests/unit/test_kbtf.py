"""Reading the kernel's BTF for the checksum state (ebpflb/datapath/kbtf.py), on blobs built
here as the kernel's Documentation/bpf/btf.rst lays them out."""

from __future__ import annotations

import struct

import pytest

from ebpflb.datapath import kbtf


class Blob:
    """A BTF blob under construction: types get ids 1, 2, ... in the order added."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def name(self, s: str) -> int:
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, size_or_type: int, trailer: bytes = b"", vlen: int = 0,
            kind_flag: bool = False) -> int:  # fmt: skip
        info = (kind << 24) | vlen | (kind_flag << 31)
        self.types += struct.pack("<III", self.name(name) if name else 0, info, size_or_type)
        self.types += trailer
        self.count += 1
        return self.count

    def int_type(self) -> int:
        return self.add(1, "unsigned char", 1, struct.pack("<I", 8))

    def composite(
        self, kind: int, name: str, size: int, members: list[tuple[str, int, int, int]]
    ) -> int:
        """members: (name, type id, bit offset, bitfield bits); kind_flag set if any bits."""
        flag = any(bits for *_, bits in members)
        rows = b"".join(
            struct.pack("<III", self.name(n) if n else 0, t, (bits << 24 | off) if flag else off)
            for n, t, off, bits in members
        )
        return self.add(kind, name, size, rows, vlen=len(members), kind_flag=flag)

    def bytes(self, magic: int = kbtf.BTF_MAGIC) -> bytes:
        hdr = struct.pack(
            "<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return hdr + bytes(self.types) + bytes(self.strings)


KFUNC_ID = 10  # the kfunc's id in kernel_like()'s blob


def kernel_like(with_kfunc: bool = True, bits: int = 2, shift: int = 5) -> bytes:
    """sk_buff keeps ip_summed in an anonymous struct inside an anonymous union, as
    Linux 6.x's struct_group(headers) does, after a decoy of the same name elsewhere."""
    b = Blob()
    u8 = b.int_type()
    b.add(2, "", u8)  # a PTR, to be skipped
    b.add(7, "sk_buff", 0)  # a FWD declaration of the same name: no members
    b.composite(4, "decoy", 4, [("ip_summed", u8, 3, 2)])
    inner = b.composite(4, "", 8, [("pkt_type", u8, 0, 3), ("ip_summed", u8, shift, bits)])
    union = b.composite(5, "", 8, [("", inner, 0, 0), ("headers", inner, 0, 0)])
    b.composite(4, "sk_buff", 224, [("len", u8, 896, 0), ("", union, 1024, 0)])
    proto = b.add(13, "", 0, struct.pack("<II", 0, u8), vlen=1)
    b.add(12, "other_kfunc", proto)
    if with_kfunc:
        assert b.add(12, "bpf_cast_to_kern_ctx", proto) == KFUNC_ID
    return b.bytes()


def test_facts_found_through_anonymous_members() -> None:
    facts = kbtf.skb_facts_of(kernel_like())
    assert facts == kbtf.SkbFacts(kern_ctx_kfunc=KFUNC_ID, ip_summed_byte=128, ip_summed_shift=5)
    assert facts.cflags() == {"LB_SKB_IP_SUMMED_OFF": 128, "LB_SKB_IP_SUMMED_SHIFT": 5}


@pytest.mark.parametrize(
    "blob",
    [kernel_like(with_kfunc=False), kernel_like(bits=3), kernel_like(shift=7)],
    ids=["no-kfunc", "not-2-bits", "crosses-a-byte"],
)
def test_no_facts_when_the_kernel_does_not_fit(blob: bytes) -> None:
    assert kbtf.skb_facts_of(blob) is None


def test_a_bad_blob_is_an_error() -> None:
    with pytest.raises(kbtf.BtfError, match="magic"):
        kbtf.skb_facts_of(Blob().bytes(magic=0x9FEB))
    with pytest.raises(kbtf.BtfError, match="short"):
        kbtf.skb_facts_of(b"\x9f\xeb")
    b = Blob()
    b.add(31, "x", 0)
    with pytest.raises(kbtf.BtfError, match="kind 31"):
        kbtf.skb_facts_of(b.bytes())
