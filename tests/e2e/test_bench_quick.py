"""`ebpflb bench` in miniature: two modes, two scales, two short rounds; nothing left after."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from ebpflb.bench.measure import LoadSettings
from ebpflb.bench.runner import Plan, Runner
from ebpflb.bench.topology import BudgetExceeded, NetfilterMode
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
        rounds=2,
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
            rounds = results["dataplane"][scale][mode]  # two rounds, two iperf3 runs each
            for record in rounds:
                runs = record["throughput"]["runs_gbps"]
                assert len(runs) == 2
                assert record["throughput"]["gbps"] == pytest.approx(sum(runs) / 2)
            # The second round takes the modes in the other order.
            first = 0 if mode == "direct" else 1
            assert [r["position"] for r in rounds] == [first, 1 - first]
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


def test_nftables_install_stops_early_when_its_transactions_say_it_cannot_finish() -> None:
    """kube-proxy's nftables shape costs more per transaction the more the table holds: an
    install that its own transactions show cannot end within the budget is given up before
    the budget is spent, and the table keeps what it had."""
    if reason := missing_requirement():
        pytest.skip(reason)
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    before = set(list_netns())
    mode = NetfilterMode("nftables")
    try:
        mode.install(3_002, budget=120.0)  # transactions at 2, 1,002 and 2,002 Services
        assert mode.services == 3_002 and len(mode.nft_batches) == 3
        t0 = time.monotonic()
        with pytest.raises(BudgetExceeded, match="the rest would take at least"):
            mode.install(30_002, budget=20.0)
        assert time.monotonic() - t0 < 10.0  # not the 20 s of the budget
        listed = (
            mode.cluster.ns(mode.node)
            .run(["nft", "list", "map", "ip", "kube-proxy", "service-ips"])
            .stdout
        )
        assert listed.count(": goto service-") == mode.services
        mode.check()  # the measured Service still answers
    finally:
        mode.close()
    assert set(list_netns()) <= before


def test_bench_ebpflb_mode_and_its_programs_in_real_traffic(tmp_path: Path) -> None:
    """The ebpflb mode (agent, registry, socket LB) through one round, and the programs'
    kernel statistics per connection: connect4 runs once per connection made."""
    if reason := missing_requirement():
        pytest.skip(reason)
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    before = set(list_netns())
    plan = Plan.make(
        True,
        tmp_path,
        modes=("ebpflb",),
        scales=(1,),
        rounds=1,
        parts=("dataplane",),
        load=LoadSettings(seconds=0.5, iperf_seconds=1, warmup=0.2, concurrency=8),
    )
    results = Runner(plan).run()
    assert results["summary"]["1"]["ebpflb"]["conn_per_s"]["median"] > 0, results["notes"]
    live = results["live_bpf"]["1"]["ebpflb"]
    assert live["connections"] > 100
    # Every connection made is counted, as every program run is (no warm-up to leave out).
    assert live["sock_connect4"]["runs_per_connection"] == pytest.approx(1.0, abs=0.02)
    assert live["sock_connect4"]["ns_per_run"] > 0
    assert 6 <= live["from_pod"]["runs_per_connection"] <= 14  # each packet of both ends
    assert set(list_netns()) <= before
    assert not [p for p in stale_prefixes(min_age=0) if p not in before]
