"""The registry through a real gRPC server on a unix socket, with a real SQLite store."""

from __future__ import annotations

import ipaddress
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ebpflb.agent.watcher import Changes, KindWatcher, Message, Relist, Synced
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.api.v1 import registry_pb2_grpc as pb_grpc
from ebpflb.client import RegistryClient
from ebpflb.objects import from_manifest, load_documents
from ebpflb.registry.core import Registry
from ebpflb.registry.server import make_server
from ebpflb.registry.store import SqliteStore
from tests.conftest import RegistryProcess, manifests_dir

pytestmark = pytest.mark.api


@pytest.fixture
def stub(registry_addr: str) -> Iterator[pb_grpc.RegistryStub]:
    with grpc.insecure_channel(registry_addr) as ch:
        yield pb_grpc.RegistryStub(ch)


def svc(name: str, **spec: object) -> pb.Object:
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80}], **spec},
    }
    return from_manifest(doc)


def pod(
    name: str,
    ip: str,
    labels: dict[str, str],
    ports: list[dict[str, object]] | None = None,
    node: str = "node0",
    ready: bool | None = None,
) -> pb.Object:
    doc: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "nginx", "ports": ports or []}],
        },
        "status": {"phase": "Running", "podIP": ip},
    }
    if ready is not None:
        doc["status"]["conditions"] = [{"type": "Ready", "status": str(ready)}]  # type: ignore[index]
    return from_manifest(doc)


def apply(stub: pb_grpc.RegistryStub, *objs: pb.Object) -> pb.ApplyResponse:
    resp: pb.ApplyResponse = stub.Apply(pb.ApplyRequest(objects=list(objs)), timeout=30)
    return resp


def services(stub: pb_grpc.RegistryStub) -> dict[str, pb.Service]:
    items = stub.List(pb.ListRequest(kind="Service"), timeout=10).items
    return {o.service.metadata.name: o.service for o in items}


def slices(stub: pb_grpc.RegistryStub, service: str) -> list[pb.EndpointSlice]:
    sel = f"kubernetes.io/service-name={service}"
    items = stub.List(pb.ListRequest(kind="EndpointSlice", label_selector=sel), timeout=10).items
    return [o.endpoint_slice for o in items]


def endpoints(stub: pb_grpc.RegistryStub, service: str) -> set[tuple[str, int, bool]]:
    """(ip, port, ready) for every endpoint of every port of the service."""
    return {
        (ep.addresses[0], p.port, ep.conditions.ready)
        for es in slices(stub, service)
        for ep in es.endpoints
        for p in es.ports
    }


def manifest_objects() -> list[pb.Object]:
    out = []
    for f in sorted(manifests_dir().glob("*.yaml")):
        out += [from_manifest(d) for d in load_documents(f.read_text())]
    return out


# ------------------------------------------------------------------ basics


def test_users_manifests_apply_as_they_are(stub: pb_grpc.RegistryStub) -> None:
    resp = apply(stub, *manifest_objects())
    assert set(resp.results) == {"created"}
    svcs = services(stub)
    assert set(svcs) == {"my-service", "nginx-service", "web-nodeport", "dns"}
    cidr = ipaddress.ip_network("10.96.0.0/12")
    for s in svcs.values():
        assert ipaddress.ip_address(s.spec.cluster_ip) in cidr
        assert list(s.spec.cluster_ips) == [s.spec.cluster_ip]
    assert svcs["dns"].spec.cluster_ip == "10.96.0.10"
    assert svcs["web-nodeport"].spec.ports[0].node_port == 30080
    assert len({s.spec.cluster_ip for s in svcs.values()}) == 4
    # Applying the same again changes nothing and writes nothing.
    rev = stub.List(pb.ListRequest(), timeout=10).resource_version
    again = apply(stub, *manifest_objects())
    assert set(again.results) == {"unchanged"}
    assert stub.List(pb.ListRequest(), timeout=10).resource_version == rev


def test_get_delete_and_not_found(stub: pb_grpc.RegistryStub) -> None:
    apply(stub, svc("a"))
    key = pb.ObjectKey(kind="Service", name="a")
    got = stub.Get(pb.GetRequest(key=key), timeout=5)
    assert got.service.metadata.namespace == "default"
    assert got.service.metadata.uid and got.service.metadata.creation_timestamp.seconds > 0
    stub.Delete(pb.DeleteRequest(key=key), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Get(pb.GetRequest(key=key), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == 'services "a" not found'
    with pytest.raises(grpc.RpcError) as e:
        stub.Delete(pb.DeleteRequest(key=key), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_by_namespace_and_label_selector(stub: pb_grpc.RegistryStub) -> None:
    a = svc("a")
    a.service.metadata.labels["tier"] = "web"
    b = svc("b")
    b.service.metadata.namespace = "other"
    b.service.metadata.labels["tier"] = "db"
    apply(stub, a, b, svc("c"))
    names = lambda r: [o.service.metadata.name for o in stub.List(r, timeout=5).items]  # noqa: E731
    assert names(pb.ListRequest(kind="Service")) == ["a", "c", "b"]  # by namespace, then name
    assert names(pb.ListRequest(kind="Service", namespace="other")) == ["b"]
    assert names(pb.ListRequest(kind="Service", label_selector="tier")) == ["a", "b"]
    assert names(pb.ListRequest(kind="Service", label_selector="tier in (db),tier!=web")) == ["b"]
    with pytest.raises(grpc.RpcError) as e:
        stub.List(pb.ListRequest(kind="Service", label_selector="a in b"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(registry_addr: str) -> None:
    with grpc.insecure_channel(registry_addr) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for service in ("", "ebpflb.v1.Registry"):
            status = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        listed = {s.name for s in resp.list_services_response.service}
        assert "ebpflb.v1.Registry" in listed and "grpc.health.v1.Health" in listed


# ------------------------------------------------------------------ validation and allocation


@pytest.mark.parametrize(
    ("obj", "code", "detail"),
    [
        (
            svc("p0", ports=[{"port": 0}]),
            "INVALID_ARGUMENT",
            'Service "p0" is invalid: [spec.ports[0].port: Invalid value: 0: '
            "must be between 1 and 65535",
        ),
        (
            svc("outside", clusterIP="10.0.0.1"),
            "INVALID_ARGUMENT",
            'spec.clusterIP: Invalid value: "10.0.0.1": provided IP is not in the valid range',
        ),
        (
            svc("np", type="NodePort", ports=[{"port": 80, "nodePort": 80}]),
            "INVALID_ARGUMENT",
            "spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range",
        ),
        (svc("Bad_Name"), "INVALID_ARGUMENT", "metadata.name: Invalid value"),
    ],
    ids=["port-0", "clusterip-outside-range", "nodeport-outside-range", "bad-name"],
)
def test_invalid_objects_are_refused_and_change_nothing(
    stub: pb_grpc.RegistryStub, obj: pb.Object, code: str, detail: str
) -> None:
    apply(stub, svc("keep"))
    before = stub.List(pb.ListRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        apply(stub, obj)
    assert e.value.code().name == code
    assert detail in e.value.details()
    after = stub.List(pb.ListRequest(), timeout=5)
    assert after == before


def test_taken_cluster_ip_and_node_port(stub: pb_grpc.RegistryStub) -> None:
    apply(
        stub,
        svc(
            "one", clusterIP="10.96.0.10", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]
        ),
    )
    for obj, needle in [
        (
            svc("two", clusterIP="10.96.0.10"),
            'spec.clusterIP: Invalid value: "10.96.0.10": provided IP is already allocated',
        ),
        (
            svc("three", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
            "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            apply(stub, obj)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert needle in e.value.details()
    assert set(services(stub)) == {"one"}
    # Freed on delete: both can be had again.
    stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="one")), timeout=5)
    apply(
        stub,
        svc(
            "two", clusterIP="10.96.0.10", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]
        ),
    )


def test_cluster_ip_is_immutable_and_kept_on_update(stub: pb_grpc.RegistryStub) -> None:
    first = apply(stub, svc("a", type="NodePort")).objects[0].service
    ip, node_port = first.spec.cluster_ip, first.spec.ports[0].node_port
    # Re-applying the manifest without them keeps what was allocated.
    again = apply(stub, svc("a", type="NodePort", selector={"app": "other"}))
    assert again.results == ["configured"]
    assert again.objects[0].service.spec.cluster_ip == ip
    assert again.objects[0].service.spec.ports[0].node_port == node_port
    other = str(ipaddress.ip_address(ip) + 1)
    with pytest.raises(grpc.RpcError) as e:
        apply(stub, svc("a", type="NodePort", clusterIP=other))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.clusterIP" in e.value.details() and "immutable" in e.value.details()


def test_a_batch_with_one_bad_object_applies_none(stub: pb_grpc.RegistryStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        apply(
            stub,
            svc("good1"),
            pod("p", "10.244.0.5", {"app": "good1"}),
            svc("bad", ports=[{"port": 70000}]),
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.List(pb.ListRequest(), timeout=5).items == []
    assert stub.List(pb.ListRequest(), timeout=5).resource_version == "0"


def test_concurrent_applies_of_one_node_port_exactly_one_wins(stub: pb_grpc.RegistryStub) -> None:
    results: list[str] = []
    barrier = threading.Barrier(12)

    def one(i: int) -> None:
        barrier.wait()
        try:
            apply(stub, svc(f"s{i}", type="NodePort", ports=[{"port": 80, "nodePort": 31000}]))
            results.append("ok")
        except grpc.RpcError as e:
            results.append(e.code().name)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ALREADY_EXISTS"] * 11 + ["ok"]
    assert len(services(stub)) == 1


def test_concurrent_allocations_are_unique(stub: pb_grpc.RegistryStub) -> None:
    def batch(i: int) -> None:
        for j in range(10):
            apply(stub, svc(f"s{i}-{j}", type="NodePort"))

    threads = [threading.Thread(target=batch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svcs = services(stub)
    assert len(svcs) == 80
    assert len({s.spec.cluster_ip for s in svcs.values()}) == 80
    node_ports = [s.spec.ports[0].node_port for s in svcs.values()]
    assert len(set(node_ports)) == 80 and all(30000 <= p <= 32767 for p in node_ports)


# ------------------------------------------------------------------ endpoints


def test_endpoints_follow_pods_with_named_ports(stub: pb_grpc.RegistryStub) -> None:
    apply(stub, *manifest_objects())
    # The manifest's Pod has no IP: not an endpoint.
    assert endpoints(stub, "nginx-service") == set()
    named = [{"name": "http-web-svc", "containerPort": 80}]
    apply(stub, pod("nginx", "10.244.0.5", {"app.kubernetes.io/name": "proxy"}, named))
    assert endpoints(stub, "nginx-service") == {("10.244.0.5", 80, True)}
    assert endpoints(stub, "web-nodeport") == {("10.244.0.5", 80, True)}
    # The same name on another port number in another pod: its own slice.
    apply(
        stub,
        pod(
            "nginx2",
            "10.244.0.6",
            {"app.kubernetes.io/name": "proxy"},
            [{"name": "http-web-svc", "containerPort": 8080}],
        ),
    )
    assert endpoints(stub, "nginx-service") == {
        ("10.244.0.5", 80, True),
        ("10.244.0.6", 8080, True),
    }
    assert len(slices(stub, "nginx-service")) == 2
    # A pod without that port name is not an endpoint for that port.
    apply(
        stub,
        pod(
            "other",
            "10.244.0.7",
            {"app.kubernetes.io/name": "proxy"},
            [{"name": "metrics", "containerPort": 9}],
        ),
    )
    assert len(endpoints(stub, "nginx-service")) == 2
    # Not ready: listed, not ready. Labels changed: gone. Deleted: gone.
    apply(
        stub,
        pod(
            "nginx2",
            "10.244.0.6",
            {"app.kubernetes.io/name": "proxy"},
            [{"name": "http-web-svc", "containerPort": 8080}],
            ready=False,
        ),
    )
    assert ("10.244.0.6", 8080, False) in endpoints(stub, "nginx-service")
    apply(stub, pod("nginx2", "10.244.0.6", {"app.kubernetes.io/name": "else"}))
    assert endpoints(stub, "nginx-service") == {("10.244.0.5", 80, True)}
    stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Pod", name="nginx")), timeout=5)
    assert endpoints(stub, "nginx-service") == set()
    assert slices(stub, "nginx-service") == []
    # Deleting the Service removes its slices.
    apply(stub, pod("nginx", "10.244.0.5", {"app.kubernetes.io/name": "proxy"}, named))
    stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="web-nodeport")), timeout=5)
    assert slices(stub, "web-nodeport") == []


def test_slice_shape(stub: pb_grpc.RegistryStub) -> None:
    apply(
        stub,
        svc(
            "web",
            ports=[
                {"port": 80, "targetPort": 8080, "name": "http"},
                {"port": 53, "protocol": "UDP", "name": "dns"},
            ],
        ),
        pod("w1", "10.244.1.3", {"app": "web"}, node="node1"),
    )
    (es,) = slices(stub, "web")
    assert es.address_type == "IPv4"
    assert es.metadata.labels["kubernetes.io/service-name"] == "web"
    assert [(p.name, p.protocol, p.port) for p in es.ports] == [
        ("http", "TCP", 8080),
        ("dns", "UDP", 53),
    ]
    (ep,) = es.endpoints
    assert list(ep.addresses) == ["10.244.1.3"] and ep.node_name == "node1"
    assert (ep.conditions.ready, ep.conditions.serving, ep.conditions.terminating) == (
        True,
        True,
        False,
    )
    assert ep.target_ref.kind == "Pod" and ep.target_ref.name == "w1"


def test_graceful_pod_delete_leaves_a_terminating_endpoint(stub: pb_grpc.RegistryStub) -> None:
    apply(stub, svc("web"), pod("w1", "10.244.0.3", {"app": "web"}))
    stub.Delete(
        pb.DeleteRequest(key=pb.ObjectKey(kind="Pod", name="w1"), grace_period_seconds=1), timeout=5
    )
    (es,) = slices(stub, "web")
    c = es.endpoints[0].conditions
    assert (c.ready, c.serving, c.terminating) == (False, True, True)
    got = stub.Get(pb.GetRequest(key=pb.ObjectKey(kind="Pod", name="w1")), timeout=5)
    assert got.pod.metadata.HasField("deletion_timestamp")
    # Gone once the grace period is over.
    events = stub.Watch(
        pb.WatchRequest(kind="Pod", resource_version=got.pod.metadata.resource_version), timeout=10
    )
    ev = next(e for e in events if e.type != pb.WatchEvent.BOOKMARK)
    assert ev.type == pb.WatchEvent.DELETED and ev.object.pod.metadata.name == "w1"
    events.cancel()
    assert slices(stub, "web") == []


# ------------------------------------------------------------------ watch


def _events(stub: pb_grpc.RegistryStub, rv: str, count: int, **kw: str) -> list[pb.WatchEvent]:
    stream = stub.Watch(pb.WatchRequest(resource_version=rv, **kw), timeout=30)
    out = []
    for ev in stream:
        if ev.type == pb.WatchEvent.BOOKMARK:
            continue
        out.append(ev)
        if len(out) == count:
            break
    stream.cancel()
    return out


def test_watch_lists_then_streams_in_order(stub: pb_grpc.RegistryStub) -> None:
    apply(stub, svc("a"), svc("b"))
    stream = stub.Watch(pb.WatchRequest(kind="Service"), timeout=30)
    first = [next(stream) for _ in range(3)]
    assert [e.type for e in first] == [
        pb.WatchEvent.ADDED,
        pb.WatchEvent.ADDED,
        pb.WatchEvent.BOOKMARK,
    ]
    assert {e.object.service.metadata.name for e in first[:2]} == {"a", "b"}
    apply(stub, svc("c"))
    apply(stub, svc("a", selector={"app": "x"}))
    stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="b")), timeout=5)
    seen = []
    for ev in stream:
        if ev.type != pb.WatchEvent.BOOKMARK:
            seen.append((ev.type, ev.object.service.metadata.name, int(ev.resource_version)))
        if len(seen) == 3:
            break
    stream.cancel()
    assert [(t, n) for t, n, _ in seen] == [
        (pb.WatchEvent.ADDED, "c"),
        (pb.WatchEvent.MODIFIED, "a"),
        (pb.WatchEvent.DELETED, "b"),
    ]
    revs = [r for _, _, r in seen]
    assert revs == sorted(revs) and int(first[2].resource_version) < revs[0]


def test_a_watcher_away_for_100_changes_resumes_and_sees_all_in_order(
    stub: pb_grpc.RegistryStub,
) -> None:
    rv = stub.List(pb.ListRequest(), timeout=5).resource_version
    # Connect, see one change, disconnect.
    apply(stub, svc("first"))
    got = _events(stub, rv, 1, kind="Service")
    last = got[-1].resource_version
    # 100 changes while away: creates, updates and deletes.
    expected = []
    for i in range(100):
        if i % 3 == 2:
            stub.Delete(
                pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name=f"s{i - 2}")), timeout=5
            )
            expected.append((pb.WatchEvent.DELETED, f"s{i - 2}"))
        elif i % 3 == 1:
            apply(stub, svc(f"s{i - 1}", selector={"app": f"v{i}"}))
            expected.append((pb.WatchEvent.MODIFIED, f"s{i - 1}"))
        else:
            apply(stub, svc(f"s{i}"))
            expected.append((pb.WatchEvent.ADDED, f"s{i}"))
    resumed = _events(stub, last, 100, kind="Service")
    assert [(e.type, e.object.service.metadata.name) for e in resumed] == expected
    revs = [int(e.resource_version) for e in resumed]
    assert revs == sorted(set(revs)) and revs[0] > int(last)


def test_a_burst_comes_batched_to_a_client_that_takes_batches(
    stub: pb_grpc.RegistryStub, registry_addr: str
) -> None:
    """One Apply of 50 Services: a plain watcher gets 50 messages, one that sets
    allow_batches gets fewer, BATCH ones; the RegistryClient flattens them back into
    the same 50 events in the same order."""
    rv = stub.List(pb.ListRequest(), timeout=5).resource_version
    apply(stub, *(svc(f"burst{i}") for i in range(50)))
    plain = _events(stub, rv, 50, kind="Service")
    batched = stub.Watch(
        pb.WatchRequest(kind="Service", resource_version=rv, allow_batches=True), timeout=30
    )
    first = next(batched)
    batched.cancel()
    assert first.type == pb.WatchEvent.BATCH and not first.HasField("object")
    assert len(first.batch) == 50
    assert [e.SerializeToString() for e in first.batch] == [e.SerializeToString() for e in plain]
    # The registry writes WatchEvents by hand around each object's stored bytes: they
    # are what protobuf itself makes of the stored objects.
    stored = stub.List(pb.ListRequest(kind="Service"), timeout=5).items
    by_name = {o.service.metadata.name: o for o in stored}
    for e in plain:
        o = by_name[e.object.service.metadata.name]
        version = o.service.metadata.resource_version
        assert e == pb.WatchEvent(type=pb.WatchEvent.ADDED, object=o, resource_version=version)
    with RegistryClient(registry_addr) as client:
        watch = client.watch(kind="Service", resource_version=rv)
        flat = [ev for ev, _ in zip(watch, range(50), strict=False)]
        watch.cancel()
    assert [e.SerializeToString() for e in flat] == [e.SerializeToString() for e in plain]


def test_the_agents_watcher_queues_a_burst_as_few_messages(
    stub: pb_grpc.RegistryStub, registry_addr: str
) -> None:
    """The agent's KindWatcher queues the changes of one watch message together: the
    listing as one Changes before Synced, a 50-Service Apply as one more, in order; it
    resumes after the last change it queued."""
    apply(stub, *(svc(f"listed{i}") for i in range(3)))
    out: queue.Queue[Message] = queue.Queue()
    stop = threading.Event()
    with RegistryClient(registry_addr) as client:
        watcher = KindWatcher(client, "Service", out, stop)
        watcher.start()
        try:
            assert out.get(timeout=10) == Relist("Service")
            listed = out.get(timeout=10)
            assert out.get(timeout=10) == Synced("Service")
            burst = apply(stub, *(svc(f"burst{i}") for i in range(50))).objects
            got = out.get(timeout=10)
        finally:
            stop.set()
            watcher.cancel()
            watcher.join(timeout=10)
    assert isinstance(listed, Changes)
    assert [c.key.name for c in listed.changes] == [f"listed{i}" for i in range(3)]
    assert isinstance(got, Changes) and out.empty()
    assert [c.obj.service.metadata.name for c in got.changes] == [f"burst{i}" for i in range(50)]
    assert watcher.revision == burst[-1].service.metadata.resource_version


def test_watch_resumes_across_a_registry_restart(registry_process: RegistryProcess) -> None:
    with grpc.insecure_channel(registry_process.address) as ch:
        stub = pb_grpc.RegistryStub(ch)
        rv = apply(stub, svc("a")).objects[0].service.metadata.resource_version
        apply(stub, svc("b"))
    registry_process.restart()
    with grpc.insecure_channel(registry_process.address) as ch:
        stub = pb_grpc.RegistryStub(ch)
        apply(stub, svc("c"))
        names = [e.object.service.metadata.name for e in _events(stub, rv, 2, kind="Service")]
        assert names == ["b", "c"]


def test_too_old_resource_version_is_a_clear_error(tmp_path: Path) -> None:
    registry = Registry(SqliteStore(str(tmp_path / "r.db")), history=10)
    server, _ = make_server(registry, f"unix://{tmp_path}/r.sock")
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{tmp_path}/r.sock") as ch:
            stub = pb_grpc.RegistryStub(ch)
            for i in range(30):
                apply(stub, svc(f"s{i}"))
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Watch(pb.WatchRequest(resource_version="1"), timeout=10))
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert (
                "too old resource version: 1" in e.value.details() and "relist" in e.value.details()
            )
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Watch(pb.WatchRequest(resource_version="999"), timeout=10))
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    finally:
        registry.close()
        server.stop(0).wait()


# ------------------------------------------------------------------ durability


def test_acknowledged_writes_survive_kill_9(registry_process: RegistryProcess) -> None:
    applied: dict[str, str] = {}
    for round_ in range(5):
        with grpc.insecure_channel(registry_process.address) as ch:
            stub = pb_grpc.RegistryStub(ch)
            s = apply(stub, svc(f"r{round_}")).objects[0].service
            applied[s.metadata.name] = s.spec.cluster_ip
        registry_process.restart()  # SIGKILL right after Apply returned
        with grpc.insecure_channel(registry_process.address) as ch:
            stub = pb_grpc.RegistryStub(ch)
            have = {n: s.spec.cluster_ip for n, s in services(stub).items()}
            assert have == applied
