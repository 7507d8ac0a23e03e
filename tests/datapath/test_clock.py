"""The datapath's clock (lb_now()) and userspace's (now_ns()) are one: jiffies where HZ is
known, CLOCK_MONOTONIC_COARSE where it is not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ebpflb.datapath import kclock
from ebpflb.datapath.conntrack import now_ns
from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from tests.datapath import packets as P
from tests.datapath.conftest import Lab, own_datapath

pytestmark = pytest.mark.datapath

FRONTEND = Frontend(P.VIP, 80, "TCP", (Backend(P.BACKENDS[0], 8080),))
FLOWS = 200


def stamps_between_clock_reads(lab: Lab) -> list[tuple[int, int, int]]:
    """(now_ns() before, the new flow's last_seen, now_ns() after) for FLOWS new flows, a
    fraction of a tick apart so that they fall at every point of one."""
    lab.sync(FRONTEND)
    out = []
    for i in range(FLOWS):
        sport = 20000 + i
        before = now_ns()
        lab.run(P.tcp(sport=sport))
        after = now_ns()
        out.append((before, lab.ct()[("fwd", P.CLIENT, sport, P.VIP, 80)].last_seen, after))
        time.sleep(0.0007 * (i % 5 + 1))
    return out


def test_stamps_are_jiffies_and_now_ns_reads_them(lab: Lab) -> None:
    clock = kclock.clock()
    if clock is None:
        pytest.skip("HZ unknown here: the clock is CLOCK_MONOTONIC_COARSE")
    tick = clock.tick
    stamps = stamps_between_clock_reads(lab)
    assert all(seen % tick == 0 for _, seen, _ in stamps), "not jiffies"
    assert all(before - tick <= seen <= after + tick for before, seen, after in stamps)
    # Off only when a tick began just before the packet and its interrupt had not yet run.
    exact = sum(before <= seen <= after for before, seen, after in stamps)
    assert exact >= 0.95 * FLOWS
    # lb_now() is ns since boot: within the offset and a tick of CLOCK_MONOTONIC.
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert abs(mono + clock.offset - stamps[-1][1]) < kclock.FIT_NS


@pytest.fixture
def coarse_lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A datapath compiled where the timer list cannot be read (this process and the
    compiler child alike), on maps of its own."""
    monkeypatch.setenv("EBPFLB_TIMER_LIST", "/nonexistent/timer_list")
    kclock.clock.cache_clear()
    try:
        with own_datapath() as dp:
            yield Lab(dp, Programmer(dp))
    finally:
        kclock.clock.cache_clear()  # found again, with $EBPFLB_TIMER_LIST as it was


def test_without_hz_both_sides_read_the_coarse_clock(coarse_lab: Lab) -> None:
    assert kclock.clock() is None
    stamps = stamps_between_clock_reads(coarse_lab)
    assert all(before <= seen <= after for before, seen, after in stamps)
    coarse = time.clock_gettime_ns(kclock.CLOCK_MONOTONIC_COARSE)
    assert coarse - stamps[-1][1] < kclock.NSEC_PER_SEC
