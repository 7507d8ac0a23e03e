"""Load generator: one short HTTP request per new TCP connection, non-blocking, prints JSON.

Runs inside the client pod's namespace as a script (standard library only, so it
starts in tens of milliseconds): `python -I loadgen.py rate|latency ...`.

- `rate`: closed loop, `--concurrency` connections always in flight (split over
  `--procs` forked processes, each with its own epoll loop), for `--duration`
  seconds; reports completed connections per second and failures.
- `latency`: open loop, a new connection every 1/`--rate` seconds whatever
  happens to the earlier ones; each request's latency is counted from when it was
  due (so a stall is not hidden: no coordinated omission); reports percentiles.

A request is `GET / HTTP/1.0`; the server answers and closes, the client reads to
EOF and closes (no TIME_WAIT on the client side, so its ports do not run out).
Connections are spread over the `--target`s in turn.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field

REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
OK_PREFIX = b"HTTP/1.1 200"
CONNECT_TIMEOUT_NS = 3_000_000_000
EV_IN = select.EPOLLIN | select.EPOLLRDHUP
EV_OUT = select.EPOLLOUT
EV_ERR = select.EPOLLERR | select.EPOLLHUP


@dataclass
class Conn:
    sock: socket.socket
    due: int  # ns: when it was scheduled (latency is counted from here)
    started: int  # ns: when connect() was called
    counted: bool  # open loop: does this request count (was it due inside the window)?
    sent: bool = False
    head: bytes = b""


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_us: list[int] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


class Loop:
    """An epoll loop driving connections to the targets in turn.

    open_loop: a request counts if it was due while `counting` (and its latency is
    kept); otherwise (closed loop) a request counts if it ends while `counting`."""

    def __init__(self, targets: list[tuple[str, int]], open_loop: bool) -> None:
        self.targets = targets
        self.next_target = 0
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.tally = Tally()
        self.open_loop = open_loop
        self.counting = False

    def start(self, due: int) -> None:
        target = self.targets[self.next_target]
        self.next_target = (self.next_target + 1) % len(self.targets)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        err = s.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            if self.counting:
                self.tally.fail(errno.errorcode.get(err, str(err)))
            return
        fd = s.fileno()
        self.conns[fd] = Conn(s, due, time.monotonic_ns(), self.counting)
        self.ep.register(fd, EV_OUT | EV_IN | select.EPOLLET)

    def _finish(self, fd: int, conn: Conn, why: str | None) -> None:
        del self.conns[fd]
        conn.sock.close()  # also leaves the epoll set
        if not (conn.counted if self.open_loop else self.counting):
            return
        if why is not None:
            self.tally.fail(why)
            return
        self.tally.done += 1
        if self.open_loop:
            self.tally.latencies_us.append((time.monotonic_ns() - conn.due) // 1000)

    def _event(self, fd: int, ev: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        s = conn.sock
        if not conn.sent and ev & (EV_OUT | EV_ERR):
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._finish(fd, conn, errno.errorcode.get(err, str(err)))
                return
            try:
                s.send(REQUEST)
            except OSError as e:
                self._finish(fd, conn, errno.errorcode.get(e.errno or 0, "send"))
                return
            conn.sent = True
        if conn.sent and ev & (EV_IN | EV_ERR):
            while True:
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    return
                except OSError as e:
                    self._finish(fd, conn, errno.errorcode.get(e.errno or 0, "recv"))
                    return
                if not data:
                    ok = conn.head.startswith(OK_PREFIX)
                    self._finish(fd, conn, None if ok else "bad answer")
                    return
                if len(conn.head) < len(OK_PREFIX):
                    conn.head += data[: len(OK_PREFIX)]

    def poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout):
            self._event(fd, ev)

    def expire(self, now: int) -> None:
        """Give up on connections older than CONNECT_TIMEOUT_NS (a dropped SYN, a lost reply)."""
        for fd, conn in list(self.conns.items()):
            if now - conn.started > CONNECT_TIMEOUT_NS:
                self._finish(fd, conn, "timeout")

    def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the connections in flight, then drop the rest."""
        deadline = time.monotonic() + seconds
        while self.conns and time.monotonic() < deadline:
            self.poll(0.05)
            self.expire(time.monotonic_ns())
        self.counting = False
        for fd, conn in list(self.conns.items()):
            conn.counted = False
            self._finish(fd, conn, None)


def closed_loop(
    targets: list[tuple[str, int]], concurrency: int, duration: float, warmup: float
) -> Tally:
    loop = Loop(targets, open_loop=False)
    t0 = time.monotonic_ns()
    counting_from = t0 + int(warmup * 1e9)
    end = counting_from + int(duration * 1e9)
    last_expire = t0
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        if not loop.counting and now >= counting_from:
            loop.counting = True
        while len(loop.conns) < concurrency:
            loop.start(now)
        loop.poll(0.01)
        if now - last_expire > 100_000_000:
            loop.expire(now)
            last_expire = now
    loop.counting = False  # what ends after the window does not count
    loop.drain(1.0)
    return loop.tally


def open_loop(targets: list[tuple[str, int]], rate: float, duration: float, warmup: float) -> Tally:
    loop = Loop(targets, open_loop=True)
    interval = int(1e9 / rate)
    t0 = time.monotonic_ns()
    counting_from = t0 + int(warmup * 1e9)
    end = counting_from + int(duration * 1e9)
    due = t0
    last_expire = t0
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        while due <= now and due < end:
            loop.counting = due >= counting_from
            loop.start(due)
            due += interval
        loop.poll(max(0.0, (due - time.monotonic_ns()) / 1e9))
        if now - last_expire > 100_000_000:
            loop.expire(now)
            last_expire = now
    # Requests due inside the window but still open count too: wait for them (their
    # latency, or their timeout).
    loop.drain(CONNECT_TIMEOUT_NS / 1e9 + 0.5)
    return loop.tally


def percentile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _child(fn_args: tuple[list[tuple[str, int]], int, float, float]) -> int:
    """Fork a worker running closed_loop; returns the read end of its result pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, write the tally, leave without cleanup handlers
        code = 0
        try:
            os.close(r)
            tally = closed_loop(*fn_args)
            os.write(w, json.dumps(tally.__dict__).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return r


def run_rate(args: argparse.Namespace, targets: list[tuple[str, int]]) -> dict[str, object]:
    procs = max(1, args.procs)
    per = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    t_cpu = os.times()
    pipes = [_child((targets, max(1, c), args.duration, args.warmup)) for c in per]
    tallies = []
    for r in pipes:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        if chunks:
            tallies.append(json.loads(b"".join(chunks)))
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    cpu = os.times()
    child_cpu = (cpu.children_user - t_cpu.children_user) + (
        cpu.children_system - t_cpu.children_system
    )
    errors: dict[str, int] = {}
    for t in tallies:
        for k, v in t["errors"].items():
            errors[k] = errors.get(k, 0) + v
    done = sum(t["done"] for t in tallies)
    return {
        "mode": "rate",
        "connections": done,
        "failed": sum(t["failed"] for t in tallies),
        "errors": errors,
        "duration": args.duration,
        "per_second": done / args.duration,
        "workers": len(tallies),
        "expected_workers": procs,
        # CPU seconds the workers used per second of wall time (1.0 = one core busy).
        "cpu_cores": child_cpu / (args.duration + args.warmup),
    }


def run_latency(args: argparse.Namespace, targets: list[tuple[str, int]]) -> dict[str, object]:
    tally = open_loop(targets, args.rate, args.duration, args.warmup)
    lat = sorted(tally.latencies_us)
    return {
        "mode": "latency",
        "rate": args.rate,
        "connections": tally.done,
        "failed": tally.failed,
        "errors": tally.errors,
        "duration": args.duration,
        "achieved_per_second": tally.done / args.duration,
        "p50_us": percentile(lat, 0.50),
        "p90_us": percentile(lat, 0.90),
        "p99_us": percentile(lat, 0.99),
        "p999_us": percentile(lat, 0.999),
        "max_us": float(lat[-1]) if lat else float("nan"),
        "mean_us": sum(lat) / len(lat) if lat else float("nan"),
    }


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one short request per TCP connection")
    ap.add_argument("mode", choices=("rate", "latency"))
    ap.add_argument("--target", action="append", required=True, help="IP:PORT, repeatable")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.3)
    ap.add_argument("--concurrency", type=int, default=64, help="rate: connections in flight")
    ap.add_argument("--procs", type=int, default=1, help="rate: worker processes")
    ap.add_argument("--rate", type=float, default=1000.0, help="latency: connections per second")
    args = ap.parse_args(argv)
    targets = [parse_target(t) for t in args.target]
    result = run_rate(args, targets) if args.mode == "rate" else run_latency(args, targets)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
