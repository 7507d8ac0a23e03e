"""Per-packet cost of the datapath by BPF_PROG_TEST_RUN, from `python -m ebpflb.datapath.bench`.

The datapath's own bench is run as a child process (it compiles the program with
bcc into one datapath per Service count, times every path on all of them in
interleaved rounds) and its tables are parsed: the ns per packet, and each count's
ratio to the smallest (the median of per-round ratios). This module depends on the
printed tables, not on the bench's Python API.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PYTHON = sys.executable or "/usr/bin/python3"
HEADER = "ns per packet"
RATIO_HEADER = "ratio to "

Table = dict[int, dict[str, float]]  # Service count -> path -> figure


class PerPacketError(RuntimeError):
    """The datapath bench failed or printed no table."""


def parse_table(text: str, header: str = HEADER) -> Table:
    """{Service count: {path: figure}} from the bench's table whose header line starts with
    header ("ns per packet" by default).

    The header ends with the counts (1,000 style); every following line up to the first
    empty one that ends in as many numbers is a path.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        raise PerPacketError(f"no '{header}' table in:\n{text[-2000:]}")
    counts: list[int] = []
    for token in reversed(lines[start].split()):
        try:
            counts.append(int(token.replace(",", "")))
        except ValueError:
            break
    counts.reverse()
    if not counts:
        raise PerPacketError(f"no Service counts in the header: {lines[start]!r}")
    table: Table = {n: {} for n in counts}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        parts = line.split()
        if len(parts) <= len(counts):
            continue
        try:
            values = [float(p) for p in parts[-len(counts) :]]
        except ValueError:
            continue
        label = line.rsplit(None, len(counts))[0].strip()
        for n, v in zip(counts, values, strict=True):
            table[n][label] = v
    return table


def parse_ratios(text: str) -> Table:
    """{Service count: {path: ratio to the smallest count}} from the bench's ratio table;
    {} if it printed none (a single count)."""
    if not any(line.startswith(RATIO_HEADER) for line in text.splitlines()):
        return {}
    return parse_table(text, RATIO_HEADER)


@dataclass(frozen=True)
class BenchRun:
    """One run of the datapath bench: ns per packet, and ratios to the smallest count."""

    table: Table
    ratios: Table


def run_bench(counts: Sequence[int], repeat: int, timeout: float = 900.0) -> BenchRun:
    """One run of the datapath bench at the Service counts (a datapath each, all at once)."""
    argv = [PYTHON, "-m", "ebpflb.datapath.bench", "--services", ",".join(map(str, counts))]
    argv += ["--repeat", str(repeat)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PerPacketError(f"the datapath bench took over {timeout:.0f}s") from None
    if done.returncode != 0:
        raise PerPacketError(
            f"the datapath bench failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return BenchRun(parse_table(done.stdout), parse_ratios(done.stdout))


def median_table(rounds: Sequence[Table]) -> Table:
    """The median of each (count, path) over the rounds that have it."""
    out: Table = {}
    for r in rounds:
        for n, paths in r.items():
            for path in paths:
                out.setdefault(n, {})[path] = 0.0
    for n, paths in out.items():
        for path in paths:
            values = [r[n][path] for r in rounds if n in r and path in r[n]]
            paths[path] = statistics.median(values)
    return out
