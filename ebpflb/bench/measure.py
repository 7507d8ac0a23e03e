"""The data-plane figures, taken from inside a mode's client pod: iperf3 and the load generator."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ebpflb.cluster import Netns

LOADGEN = Path(__file__).with_name("loadgen.py")
PYTHON = sys.executable or "/usr/bin/python3"


class MeasureError(RuntimeError):
    """A client failed or gave no usable figure."""


@dataclass(frozen=True)
class LoadSettings:
    """How hard the clients push; the same for every mode of one run."""

    seconds: float = 3.0
    iperf_seconds: float = 3.0  # each throughput run's (whole seconds: iperf3 -t)
    # Throughput runs per round, the round's figure their mean. One TCP stream over veths
    # on 2 vCPUs varies about 20% from run to run, as the scheduler splits sender, receiver
    # and their softirq work over the CPUs anew each run (10 runs over a bare veth pair:
    # 11.6-24.6 Gbit/s of 2 s, 8.6-21.8 of 1 s): more runs, not longer ones.
    iperf_runs: int = 1
    procs: int = 2
    concurrency: int = 128  # direct rose 25% from 64 to 128 in the calibration runs
    latency_rate: float = 1000.0
    warmup: float = 0.3


def _json(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    if done.returncode != 0:
        raise MeasureError(f"{what}: exit {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    try:
        parsed: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise MeasureError(f"{what}: no JSON ({e}): {done.stdout[-400:]}") from None
    return parsed


def iperf(ns: Netns, target: tuple[str, int], seconds: float) -> dict[str, float]:
    """One TCP stream for `seconds`: Gbit/s received by the server, and retransmits."""
    ip, port = target
    whole = max(1, round(seconds))  # iperf3 -t takes whole seconds (0 would mean forever)
    argv = ["iperf3", "-c", ip, "-p", str(port), "-t", str(whole), "-J"]
    argv += ["--connect-timeout", "3000"]
    done = _run(ns, argv, whole + 30, "iperf3")
    out = _json(done, f"iperf3 to {ip}:{port}")
    if "error" in out:
        raise MeasureError(f"iperf3 to {ip}:{port}: {out['error']}")
    end = out["end"]
    return {
        "gbps": float(end["sum_received"]["bits_per_second"]) / 1e9,
        "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0)),
    }


def throughput_of(runs: list[dict[str, float]]) -> dict[str, Any]:
    """A round's throughput from its iperf() runs: their mean Gbit/s, all their retransmits,
    and each run's Gbit/s."""
    return {
        "gbps": sum(r["gbps"] for r in runs) / len(runs),
        "retransmits": sum(r["retransmits"] for r in runs),
        "runs_gbps": [r["gbps"] for r in runs],
    }


def _run(ns: Netns, argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        return ns.run(argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{what} did not finish in {timeout:.0f}s") from None


def _loadgen(ns: Netns, args: list[str], targets: list[tuple[str, int]], timeout: float) -> Any:
    argv = [PYTHON, "-I", str(LOADGEN), *args]
    for ip, port in targets:
        argv += ["--target", f"{ip}:{port}"]
    return _json(_run(ns, argv, timeout, "the load generator"), "load generator")


def conn_rate(ns: Netns, targets: list[tuple[str, int]], s: LoadSettings) -> dict[str, Any]:
    """New connections per second, one request each, `s.concurrency` in flight."""
    args = ["rate", "--duration", f"{s.seconds:g}", "--warmup", f"{s.warmup:g}"]
    args += ["--procs", str(s.procs), "--concurrency", str(s.concurrency)]
    out = _loadgen(ns, args, targets, s.seconds + s.warmup + 30)
    if out["workers"] != out["expected_workers"]:
        raise MeasureError(f"load generator: {out['workers']} of {out['expected_workers']} ran")
    return dict(out)


def latency(ns: Netns, targets: list[tuple[str, int]], s: LoadSettings) -> dict[str, Any]:
    """Request latency percentiles (µs) at `s.latency_rate` new connections per second."""
    args = ["latency", "--duration", f"{s.seconds:g}", "--warmup", f"{s.warmup:g}"]
    args += ["--rate", f"{s.latency_rate:g}"]
    return dict(_loadgen(ns, args, targets, s.seconds + s.warmup + 30))


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def _prog_stats(prog_id: int) -> tuple[int, int]:
    done = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise MeasureError(f"bpftool prog show id {prog_id}: {done.stderr.strip()}")
    info = json.loads(done.stdout)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def live_program_cost(
    programs: dict[str, int], ns: Netns, targets: list[tuple[str, int]], s: LoadSettings
) -> dict[str, Any]:
    """One connection-rate run with the kernel's BPF run-time statistics on
    (kernel.bpf_stats_enabled, restored after): ns per run of each program in real
    traffic, and runs per connection. The statistics cost two clock reads per run,
    so this run is not one of the rounds. It has no warm-up: the statistics count every
    program run, so every connection made must count too (with a warm-up, 1.2 times too
    many runs per connection were reported)."""
    old = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1\n")
    try:
        before = {name: _prog_stats(i) for name, i in programs.items()}
        run = conn_rate(ns, targets, replace(s, warmup=0.0))
        after = {name: _prog_stats(i) for name, i in programs.items()}
    finally:
        BPF_STATS.write_text(old + "\n")
    conns = max(int(run["connections"]), 1)
    out: dict[str, Any] = {"conn_per_s": run["per_second"], "connections": run["connections"]}
    for name in programs:
        dt = after[name][0] - before[name][0]
        dn = after[name][1] - before[name][1]
        out[name] = {
            "runs": dn,
            "ns_per_run": dt / dn if dn else None,
            "runs_per_connection": dn / conns,
            "ns_per_connection": dt / conns,
        }
    return out
