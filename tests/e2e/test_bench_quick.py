"""`ebpflb bench` in miniature: two modes, one scale, one short round; everything removed after."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ebpflb.bench.measure import LoadSettings
from ebpflb.bench.runner import Plan, Runner
from ebpflb.cluster import stale_prefixes
from ebpflb.cluster.netns import list_netns
from tests.e2e.conftest import missing_requirement

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and iptables"),
]


def test_bench_dataplane_direct_and_iptables(tmp_path: Path) -> None:
    if reason := missing_requirement():
        pytest.skip(reason)
    for tool in ("iperf3", "iptables-legacy-restore", "ss"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    before = set(list_netns())
    plan = Plan.make(
        True,
        tmp_path,
        modes=("direct", "iptables-legacy"),
        scales=(1, 100),
        rounds=1,
        parts=("dataplane",),
        load=LoadSettings(seconds=0.5, iperf_seconds=1, iperf_runs=2, warmup=0.1, concurrency=8),
    )
    runner = Runner(plan)
    results = runner.run()
    written = runner.write()

    summary = results["summary"]
    for scale in ("1", "100"):
        for mode in ("direct", "iptables-legacy"):
            figures = summary[scale][mode]
            assert figures["conn_per_s"]["median"] > 0, (scale, mode, results["notes"])
            assert figures["gbps"]["median"] > 0
            (record,) = results["dataplane"][scale][mode]  # one round: two iperf3 runs
            runs = record["throughput"]["runs_gbps"]
            assert len(runs) == 2 and record["throughput"]["gbps"] == pytest.approx(sum(runs) / 2)
            assert figures["p99_ms"]["median"] > 0
        assert summary[scale]["iptables-legacy"]["conn_per_s"]["vs direct"] > 0
    installs = results["modes"]["iptables-legacy"]["installs"]
    assert installs[-1]["services"] == 100 and installs[-1]["rules"] > 100
    assert results["modes"]["direct"]["setup"]["bridge-nf-call-iptables"] in ("0", "absent")
    assert str(plan.markdown_path) in written and plan.json_path.exists()
    assert "### 100 Services" in plan.markdown_path.read_text()
    # Nothing is left: no namespace, no cluster.
    assert set(list_netns()) <= before
    assert not [p for p in stale_prefixes(min_age=0) if p not in before]
