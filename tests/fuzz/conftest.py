"""Prints the fuzzing counts (inputs tried, crashes) after the run; with
$EBPFLB_FUZZ_REPORT, also writes them there as JSON."""

from __future__ import annotations

import json
import os

import pytest

from tests.fuzz.common import EXAMPLES, TALLIES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLIES:
        return
    tr = terminalreporter
    tr.section(f"fuzzing counts (EBPFLB_FUZZ_EXAMPLES={EXAMPLES})")
    for target, t in sorted(TALLIES.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items()))
        tr.write_line(f"{target}: {t.tried} inputs tried, {t.crashes} crashes ({outcomes})")
    tried = sum(t.tried for t in TALLIES.values())
    crashes = sum(t.crashes for t in TALLIES.values())
    tr.write_line(f"total: {tried} inputs tried, {crashes} crashes")
    if path := os.environ.get("EBPFLB_FUZZ_REPORT"):
        report = {
            "examples": EXAMPLES,
            "total": {"tried": tried, "crashes": crashes},
            "targets": {
                k: {"tried": t.tried, "crashes": t.crashes, "outcomes": dict(t.outcomes)}
                for k, t in sorted(TALLIES.items())
            },
        }
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
