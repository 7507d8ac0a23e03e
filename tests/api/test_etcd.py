"""High availability on etcd: a real 3-member etcd cluster on loopback, several
`ebpflb registry` processes sharing it (--store etcd://...), clients and an agent's
watcher given several registry addresses. Each test prints its figures (run with -s)."""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from ebpflb.agent.watcher import Changes, KindWatcher, Message, Relist, Synced
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient, RegistryError, RegistryUnavailable, Watch
from ebpflb.objects import from_manifest
from ebpflb.registry.core import Reason, Registry
from ebpflb.registry.core import RegistryError as CoreError
from ebpflb.registry.etcd import EtcdStore, parse_etcd_url
from ebpflb.registry.store import StoreError, StoreGap
from tests.api.etcd_cluster import EtcdCluster, etcd_cluster, free_ports
from tests.conftest import EBPFLB, RegistryProcess

pytestmark = pytest.mark.api


def say(line: str) -> None:
    print(f"\n[etcd HA] {line}", flush=True)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One 3-member cluster for the module's tests; each test keeps its keys under
    a prefix of its own."""
    with etcd_cluster() as cluster:
        yield cluster


def fresh_prefix() -> str:
    return f"/ebpflb-test-{uuid.uuid4().hex[:8]}"


@contextmanager
def registries(url: str, tmp_path: Path, n: int) -> Iterator[list[RegistryProcess]]:
    """n registry processes on unix sockets, all on the store url."""
    procs = [
        RegistryProcess(
            address=f"unix://{tmp_path}/r{i}.sock", store=url, args=[], log=tmp_path / f"r{i}.log"
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.kill(signal.SIGTERM)


def service(name: str, node_port: int = 0) -> pb.Object:
    port: dict[str, object] = {"port": 80}
    if node_port:
        port["nodePort"] = node_port
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [port]},
        }
    )


def events(watch: Watch, n: int, timeout: float = 30) -> list[tuple[pb.WatchEvent, float]]:
    """The first n events of watch that are not BOOKMARKs, each with when it came."""
    timer = threading.Timer(timeout, watch.cancel)
    timer.start()
    out = []
    try:
        for ev in watch:
            if ev.type != pb.WatchEvent.BOOKMARK:
                out.append((ev, time.monotonic()))
            if len(out) == n:
                break
    finally:
        timer.cancel()
        watch.cancel()
    assert len(out) == n, f"{len(out)} of {n} events within {timeout}s"
    return out


def eventually(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)


def test_concurrent_applies_allocate_unique_ips_and_node_ports(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """3 registries x 50 Services with dynamic ClusterIPs and nodePorts, plus 5 nodePorts
    each asked for through all 3 registries, applied concurrently: one winner per
    asked port, every ClusterIP and nodePort unique, every registry the same."""
    with registries(etcd.url(fresh_prefix()), tmp_path, 3) as procs:
        clients = [RegistryClient(p.address, timeout=60) for p in procs]
        contested = [30100 + j for j in range(5)]
        jobs = [(i, service(f"s{i}-{k}")) for i in range(3) for k in range(50)]
        jobs += [(i, service(f"want-{p}-r{i}", p)) for p in contested for i in range(3)]
        random.shuffle(jobs)

        def run(job: tuple[int, pb.Object]) -> pb.Object | RegistryError:
            i, obj = job
            try:
                return clients[i].apply([obj]).objects[0]
            except RegistryError as e:
                return e

        start = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(run, jobs))
        took = time.monotonic() - start
        refused = [r for r in results if isinstance(r, RegistryError)]
        assert [e.code for e in refused] == [grpc.StatusCode.ALREADY_EXISTS] * 10, refused[:3]
        assert all("provided port is already allocated" in e.details for e in refused)

        want = 150 + len(contested)
        eventually(lambda: all(len(c.list("Service").items) == want for c in clients))
        views = [c.list("Service") for c in clients]
        assert len({v.resource_version for v in views}) == 1
        assert views[0].items == views[1].items == views[2].items
        specs = [o.service.spec for o in views[0].items]
        ips = [s.cluster_ip for s in specs]
        ports = [p.node_port for s in specs for p in s.ports]
        assert len(set(ips)) == len(ips) == want
        assert len(set(ports)) == len(ports) == want
        for p in contested:
            winners = [
                o.service.metadata.name
                for o in views[0].items
                if o.service.spec.ports[0].node_port == p
            ]
            assert len(winners) == 1 and winners[0].startswith(f"want-{p}-"), winners
        say(
            f"{len(jobs)} concurrent Applies through 3 registries in {took:.2f}s: "
            f"{want} Services stored, {len(refused)} refused (AlreadyExists), "
            f"{len(set(ips))} unique ClusterIPs, {len(set(ports))} unique nodePorts, "
            f"1 winner for each of {len(contested)} contested nodePorts; "
            f"revision {views[0].resource_version} on all 3"
        )
        for c in clients:
            c.close()


def test_watch_on_one_registry_sees_writes_through_another(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    with registries(etcd.url(fresh_prefix()), tmp_path, 2) as (ra, rb):
        a = RegistryClient(ra.address, timeout=30)
        b = RegistryClient(rb.address, timeout=30)
        watch = b.watch(kind="Service")
        got: list[tuple[pb.WatchEvent, float]] = []

        def read() -> None:
            for ev in watch:
                if ev.type != pb.WatchEvent.BOOKMARK:
                    got.append((ev, time.monotonic()))

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)  # the watch is open (its initial list is empty)
        sent = []
        for k in range(20):
            obj = a.apply([service(f"w{k}")]).objects[0]
            sent.append((obj.service.metadata.name, obj.service.metadata.resource_version))
            sent_at = time.monotonic()
            eventually(lambda k=k: len(got) > k, timeout=30)
            got[k] = (got[k][0], got[k][1] - sent_at)
        watch.cancel()
        reader.join()
        assert [(e.object.service.metadata.name, e.resource_version) for e, _ in got] == sent
        assert all(e.type == pb.WatchEvent.ADDED for e, _ in got)
        lags = sorted(max(lag, 0.0) * 1000 for _, lag in got)
        say(
            f"20 Applies through registry A seen in order by a watcher on B: "
            f"lag from A's answer to B's event p50 {lags[10]:.1f} ms, max {lags[-1]:.1f} ms"
        )

        # Resume on B from a revision A handed out: exactly the events after it.
        mid = sent[9][1]
        after = events(b.watch(kind="Service", resource_version=mid), 10)
        assert [e.object.service.metadata.name for e, _ in after] == [
            f"w{k}" for k in range(10, 20)
        ]
        # Even from one A handed out a moment ago, before B's follower saw it.
        for k in range(5):
            rv = a.apply([service(f"late{k}")]).objects[0].service.metadata.resource_version
            first = events(b.watch(kind="Service", resource_version=str(int(rv) - 1)), 1)
            assert first[0][0].object.service.metadata.name == f"late{k}"
        say("watches resumed on B from revisions A handed out: nothing missed, none GONE")
        a.close()
        b.close()


def test_client_and_agent_watcher_fail_over_when_a_registry_dies(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    with registries(etcd.url(fresh_prefix()), tmp_path, 2) as (ra, rb):
        client = RegistryClient(f"{ra.address},{rb.address}", timeout=30)
        client.apply([service("before")])
        assert client.address == ra.address
        out: queue.Queue[Message] = queue.Queue()
        stop = threading.Event()
        watcher = KindWatcher(client, "Service", out, stop)  # the agent's own
        watcher.start()
        try:
            assert isinstance(out.get(timeout=30), Relist)
            listed = out.get(timeout=30)
            assert isinstance(listed, Changes) and len(listed.changes) == 1
            assert isinstance(out.get(timeout=30), Synced)
            ra.kill(signal.SIGKILL)
            killed = time.monotonic()
            client.apply([service("after")])
            apply_failover = time.monotonic() - killed
            assert client.address == rb.address
            msg = out.get(timeout=30)
            watch_failover = time.monotonic() - killed
            # Resumed from its revision on B: the new Service only, no relist.
            assert isinstance(msg, Changes) and len(msg.changes) == 1
            obj = msg.changes[0].obj
            assert obj is not None and obj.service.metadata.name == "after"
            time.sleep(0.5)
            assert out.empty()
        finally:
            stop.set()
            watcher.cancel()
            watcher.join(timeout=10)
        say(
            f"registry A killed (-9): the next Apply answered by B after "
            f"{apply_failover * 1000:.0f} ms; the agent's watcher resumed on B "
            f"(no relist) and had the new Service {watch_failover * 1000:.0f} ms after the kill"
        )
        rb.kill(signal.SIGKILL)
        with pytest.raises(RegistryUnavailable) as down:
            client.list("Service")
        assert down.value.details.startswith(
            f"cannot reach the registry at {ra.address}, {rb.address}: "
        ), down.value.details
        client.close()


def test_applies_keep_succeeding_when_an_etcd_member_dies(tmp_path: Path) -> None:
    """Kill -9 the member the registry talks to first, made the leader: the hard case
    (the other two elect a new leader meanwhile)."""
    with etcd_cluster() as cluster:
        leader = cluster.leader()
        order = [leader] + [i for i in range(3) if i != leader]
        with registries(cluster.url(fresh_prefix(), order), tmp_path, 1) as (proc,):
            client = RegistryClient(proc.address, timeout=60)
            done: list[tuple[float, float]] = []
            failed: list[RegistryError] = []
            stop = threading.Event()

            def write() -> None:
                k = 0
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        client.apply([service(f"d{k}")])
                        done.append((start, time.monotonic()))
                    except RegistryError as e:
                        failed.append(e)
                    k += 1

            writer = threading.Thread(target=write)
            writer.start()
            try:
                eventually(lambda: len(done) >= 10)
                killed = time.monotonic()
                cluster.kill(leader)
                eventually(lambda: sum(1 for s, _ in done if s > killed) >= 10, timeout=45)
            finally:
                stop.set()
                writer.join(timeout=90)
            assert failed == []
            first_after = min(e for s, e in done if s > killed)
            slowest = max((e - s) for s, e in done if e > killed)
            assert len(client.list("Service").items) == len(done)
            say(
                f"etcd leader (the registry's first member) killed (-9): {len(done)} Applies, "
                f"0 failed; the first Apply started after the kill answered "
                f"{(first_after - killed) * 1000:.0f} ms after it, the slowest across the "
                f"kill took {slowest * 1000:.0f} ms"
            )
            client.close()


def test_old_events_are_compacted_in_etcd(etcd: EtcdCluster) -> None:
    """As the SQLite store does: events older than `history` revisions go; a registry
    then starts from the objects, and a watch from before the kept events is GONE."""
    endpoints, prefix = parse_etcd_url(etcd.url(fresh_prefix()))
    registry = Registry(EtcdStore(endpoints, prefix=prefix, history=10), history=10)
    try:
        for k in range(40):
            registry.apply([service(f"c{k}")])
    finally:
        registry.close()
    kept = [int(k.rsplit("/", 1)[1]) for k in etcd.keys(prefix + "/events/")]
    assert max(kept) == 40 and min(kept) >= 40 - 10 - 2, kept
    store = EtcdStore(endpoints, prefix=prefix)
    assert [ev.rev for ev in store.events_after(35)] == [36, 37, 38, 39, 40]
    with pytest.raises(StoreGap, match="after revision 5 are compacted"):
        store.events_after(5)
    again = Registry(store)
    try:
        assert again.revision == 40 and again.object_count == 40
        with pytest.raises(CoreError) as gone:
            next(again.watch(kind="Service", resource_version="5"))
        assert gone.value.reason == Reason.GONE
    finally:
        again.close()
    say(f"history 10: after 40 revisions etcd keeps the events of revisions {min(kept)}-40")


def test_registry_behind_the_compacted_history_reloads(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A registry stopped while the others write past its history starts over from the
    objects: it ends with every object, and its old watch is told to relist."""
    url = etcd.url(fresh_prefix())
    endpoints, prefix = parse_etcd_url(url)
    writer = Registry(EtcdStore(endpoints, prefix=prefix, history=10), history=10)
    try:
        writer.apply([service("first")])
        with registries(url, tmp_path, 1) as (proc,):
            client = RegistryClient(proc.address, timeout=30)
            watch = client.watch(kind="Service", resource_version="1")
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGSTOP)
            try:
                for k in range(40):
                    writer.apply([service(f"g{k}")])
            finally:
                proc.proc.send_signal(signal.SIGCONT)
            with pytest.raises(RegistryError) as gone:
                events(watch, 41)
            assert gone.value.code == grpc.StatusCode.OUT_OF_RANGE, gone.value.details
            eventually(lambda: len(client.list("Service").items) == 41)
            assert client.list("Service").items == writer.list("Service")[0]
            client.close()
        assert "reloading the whole state from the store" in (tmp_path / "r0.log").read_text()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("etcd://", "names no etcd member"),
        ("etcd://localhost", "'localhost' is not HOST:PORT"),
        ("etcd://127.0.0.1:2379,127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT"),
        ("etcd://127.0.0.1:2379?x=1", "no query or fragment"),
    ],
)
def test_bad_etcd_url_is_a_clear_error(url: str, says: str, tmp_path: Path) -> None:
    cmd = [*EBPFLB, "registry", "--listen", f"unix://{tmp_path}/r.sock", "--store", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error: store URL") and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.sock").exists()


def test_unreachable_etcd_is_a_clear_error() -> None:
    (port,) = free_ports(1)
    store = EtcdStore([("127.0.0.1", port)], patience=1)
    with pytest.raises(
        StoreError, match=rf"etcd: no member answered within 1s \(127.0.0.1:{port}: "
    ):
        store.load()
