"""Per-packet cost of the datapath by BPF_PROG_TEST_RUN, from `python -m ebpflb.datapath.bench`.

The datapath's own bench is run as a child process (it compiles the program with
bcc, fills the maps to each Service count and times every path) and its table is
parsed, so this module depends on its printed table, not on its Python API.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence

PYTHON = sys.executable or "/usr/bin/python3"
HEADER = "ns per packet"


class PerPacketError(RuntimeError):
    """The datapath bench failed or printed no table."""


def parse_table(text: str) -> dict[int, dict[str, float]]:
    """{Service count: {path: ns}} from the bench's table.

    The header line starts with "ns per packet" and ends with the counts
    (1,000 style); every following line that ends in as many numbers is a path.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER)), None)
    if start is None:
        raise PerPacketError(f"no '{HEADER}' table in:\n{text[-2000:]}")
    counts: list[int] = []
    for token in reversed(lines[start].split()):
        try:
            counts.append(int(token.replace(",", "")))
        except ValueError:
            break
    counts.reverse()
    if not counts:
        raise PerPacketError(f"no Service counts in the header: {lines[start]!r}")
    table: dict[int, dict[str, float]] = {n: {} for n in counts}
    for line in lines[start + 1 :]:
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


def run_bench(
    counts: Sequence[int], repeat: int, timeout: float = 900.0
) -> dict[int, dict[str, float]]:
    """One run of the datapath bench at each Service count (one compile, maps refilled)."""
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
    return parse_table(done.stdout)


def median_table(rounds: Sequence[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """The median of each (count, path) over the rounds that have it."""
    out: dict[int, dict[str, float]] = {}
    for r in rounds:
        for n, paths in r.items():
            for path in paths:
                out.setdefault(n, {})[path] = 0.0
    for n, paths in out.items():
        for path in paths:
            values = [r[n][path] for r in rounds if n in r and path in r[n]]
            paths[path] = statistics.median(values)
    return out
