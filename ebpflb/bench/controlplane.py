"""Control-plane figures: a bulk Apply until every entry is in the maps, and one endpoint
change until the maps show it; the same for kube-proxy's iptables-restore; peak RSS."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpflb.bench import iptables
from ebpflb.bench.manifests import apply_all, fake_pod_objects, filler_objects, pod_object
from ebpflb.bench.model import CHURN_BASE, FakePods, ServicePort, filler_services, nth_ip
from ebpflb.bench.probe import MapProbe, read_status
from ebpflb.bench.stats import percentile
from ebpflb.client import RegistryClient
from ebpflb.cluster import Cluster

CHURN_LABEL = "bench-churn"
POLL = 0.0005  # seconds between two looks at one map entry
BULK_POLL = 0.05  # seconds between two reads of the whole services map (~5 ms each at 10,000)


@dataclass(frozen=True)
class ControlSettings:
    services: int = 10_000
    endpoints: int = 10
    changes: int = 200
    netfilter_full_changes: int = 2
    netfilter_partial_changes: int = 10
    netfilter_timeout: float = 120.0
    profile_dir: Path | None = None  # py-spy the agent and the registry into this folder


@dataclass(frozen=True)
class Workload:
    """`services` Services of `endpoints` endpoints each, and a `churn` Service whose
    first endpoint flips between ready and not ready."""

    bulk: list[ServicePort]
    bulk_pods: FakePods
    churn: ServicePort
    churn_pods: FakePods

    @classmethod
    def make(cls, services: int, endpoints: int) -> Workload:
        churn_pods = FakePods(groups=1, per_group=endpoints, label=CHURN_LABEL, prefix="churn")
        groups = max(1, min(100, services))
        bulk_pods = FakePods(
            groups=groups, per_group=endpoints, first=churn_pods.groups * churn_pods.per_group
        )
        churn = ServicePort(
            name="churn",
            vip=nth_ip(CHURN_BASE, 1),
            port=80,
            endpoints=churn_pods.endpoints(0, 80),
            group=0,
        )
        bulk = filler_services(services, bulk_pods, base=CHURN_BASE + 16, prefix="cp")
        return cls(bulk, bulk_pods, churn, churn_pods)

    @property
    def flipped_ip(self) -> str:
        return self.churn.endpoints[0].ip


def _summary(values_s: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms) if ms else None,
    }


@contextlib.contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy record of process `pid` while the block runs (no-op without a folder or py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not Path(spy).exists():
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # attached before the work starts
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(check: Callable[[], bool], timeout: float, poll: float) -> float | None:
    """perf_counter() when check() first holds, or None after timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(poll)


def ebpflb_control(
    settings: ControlSettings, step: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """In a fresh one-node ebpflb cluster: bulk Apply of settings.services Services x
    settings.endpoints endpoints until all are in the maps, then settings.changes
    readiness flips of one Pod, each timed from its Apply to the map entry's change."""
    from ebpflb.harness import LbCluster

    work = Workload.make(settings.services, settings.endpoints)
    out: dict[str, Any] = {"services": settings.services, "endpoints": settings.endpoints}
    lb = LbCluster(1)
    probe: MapProbe | None = None
    client: RegistryClient | None = None
    try:
        node = lb.cluster.nodes[0]
        agent = lb.agents[node.name]
        assert lb.registry_proc is not None
        registry_pid = lb.registry_proc.pid
        client = RegistryClient(lb.address, timeout=600)
        probe = MapProbe.wait(lb.pin_dir(node))
        step("control plane: pods and the churn Service")
        pods = fake_pod_objects(work.churn_pods, node.name) + fake_pod_objects(
            work.bulk_pods, node.name
        )
        apply_all(client, pods)
        apply_all(client, filler_objects([work.churn], work.churn_pods))
        churn = work.churn
        if (
            _wait(lambda: probe.backend_count(churn.vip, 80) == settings.endpoints, 120, 0.05)
            is None
        ):
            raise RuntimeError("the agent never programmed the churn Service")
        out["agent_before_kib"] = read_status(agent.pid)
        out["registry_before_kib"] = read_status(registry_pid)

        step(f"control plane: one Apply of {settings.services:,} Services")
        objects = filler_objects(work.bulk, work.bulk_pods)
        wanted = MapProbe.keys((s.vip, s.port) for s in work.bulk)
        prof = settings.profile_dir
        with (
            profiled(agent.pid, prof and prof / "agent-bulk.txt"),
            profiled(registry_pid, prof and prof / "registry-bulk.txt"),
        ):
            t0 = time.perf_counter()
            took = apply_all(client, objects)
            t_applied = time.perf_counter()
            t_done = _wait(
                lambda: probe.complete(wanted, settings.endpoints) == len(wanted), 600, BULK_POLL
            )
        out["bulk_applies"] = len(took)
        out["bulk_apply_rpc_s"] = t_applied - t0
        out["bulk_to_maps_s"] = None if t_done is None else t_done - t0
        out["bulk_after_apply_s"] = None if t_done is None else t_done - t_applied

        step(f"control plane: {settings.changes} endpoint changes")
        flips: list[float] = []
        rpcs: list[float] = []
        missed = 0
        ip = work.flipped_ip
        name = work.churn_pods.name(0, 0)
        want = settings.endpoints

        def changed() -> bool:
            assert probe is not None
            return probe.backend_count(churn.vip, 80) == want

        with profiled(agent.pid, prof and prof / "agent-changes.txt"):
            for i in range(settings.changes):
                ready = i % 2 == 1  # not ready, ready, not ready...
                want = settings.endpoints if ready else settings.endpoints - 1
                labels = {CHURN_LABEL: "0"}
                pod = pod_object(name, ip, labels, node.name, [("http", 80)], ready=ready)
                t0 = time.perf_counter()
                client.apply([pod])
                t1 = time.perf_counter()
                seen = _wait(changed, 30, POLL)
                if seen is None:
                    missed += 1
                    continue
                flips.append(seen - t0)
                rpcs.append(t1 - t0)
                time.sleep(0.01)
        out["change"] = _summary(flips)
        out["change_apply_rpc"] = _summary(rpcs)
        out["change_missed"] = missed
        out["change_p99_ms"] = out["change"]["p99_ms"]
        agent_mem = read_status(agent.pid)
        out["agent_kib"] = agent_mem
        out["agent_hwm_kib"] = agent_mem.get("VmHWM")
        out["registry_kib"] = read_status(registry_pid)
        out["frontends_in_maps"] = probe.frontends()
    finally:
        if probe is not None:
            probe.close()
        if client is not None:
            client.close()
        lb.close()
    return out


def netfilter_control(
    flavor: str, settings: ControlSettings, step: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """kube-proxy's iptables mode with the same Services in a fresh namespace: the first
    full iptables-restore, then endpoint flips as full syncs and as partial syncs."""
    tool = {"iptables-legacy": "iptables-legacy-restore", "iptables-nft": "iptables-nft-restore"}[
        flavor
    ]
    work = Workload.make(settings.services, settings.endpoints)
    out: dict[str, Any] = {"services": settings.services, "endpoints": settings.endpoints}
    cluster = Cluster(1, external=False)
    try:
        ns = cluster.ns(cluster.nodes[0])

        def restore(text: str, noflush: bool) -> float | None:
            argv = [tool, "--noflush"] if noflush else [tool]
            t0 = time.perf_counter()
            try:
                done = ns.run(argv, timeout=settings.netfilter_timeout, input=text)
            except subprocess.TimeoutExpired:
                return None
            if done.returncode != 0:
                raise RuntimeError(f"{tool}: {done.stderr.strip()[:500]}")
            return time.perf_counter() - t0

        services = [*work.bulk, work.churn]
        step(f"control plane: {flavor} restore of {settings.services:,} Services")
        text = iptables.ruleset(services)
        out["rules"] = iptables.rule_count(text)
        out["bulk_s"] = restore(text, noflush=False)
        chains = iptables.service_chains(services)
        ip = work.flipped_ip
        for kind, count in (
            ("full", settings.netfilter_full_changes),
            ("partial", settings.netfilter_partial_changes),
        ):
            step(f"control plane: {flavor} {kind} syncs")
            took: list[float] = []
            timed_out = False
            for i in range(count if out["bulk_s"] is not None else 0):
                churn = work.churn.with_ready(ip, ready=i % 2 == 1)
                services[-1] = churn
                changed = None if kind == "full" else {churn.name}
                sync = iptables.sync(services, chains, changed=changed)
                t = restore(sync, noflush=True)
                if t is None:
                    timed_out = True
                    break
                took.append(t)
                chains = iptables.service_chains(services)
            out[f"{kind}_sync"] = {**_summary(took), "timed_out": timed_out}
    finally:
        cluster.close()
    out["timeout_s"] = settings.netfilter_timeout
    return out
