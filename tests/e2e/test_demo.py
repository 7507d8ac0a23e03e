"""`ebpflb demo` as a user runs it: it shows both backends answering and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from ebpflb.cluster import leftovers
from ebpflb.harness import EBPFLB, PIN_ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]


def test_demo_balances_and_cleans_up_after_itself() -> None:
    done = subprocess.run(
        [*EBPFLB, "demo", "--nodes", "2"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    prefix = re.search(r"cluster (elb-[0-9a-f]{6})", out)
    assert prefix, out
    # The ClusterIP table: every backend has hits.
    rows = [line.split() for line in out.splitlines() if line.startswith("nginx-service ")]
    assert len(rows) == 2 and all(int(r[-3]) > 0 for r in rows), out
    assert "every backend answered" in out
    # Nothing left: namespaces, links, processes, temp files, pins.
    assert leftovers(prefix.group(1)) == []
    assert not list(PIN_ROOT.glob(f"{prefix.group(1)}-*"))
    agents = subprocess.run(["pgrep", "-af", prefix.group(1)], capture_output=True, text=True)
    assert agents.stdout == ""
