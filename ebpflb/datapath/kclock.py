"""The datapath's clock (lb_now() in bpf/conntrack.h) in userspace: the kernel's HZ and the
offset of its jiffies from CLOCK_MONOTONIC, found in /proc/timer_list."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

NSEC_PER_SEC = 1_000_000_000
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; the time module does not export it
TIMER_LIST = "/proc/timer_list"  # root's; $EBPFLB_TIMER_LIST overrides (tests)
# Every HZ a kernel can be built with: kernel/Kconfig.hz's (100, 250, 300, 1000) and those
# of alpha, arm and mips.
HZ_CHOICES = (24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200)
# How far jiffies counted at the right HZ may lie from CLOCK_MONOTONIC: by the ticks early
# boot missed (-0.144 s on the VM this was written on). Jiffies counted at a wrong HZ miss
# by more, except around 300 s of uptime, when 32-bit jiffies wrap whatever HZ is. So while
# more than one HZ comes within SUSPECT_NS, the pace of the jiffies over RATE_STEP_S steps
# decides among them (1000 against 1024 takes 0.1-0.2 s, 250 against 256 up to 0.5 s;
# needed in the first 12 minutes after boot), and HZ stays unknown if it has not by
# RATE_DEADLINE_S. A wrong HZ could only be taken if the right one missed by more than
# SUSPECT_NS.
FIT_NS = 2 * NSEC_PER_SEC
SUSPECT_NS = 10 * NSEC_PER_SEC
RATE_STEP_S = 0.1
RATE_DEADLINE_S = 3.0
READ_MAX_NS = NSEC_PER_SEC // 10  # a reading's done - start; more: not the kernel's, or stalled
OFFSET_READINGS = 3  # readings the offset is taken from (see offset())

_NOW_AT = re.compile(r"^now at (\d+) nsecs\n", re.M)
_JIFFIES = re.compile(r"^jiffies: (\d+)\n", re.M)


def initial_jiffies(hz: int) -> int:
    """The kernel's INITIAL_JIFFIES: jiffies_64 at boot, 300 s before 32-bit jiffies wrap."""
    return (-300 * hz) & 0xFFFF_FFFF


def tick_nsec(hz: int) -> int:
    """The kernel's TICK_NSEC: CLOCK_MONOTONIC ns per jiffy."""
    return (NSEC_PER_SEC + hz // 2) // hz


def jiffies_ns(jiffies: int, hz: int) -> int:
    """lb_now() at this jiffies_64: ns since boot at tick resolution."""
    return (jiffies - initial_jiffies(hz)) * tick_nsec(hz)


@dataclass(frozen=True)
class Reading:
    """jiffies_64 as /proc/timer_list showed it, read between two CLOCK_MONOTONIC times."""

    start: int  # "now at": CLOCK_MONOTONIC as the kernel began the dump
    jiffies: int  # the first "jiffies:" line, printed after it
    done: int  # CLOCK_MONOTONIC once that line had been read


def parse(text: str) -> tuple[int, int] | None:
    """("now at" ns, first "jiffies:" value) of a /proc/timer_list dump, or of its beginning;
    None unless it has both lines whole."""
    now, jiffies = _NOW_AT.search(text), _JIFFIES.search(text)
    if now is None or jiffies is None:
        return None
    return int(now.group(1)), int(jiffies.group(1))


def read(path: str = TIMER_LIST) -> Reading:
    """One Reading, read only as far as the first jiffies line (0.2 ms here; the whole dump
    takes 3), so that start and done lie close together."""
    fd = os.open(path, os.O_RDONLY)
    try:
        text = ""
        while chunk := os.read(fd, 1024):
            text += chunk.decode("ascii", "replace")
            if (found := parse(text)) is not None:
                done = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                if not 0 <= done - found[0] < READ_MAX_NS:
                    raise ValueError(f"{path}: 'now at' is not the time it was read")
                return Reading(found[0], found[1], done)
    finally:
        os.close(fd)
    raise ValueError(f"{path} has no 'now at' and 'jiffies:' lines")


def fits(hz: int, r: Reading, within: int = FIT_NS) -> bool:
    """Whether jiffies counted at hz lie within `within` ns of CLOCK_MONOTONIC."""
    return r.jiffies >= initial_jiffies(hz) and abs(jiffies_ns(r.jiffies, hz) - r.start) <= within


def keeps_pace(hz: int, first: Reading, later: Reading) -> bool:
    """Whether the jiffies between two readings, counted at hz, took the CLOCK_MONOTONIC time
    between them. A reading's jiffies were read between its start and done, in a tick that
    began up to a tick before (two if the interrupt that moves them was late): two ticks of
    slack on each side."""
    elapsed = (later.jiffies - first.jiffies) * tick_nsec(hz)
    slack = 2 * tick_nsec(hz)
    return later.start - first.done - slack <= elapsed <= later.done - first.start + slack


def candidates(readings: Sequence[Reading], within: int = FIT_NS) -> list[int]:
    """The HZ values that fit every reading and keep pace from the first to each later one."""
    first = readings[0]
    return [
        hz
        for hz in HZ_CHOICES
        if all(fits(hz, r, within) and keeps_pace(hz, first, r) for r in readings)
    ]


def offset(hz: int, readings: Sequence[Reading]) -> int:
    """lb_now() - CLOCK_MONOTONIC rounded down to its tick: a whole number of ticks, fixed
    at boot. The kernel starts ticks on multiples of TICK_NSEC of CLOCK_MONOTONIC
    (tick_init_jiffy_update() in kernel/time/tick-sched.c), so a reading's jiffies are
    those of the tick that began at or before its done, and a tick fewer if one began
    between their read and done or the interrupt that moves them was late: the highest
    estimate of a few readings is exact. (A kernel whose ticks were not aligned would put
    now() up to a tick off.)"""
    t = tick_nsec(hz)
    return max(jiffies_ns(r.jiffies, hz) - r.done // t * t for r in readings)


@dataclass(frozen=True)
class JiffiesClock:
    """lb_now() for this kernel: jiffies_64 since boot in ns, ticks of hz."""

    hz: int
    offset: int  # lb_now() - CLOCK_MONOTONIC rounded down to its tick (see offset())

    @property
    def tick(self) -> int:
        return tick_nsec(self.hz)

    def now(self) -> int:
        """What lb_now() returns at this instant: CLOCK_MONOTONIC rounded down to its tick,
        plus the offset (CLOCK_MONOTONIC_COARSE moves at the same interrupt, but the
        timekeeping it shows is not aligned to the ticks: 1.3 ms past them here)."""
        t = self.tick
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // t * t + self.offset

    def cflags(self) -> list[str]:
        """The -D flags that make lb_now() this clock."""
        return [
            f"-DLB_TICK_NS={self.tick}ULL",
            f"-DLB_INITIAL_JIFFIES={initial_jiffies(self.hz)}ULL",
        ]


def detect(
    read: Callable[[], Reading] = read, sleep: Callable[[float], None] = time.sleep
) -> JiffiesClock:
    """The clock from readings of the timer list; ValueError if they leave HZ unknown."""
    readings = [read()]
    waited = 0.0
    while len(candidates(readings, SUSPECT_NS)) > 1 and waited < RATE_DEADLINE_S:
        sleep(RATE_STEP_S)
        waited += RATE_STEP_S
        readings.append(read())
    while len(readings) < OFFSET_READINGS:
        readings.append(read())
    suspects, hzs = candidates(readings, SUSPECT_NS), candidates(readings)
    if len(suspects) != 1 or hzs != suspects:
        raise ValueError(
            f"HZ unknown: the jiffies keep pace at HZ {suspects} and are within "
            f"{FIT_NS / NSEC_PER_SEC:g} s of CLOCK_MONOTONIC at {hzs}"
        )
    return JiffiesClock(hzs[0], offset(hzs[0], readings))


@functools.cache
def clock() -> JiffiesClock | None:
    """This kernel's jiffies clock, found once per process (1 ms; up to 0.5 s in the first
    12 minutes after boot). None where the timer list cannot be read (it is root's, and
    containers may mask it) or leaves HZ unknown: the loader then compiles lb_now() on
    bpf_ktime_get_coarse_ns() and now() reads CLOCK_MONOTONIC_COARSE, the same clock.
    Should two processes still disagree (one could read the timer list, one not), their
    clocks differ by the offset (within FIT_NS; -0.144 s here) and a tick, never by a
    wrong HZ's drift."""
    path = os.environ.get("EBPFLB_TIMER_LIST", TIMER_LIST)
    try:
        found = detect(functools.partial(read, path))
    except (OSError, ValueError) as e:
        log.warning("the datapath's clock stays CLOCK_MONOTONIC_COARSE (~30 ns a packet): %s", e)
        return None
    log.debug("the datapath's clock: jiffies at HZ=%d, %+d ns", found.hz, found.offset)
    return found


def now() -> int:
    """What lb_now() in bpf/conntrack.h returns at this instant (see clock())."""
    c = clock()
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) if c is None else c.now()


def resolution() -> int:
    """How often the clock moves (ns): a tick."""
    c = clock()
    return round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * NSEC_PER_SEC) if c is None else c.tick
