"""Hitless upgrade: the agent is killed and a version whose conntrack layout differs is
started (a variant bpf/ through EBPFLB_BPF_DIR), then the first one again, under steady
traffic: the flows are migrated to the new maps, no connection fails or is reset."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ebpflb.datapath.layout import read_pinned
from ebpflb.harness import LbCluster, eventually
from tests.datapath.variant import variant_bpf_dir
from tests.e2e.test_restart import Traffic, add_web, map_ids, service

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
    variant = variant_bpf_dir(tmp_path / "bpf")
    with LbCluster(nodes=1) as lb:
        node = lb.cluster.nodes[0]
        pins = lb.pin_dir(node)
        client = lb.cluster.add_client_pod(node)
        lb.wait_attached(client)
        for i in range(2):
            add_web(lb, "steady", f"steady{i}")
        lb.apply(service("steady", "steady"))
        vip = lb.cluster_ip("steady")
        ns = lb.cluster.ns(client)

        def answers(ip: str, port: int) -> None:
            with ns.socket() as s:
                s.settimeout(2)
                s.connect((ip, port))

        eventually(lambda: answers(vip, 80))
        first = read_pinned(pins)
        assert first is not None
        ids = map_ids(str(pins))

        def restart_under_traffic(bpf_dir: Path | None, ct_value_size: int, n: int) -> None:
            """Kill the agent and start one compiling bpf_dir (None: the repository's),
            while a Service is created; until its maps have the new layout. The traffic
            runs only around this (nginx ends a keep-alive connection after 1000
            requests, 50 s of Traffic's)."""
            name = f"while-down{n}"
            add_web(lb, name, f"{name}-pod")
            traffic = Traffic(ns, vip, 80)
            threads = traffic.start()
            started = time.monotonic()
            try:
                time.sleep(1)
                lb.stop_agent(node, signal.SIGKILL)
                lb.apply(service(name, name, port=8080))
                if bpf_dir is None:
                    monkeypatch.delenv("EBPFLB_BPF_DIR")
                else:
                    monkeypatch.setenv("EBPFLB_BPF_DIR", str(bpf_dir))
                agent = lb.start_agent(node)

                def migrated() -> None:
                    layout = read_pinned(pins)
                    assert layout is not None
                    assert layout["conntrack"].value.size == ct_value_size
                    assert lb.agent_log(node).count("migrated ") == n

                eventually(migrated, timeout=180, interval=0.5)
                time.sleep(1)
            finally:
                traffic.stop.set()
                for t in threads:
                    t.join(timeout=30)
            seconds = time.monotonic() - started
            assert traffic.failures == []
            assert traffic.long_requests > 50 and traffic.new_connections > 50
            eventually(lambda: answers(lb.cluster_ip(name), 8080), timeout=60)
            print(
                f"\nupgrade {n}: {seconds:.0f} s of traffic, {traffic.new_connections} new "
                f"connections and {traffic.long_requests} requests on 3 long connections, "
                f"0 failed; agent peak RSS (VmHWM) {vm_hwm_kb(agent.pid) / 1024:.0f} MB"
            )

        restart_under_traffic(variant, 48, 1)
        restart_under_traffic(None, first["conntrack"].value.size, 2)
        assert map_ids(str(pins))["conntrack"] != ids["conntrack"]  # migrated, not adopted
        assert not pins.with_name(pins.name + "-staging").exists()
