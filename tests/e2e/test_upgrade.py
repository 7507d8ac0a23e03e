"""Hitless upgrade: the agent is killed and a version whose conntrack layout differs is
started, under steady traffic: the flows are migrated to the new maps, no connection fails
or is reset. The old version is a variant of bpf/ (through EBPFLB_BPF_DIR) whose conntrack
value has another layout; the new one is this repository's, whose Python mirrors match it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ebpflb.datapath.layout import read_pinned
from ebpflb.harness import LbCluster, eventually
from tests.datapath.variant import variant_bpf_dir
from tests.e2e.test_restart import Traffic, add_web, map_ids, service, steady_service

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and BPF"),
]


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1])


def test_agent_upgrade_to_another_map_layout_under_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EBPFLB_BPF_DIR", str(variant_bpf_dir(tmp_path / "bpf")))
    with LbCluster(nodes=1) as lb:
        node = lb.cluster.nodes[0]
        pins = lb.pin_dir(node)
        steady = steady_service(lb, "steady")
        ns, vip, answers = steady.ns, steady.vip, steady.answers
        old = read_pinned(pins)
        assert old is not None and old["conntrack"].value.size == 48  # the variant's
        monkeypatch.delenv("EBPFLB_BPF_DIR")

        def restart_under_traffic(
            n: int, extra: tuple[str, ...] = ()
        ) -> tuple[Traffic, float, int]:
            """Kill the agent under traffic, create a Service, start it again; until it
            synced. The traffic runs only around this (nginx ends a keep-alive connection
            after 1000 requests, 50 s of Traffic's)."""
            name = f"while-down{n}"
            add_web(lb, name, f"{name}-pod")
            traffic = Traffic(ns, vip, 80)
            started = time.monotonic()
            with traffic.running():
                time.sleep(1)
                lb.stop_agent(node, signal.SIGKILL)
                lb.apply(service(name, name, port=8080))
                agent = lb.start_agent(node, extra)
                eventually(
                    lambda: lb.agent_log(node).count("full sync (start)") == n + 1, timeout=180
                )
                eventually(lambda: answers(lb.cluster_ip(name), 8080), timeout=60)
                time.sleep(1)
            assert traffic.failures == []
            assert traffic.long_requests > 50 and traffic.new_connections > 50
            return traffic, time.monotonic() - started, vm_hwm_kb(agent.pid)

        def report(what: str, traffic: Traffic, seconds: float, hwm: int) -> None:
            print(
                f"\n{what}: {seconds:.0f} s of traffic, {traffic.new_connections} new "
                f"connections and {traffic.long_requests} requests on 3 long connections, "
                f"0 failed; agent peak RSS (VmHWM) {hwm / 1024:.0f} MB"
            )

        report("upgrade (migrated)", *restart_under_traffic(1))
        new = read_pinned(pins)
        assert new is not None and new["conntrack"].value.size != 48
        assert "migrated " in lb.agent_log(node)
        assert not pins.with_name(pins.name + "-staging").exists()
        ids = map_ids(str(pins))
        report("restart (adopted)", *restart_under_traffic(2))
        assert map_ids(str(pins)) == ids
        assert lb.agent_log(node).count("migrated ") == 1
        report(
            "restart with --max-conntrack 131072 (migrated)",
            *restart_under_traffic(3, ("--max-conntrack", "131072")),
        )
        resized = read_pinned(pins)
        assert resized is not None and resized["conntrack"].max_entries == 131072
        assert lb.agent_log(node).count("migrated ") == 2
