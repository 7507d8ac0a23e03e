"""kclock: HZ and the jiffies' offset from /proc/timer_list, at any uptime, never a wrong HZ."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebpflb.datapath import kclock
from ebpflb.datapath.kclock import (
    HZ_CHOICES,
    NSEC_PER_SEC,
    JiffiesClock,
    Reading,
    candidates,
    detect,
    initial_jiffies,
    offset,
    parse,
    tick_nsec,
)

pytestmark = pytest.mark.unit

# The start of /proc/timer_list on the VM this was written on (HZ=250, 11.8 h up), the
# middle of CPU 0's part left out.
THIS_MACHINE = """\
Timer List Version: v0.10
HRTIMER_MAX_CLOCK_BASES: 8
now at 42476523541910 nsecs

cpu: 0
 clock 0:
  .base:       00000000b2f095ee
  .index:      0
  .resolution: 1 nsecs
  .offset:     0 nsecs
active timers:
 #0: <00000000a044c9e7>, tick_nohz_handler, S:01
 # expires at 42476524000000-42476524000000 nsecs [in 458090 to 458090 nsecs]
  .expires_next   : 42476524000000 nsecs
  .hres_active    : 1
  .nohz           : 1
  .highres        : 1
  .last_tick      : 42476516000000 nsecs
  .tick_stopped   : 0
  .idle_jiffies   : 4305511388
  .last_jiffies   : 4305511388
  .next_timer     : 42603632000000
  .idle_expires   : 42603632000000 nsecs
jiffies: 4305511390

cpu: 1
 clock 0:
  .base:       000000008bb09a3e
"""
MS = 1_000_000


def test_kernel_constants() -> None:
    assert (initial_jiffies(250), tick_nsec(250)) == (2**32 - 75_000, 4 * MS)
    assert (initial_jiffies(1000), tick_nsec(1000)) == (2**32 - 300_000, MS)
    assert (tick_nsec(300), tick_nsec(1024), tick_nsec(1200)) == (3_333_333, 976_563, 833_333)


def test_parse_this_machines_dump() -> None:
    assert parse(THIS_MACHINE) == (42476523541910, 4305511390)


@pytest.mark.parametrize(
    "text",
    [
        "",
        THIS_MACHINE.replace("now at", "now:"),
        THIS_MACHINE.replace("jiffies: 4305511390", "jiffies 4305511390"),
        THIS_MACHINE[: THIS_MACHINE.index("jiffies: 43") + len("jiffies: 43")],  # cut short
        "Timer List Version: v0.10\nnow at 12 nsecs\n",
        "jiffies: 4305511390\n",
    ],
)
def test_parse_wants_both_lines_whole(text: str) -> None:
    assert parse(text) is None


def test_this_machines_dump_fits_250_only_and_its_offset() -> None:
    start, jiffies = 42476523541910, 4305511390
    reading = Reading(start, jiffies, start + 200_000)
    assert candidates([reading]) == [250]
    assert candidates([reading], kclock.SUSPECT_NS) == [250]
    assert offset(250, [reading]) == -144 * MS  # 36 ticks: measured again and again here


def test_read_a_file_as_far_as_the_first_jiffies(tmp_path: Path) -> None:
    path = tmp_path / "timer_list"
    start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    now = THIS_MACHINE.replace("42476523541910", str(start))
    path.write_text(now + "x" * 10**6)  # past its first 1024-byte read
    r = kclock.read(str(path))
    assert (r.start, r.jiffies) == (start, 4305511390)
    assert start <= r.done <= time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@pytest.mark.parametrize(
    "text",
    [
        THIS_MACHINE,  # "now at" 11.8 h up: not read now
        "now at 99999999999999999 nsecs\njiffies: 4305511390\n",  # not yet
        THIS_MACHINE.replace("jiffies:", "jiffies ="),
        "",
    ],
)
def test_read_refuses_what_is_not_a_timer_list_of_now(tmp_path: Path, text: str) -> None:
    path = tmp_path / "timer_list"
    path.write_text(text)
    with pytest.raises(ValueError):
        kclock.read(str(path))


def test_read_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        kclock.read(str(tmp_path / "none"))


@dataclass
class Kernel:
    """Jiffies as a kernel of this HZ keeps them: ticks begin on multiples of TICK_NSEC of
    CLOCK_MONOTONIC (`now`), jiffies_ns - CLOCK_MONOTONIC is `lead` ticks from the tick's
    start; a reading takes `width` ns, and the first `late` of them see the jiffies a tick
    behind (their interrupt not run yet)."""

    hz: int
    now: int
    lead: int
    width: int = 200_000
    late: int = 0
    sleeps: int = 0

    @property
    def tick(self) -> int:
        return tick_nsec(self.hz)

    def read(self) -> Reading:
        start = self.now
        jiffies = initial_jiffies(self.hz) + (start + self.width // 2) // self.tick + self.lead
        if self.late:
            self.late -= 1
            jiffies -= 1
        self.now += self.width
        return Reading(start, jiffies, self.now)

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += int(seconds * NSEC_PER_SEC)


UPTIMES_S = (
    *(2, 30, 120, 200, 250, 280, 290, 295, 298, 299, 299.5, 300, 300.5, 301, 302, 305),
    *(310, 320, 350, 400, 500, 700, 1000, 3600, 42476.5, 86400 * 100, 86400 * 365 * 10),
)
LEADS_S = (-1.5, -0.144, 0, 0.13, 1.5)  # jiffies_ns - CLOCK_MONOTONIC


def kernels(hz: int, **kw: int) -> Iterator[Kernel]:
    for uptime in UPTIMES_S:
        for lead_s in LEADS_S:
            lead = round(lead_s * NSEC_PER_SEC) // tick_nsec(hz)
            if uptime + lead_s > 0.1:  # jiffies start at INITIAL_JIFFIES
                yield Kernel(hz, int(uptime * NSEC_PER_SEC), lead, **kw)


@pytest.mark.parametrize("hz", HZ_CHOICES)
def test_detect_finds_hz_and_the_exact_offset_at_any_uptime(hz: int) -> None:
    for k in kernels(hz):
        uptime = k.now / NSEC_PER_SEC
        assert detect(k.read, k.sleep) == JiffiesClock(hz, k.lead * k.tick), uptime
        assert k.sleeps * kclock.RATE_STEP_S <= 1.0, uptime  # the pace decided, in time
        if not 300 - 450 < uptime < 300 + 450:
            assert k.sleeps == 0, uptime  # one reading is enough but near the wrap


@pytest.mark.parametrize("hz", [100, 250, 1000, 1024])
def test_the_offset_survives_late_interrupts_and_readings_across_a_tick(hz: int) -> None:
    for k in kernels(hz, late=1):
        assert detect(k.read, k.sleep) == JiffiesClock(hz, k.lead * k.tick)
    for k in kernels(hz):
        # Readings that begin just before a tick: each one's jiffies may be the next tick's.
        k.now = k.now // k.tick * k.tick + k.tick - k.width // 3
        assert detect(k.read, k.sleep) == JiffiesClock(hz, k.lead * k.tick)


@pytest.mark.parametrize("hz", HZ_CHOICES)
def test_jiffies_far_from_the_clock_leave_hz_unknown(hz: int) -> None:
    """A kernel whose jiffies miss CLOCK_MONOTONIC by more than FIT_NS (none seen) gets the
    coarse clock, not another HZ that happens to fit, near the wrap included."""
    for uptime in UPTIMES_S:
        for lead_s in (-9.0, -2.5, 2.5, 9.0):
            if uptime + lead_s > 0.1:
                lead = round(lead_s * NSEC_PER_SEC) // tick_nsec(hz)
                k = Kernel(hz, int(uptime * NSEC_PER_SEC), lead)
                with pytest.raises(ValueError, match="HZ unknown"):
                    detect(k.read, k.sleep)


def test_ambiguity_that_does_not_resolve_in_time_leaves_hz_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 250 against 256 right at the wrap: 0.3 s is too short for the pace to tell them apart.
    monkeypatch.setattr(kclock, "RATE_DEADLINE_S", 0.3)
    k = Kernel(250, 300 * NSEC_PER_SEC, -36)
    with pytest.raises(ValueError, match=r"HZ unknown: the jiffies keep pace at HZ \[250, 256\]"):
        detect(k.read, k.sleep)
    assert k.sleeps == 3


@pytest.fixture
def fresh_clock() -> Iterator[None]:
    kclock.clock.cache_clear()
    yield
    kclock.clock.cache_clear()


@pytest.mark.usefixtures("fresh_clock")
@pytest.mark.parametrize("text", [None, THIS_MACHINE, THIS_MACHINE.replace("jiffies", "j")])
def test_without_a_timer_list_of_now_the_clock_is_the_coarse_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str | None
) -> None:
    path = tmp_path / "timer_list"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("EBPFLB_TIMER_LIST", str(path))
    assert kclock.clock() is None
    coarse = kclock.CLOCK_MONOTONIC_COARSE
    before = time.clock_gettime_ns(coarse)
    now = kclock.now()
    assert before <= now <= time.clock_gettime_ns(coarse)
    assert kclock.resolution() == round(time.clock_getres(coarse) * NSEC_PER_SEC)
