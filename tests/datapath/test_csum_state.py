"""L4 checksums updated by hand from the skb's checksum state (lb_skb_ip_summed() in
bpf/csum.h, lb_l4_csum_by_hand() in bpf/nat.h) are the very bytes the checksum helpers
write, and the kernel facts they rest on are this kernel's. (BPF_PROG_TEST_RUN's skbs carry
full checksums; partial ones are tested through real veths: test_veth.py's partial-checked.)"""

from __future__ import annotations

import random
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from ebpflb.datapath import kbtf
from ebpflb.datapath.loader import Datapath
from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from ebpflb.datapath.testrun import TC_ACT_OK
from tests.datapath import packets as P
from tests.datapath.conftest import TEST_CONFIG, Lab, own_datapath

pytestmark = pytest.mark.datapath

B0 = P.BACKENDS[0]
FRONTENDS = (
    Frontend(P.VIP, 80, "TCP", (Backend(B0, 8080),)),
    Frontend(P.VIP, 443, "TCP", (Backend(B0, 443),)),  # only the address changes
    Frontend(P.VIP, 53, "UDP", (Backend(B0, 5353),)),
)


@pytest.fixture(scope="module")
def helpers_dp() -> Iterator[Datapath]:
    """The datapath built to update every L4 checksum through the helpers."""
    with own_datapath(replace(TEST_CONFIG, read_ip_summed=False)) as dp:
        yield dp


@pytest.fixture
def helpers(helpers_dp: Datapath) -> Lab:
    helpers_dp.maps.clear()
    return Lab(helpers_dp, Programmer(helpers_dp))


def test_the_facts_are_this_kernels() -> None:
    """The kfunc's id agrees with bpftool's reading of the same BTF."""
    facts = kbtf.skb_facts()
    assert facts is not None, "this kernel has BTF and bpf_cast_to_kern_ctx (Linux 6.2+)"
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(kbtf.VMLINUX_BTF)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    found = re.search(r"^\[(\d+)\] FUNC 'bpf_cast_to_kern_ctx'", dump, re.M)
    assert found and int(found.group(1)) == facts.kern_ctx_kfunc
    assert 0 < facts.ip_summed_byte < 256 and 0 <= facts.ip_summed_shift <= 6


def flows(seed: int, n: int) -> list[tuple[bytes, bytes]]:
    """n random flows' (client's packet, backend's reply), through the three frontends:
    random client addresses, ports, flags and payloads, UDP with and without checksum."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        client = f"10.244.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}"
        sport = rng.randrange(1, 65536)
        payload = rng.randbytes(rng.randrange(0, 1400))
        kind = rng.choice(["tcp80", "tcp443", "udp", "udp-no-csum"])
        if kind.startswith("tcp"):
            dport, bport = (80, 8080) if kind == "tcp80" else (443, 443)
            flags = rng.choice(["S", "A", "PA", "FA", "R"])
            fwd = P.tcp(src=client, sport=sport, dport=dport, flags=flags, payload=payload,
                        seq=rng.getrandbits(32), ack=rng.getrandbits(32))  # fmt: skip
            back = P.tcp(src=B0, dst=client, sport=bport, dport=sport, flags="A", payload=payload)
        else:
            no_csum = kind == "udp-no-csum"
            fwd = P.udp(src=client, sport=sport, payload=payload, no_checksum=no_csum)
            back = P.udp(src=B0, dst=client, sport=5353, dport=sport, payload=payload,
                         no_checksum=no_csum)  # fmt: skip
        out.append((fwd, back))
    return out


def test_by_hand_writes_what_the_helpers_write(lab: Lab, helpers: Lab) -> None:
    for each in (lab, helpers):
        each.sync(*FRONTENDS)
    for fwd, back in flows(seed=5, n=300):
        for frame in (fwd, back):
            got, want = lab.run(frame), helpers.run(frame)
            assert got[0] == want[0] == TC_ACT_OK
            P.assert_frame(got[1], want[1])
            assert got[1] != frame, "not rewritten"
            P.check_checksums(got[1])
    assert lab.counters()["errors"] == helpers.counters()["errors"] == 0
    assert lab.counters()["rev_nat"] == helpers.counters()["rev_nat"] == 300


def udp_sport_whose_checksum_comes_to_0(client: str) -> int:
    """The client port for which the DNATed datagram's checksum computes to 0 (which UDP
    sends as 0xffff, 0 meaning none): the sum moves by one with the port."""
    frame = P.udp(src=client, dst=B0, sport=0, dport=5353)
    off = P.l4_offset(frame)
    segment = frame[off:off + 6] + b"\0\0" + frame[off + 8:]  # fmt: skip
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, len(segment))
    return 0xFFFF - P.ones_sum(pseudo + segment) or 0xFFFF


def test_a_udp_checksum_that_comes_to_0_is_sent_as_ffff(lab: Lab, helpers: Lab) -> None:
    for each in (lab, helpers):
        each.sync(*FRONTENDS)
    sport = udp_sport_whose_checksum_comes_to_0(P.CLIENT)
    frame = P.udp(sport=sport)
    got, want = lab.run(frame), helpers.run(frame)
    P.assert_frame(got[1], want[1])
    P.assert_frame(got[1], P.udp(sport=sport, dst=B0, dport=5353))  # scapy writes 0xffff too
    assert P.udp_checksum_field(got[1]) == 0xFFFF
