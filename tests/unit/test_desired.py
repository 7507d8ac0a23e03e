"""The agent's desired state: Services + EndpointSlices -> frontends, without a kernel."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpflb.agent.desired import DesiredState, SliceRecord, service_frontends
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.datapath.fake import fake_maps
from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from ebpflb.objects import from_manifest, key_of

pytestmark = pytest.mark.unit

VIP = "10.96.0.20"


def svc(ports: list[dict[str, Any]] | None = None, **spec: Any) -> pb.Object:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": VIP,
                "selector": {"app": "web"},
                "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP"}],
                **spec,
            },
        }
    )


def ep(ip: str, node: str = "n1", **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": conditions}


def es(name: str, endpoints: list[dict[str, Any]], ports: list[tuple[str, str, int]]) -> pb.Object:
    return from_manifest(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
        }
    )


HTTP = [("http", "TCP", 8080)]


def frontends(
    service: pb.Object, *slices: pb.Object, node: str = "n1", node_ips: tuple[str, ...] = ()
) -> list[Frontend]:
    return service_frontends(service.service, [s.endpoint_slice for s in slices], node, node_ips)


def backends(fs: list[Frontend]) -> list[set[tuple[str, int]]]:
    return [{(b.ip, b.port) for b in f.backends} for f in fs]


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ([ep("10.0.0.1"), ep("10.0.0.2")], {("10.0.0.1", 8080), ("10.0.0.2", 8080)}),
        ([ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=False)], {("10.0.0.1", 8080)}),
        # No ready endpoint: the serving, terminating ones take over.
        (
            [
                ep("10.0.0.1", ready=False, serving=True, terminating=True),
                ep("10.0.0.2", ready=False),
            ],
            {("10.0.0.1", 8080)},
        ),
        # A ready one exists: terminating ones get no new flows.
        (
            [ep("10.0.0.1", ready=False, serving=True, terminating=True), ep("10.0.0.2")],
            {("10.0.0.2", 8080)},
        ),
        ([ep("10.0.0.1", ready=False, serving=False, terminating=True)], set()),
        ([], set()),
    ],
    ids=["ready", "not-ready-skipped", "terminating-fallback", "ready-wins", "not-serving", "none"],
)
def test_backends_from_conditions(
    endpoints: list[dict[str, Any]], expected: set[tuple[str, int]]
) -> None:
    assert backends(frontends(svc(), es("web-1", endpoints, HTTP))) == [expected]


def test_endpoints_the_datapath_cannot_hold_are_left_out() -> None:
    """Not IPv4, or no port: left out of the record (made in the watcher's thread,
    which must not die of them); the other endpoints stay."""
    endpoints = [ep("fd00::1"), ep("10.0.0.1")]
    assert backends(frontends(svc(), es("web-1", endpoints, HTTP))) == [{("10.0.0.1", 8080)}]
    assert backends(frontends(svc(), es("web-1", endpoints, [("http", "TCP", 0)]))) == [set()]


def test_ports_match_by_name_and_protocol_and_slices_add_up() -> None:
    service = svc(
        [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
    )
    a = es("web-a", [ep("10.0.0.1")], [("dns", "UDP", 5353), ("dns-tcp", "TCP", 5353)])
    b = es("web-b", [ep("10.0.0.2")], [("dns", "UDP", 5354)])  # named port differs per pod
    fs = frontends(service, a, b)
    assert [(f.vip, f.port, f.protocol) for f in fs] == [(VIP, 53, "UDP"), (VIP, 53, "TCP")]
    assert backends(fs) == [{("10.0.0.1", 5353), ("10.0.0.2", 5354)}, {("10.0.0.1", 5353)}]


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints() -> None:
    s = es("web-1", [ep("10.0.0.1", node="n1"), ep("10.0.0.2", node="n2")], HTTP)
    assert backends(frontends(svc(internalTrafficPolicy="Local"), s, node="n1")) == [
        {("10.0.0.1", 8080)}
    ]
    assert backends(frontends(svc(internalTrafficPolicy="Local"), s, node="n3")) == [set()]
    assert len(backends(frontends(svc(), s, node="n3"))[0]) == 2


@pytest.mark.parametrize(
    ("spec", "timeout"),
    [
        ({}, 0),
        ({"sessionAffinity": "ClientIP"}, 10800),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            },
            60,
        ),
    ],
)
def test_affinity_timeout(spec: dict[str, Any], timeout: int) -> None:
    (f,) = frontends(svc(**spec))
    assert f.affinity_timeout == timeout


@pytest.mark.parametrize("cluster_ip", ["None", ""])
def test_headless_or_unallocated_services_have_no_frontend(cluster_ip: str) -> None:
    assert frontends(svc(clusterIP=cluster_ip)) == []


def test_desired_state_recomputes_only_what_changed_and_relists() -> None:
    state = DesiredState("n1")
    service = svc()
    slice_ = es("web-1", [ep("10.0.0.1")], HTTP)
    state.update(key_of(service), service)
    state.update(key_of(slice_), slice_)
    assert state.dirty
    assert state.frontends() == [Frontend(VIP, 80, "TCP", (Backend("10.0.0.1", 8080, local=True),))]
    assert not state.dirty
    # A slice change marks its service; deleting the slice empties the frontend.
    state.update(key_of(slice_), None)
    assert state.dirty
    assert state.frontends() == [Frontend(VIP, 80, "TCP", ())]
    # A relist of Services forgets them until they are listed again.
    state.reset("Service")
    assert state.frontends() == []
    state.update(key_of(service), service)
    assert state.frontends() == [Frontend(VIP, 80, "TCP", ())]


NODE_IPS = ("192.168.50.10", "192.168.50.11")


def nodeport(**spec: Any) -> pb.Object:
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
    return svc(ports, type="NodePort", **spec)


def test_node_port_frontends_on_every_node_address_with_local_flags() -> None:
    s = es("web-1", [ep("10.0.0.1", node="n1"), ep("10.0.0.2", node="n2")], HTTP)
    fs = frontends(nodeport(externalTrafficPolicy="Cluster"), s, node_ips=NODE_IPS)
    assert [(f.vip, f.port, f.nodeport) for f in fs] == [
        (VIP, 80, False),
        ("192.168.50.10", 30080, True),
        ("192.168.50.11", 30080, True),
    ]
    assert {(b.ip, b.local) for b in fs[1].backends} == {("10.0.0.1", True), ("10.0.0.2", False)}


def test_external_traffic_policy_local_keeps_only_this_nodes_endpoints() -> None:
    s = es(
        "web-1",
        [
            ep("10.0.0.1", node="n2"),
            ep("10.0.0.3", node="n1", ready=False, serving=True, terminating=True),
        ],
        HTTP,
    )
    fs = frontends(nodeport(externalTrafficPolicy="Local"), s, node_ips=NODE_IPS[:1])
    cluster_ip, node_port = fs
    # ClusterIP: cluster-wide, the ready one wins. NodePort: local only, so the local
    # terminating endpoint is the fallback; on a node with neither, nothing (refused).
    assert backends([cluster_ip]) == [{("10.0.0.1", 8080)}]
    assert backends([node_port]) == [{("10.0.0.3", 8080)}]
    other = frontends(nodeport(externalTrafficPolicy="Local"), s, node="n3", node_ips=NODE_IPS[:1])
    assert backends(other[1:]) == [set()]


def named(obj: pb.Object, name: str, service: str) -> pb.Object:
    """obj renamed (a slice: relabelled to belong to service)."""
    out = pb.Object()
    out.CopyFrom(obj)
    meta = out.endpoint_slice.metadata if out.HasField("endpoint_slice") else out.service.metadata
    meta.name = name
    if out.HasField("endpoint_slice"):
        meta.labels["kubernetes.io/service-name"] = service
    return out


def test_slices_of_the_same_pods_share_one_worked_out_content() -> None:
    """Services selecting the same Pods have slices that differ in name alone: their
    records share ports and backends; any other difference is another content."""
    a = es("web-1", [ep("10.0.0.1"), ep("10.0.0.2", ready=False)], HTTP)
    b = named(a, "other-1", "other")
    ra, rb = SliceRecord.of(a.endpoint_slice, "n1"), SliceRecord.of(b.endpoint_slice, "n1")
    assert (ra.service, rb.service) == ("web", "other")
    assert ra.ports is rb.ports and ra.local_ready == rb.local_ready == ("10.0.0.1",)
    ready = es("web-1", [ep("10.0.0.1"), ep("10.0.0.2", ready=True)], HTTP)
    assert len(SliceRecord.of(ready.endpoint_slice, "n1").ports[0].ready) == 2
    other_port = es("web-1", [ep("10.0.0.1"), ep("10.0.0.2", ready=False)], [("http", "TCP", 81)])
    assert SliceRecord.of(other_port.endpoint_slice, "n1").ports[0].ready[0].port == 81
    elsewhere = SliceRecord.of(a.endpoint_slice, "n2")
    assert elsewhere.local_ready == () and not elsewhere.ports[0].ready[0].local


SERVICES = ("web-0", "web-1", "web-2")
event_st = st.one_of(
    st.tuples(
        st.just("Service"),
        st.sampled_from(SERVICES),
        st.none() | st.sampled_from((80, 81)),  # deleted, or its port
    ),
    st.tuples(
        st.just("EndpointSlice"),
        st.sampled_from(SERVICES),
        st.none() | st.lists(st.sampled_from(("10.0.0.1", "10.0.0.2", "10.0.0.3")), max_size=3),
    ),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(event_st, min_size=1, max_size=4), min_size=1, max_size=8))
def test_changes_applied_as_updates_give_the_maps_of_a_full_sync(
    bursts: list[list[tuple[str, str, Any]]],
) -> None:
    """The agent's incremental path: after each burst of events, changes() into
    Programmer.update(); the maps then hold what a full sync of the same state writes."""
    state = DesiredState("n1")
    maps = fake_maps()
    programmer = Programmer(maps)
    programmer.sync(state.by_service(), full=True)
    for burst in bursts:
        for kind, name, what in burst:
            vip = f"10.96.0.{30 + SERVICES.index(name)}"
            if kind == "Service":
                obj = (
                    None
                    if what is None
                    else named(
                        svc(
                            clusterIP=vip, ports=[{"name": "http", "port": what, "protocol": "TCP"}]
                        ),
                        name,
                        name,
                    )
                )
                key = key_of(named(svc(), name, name))
            else:
                endpoints = [ep(ip) for ip in what or []]
                obj = None if what is None else named(es("s", endpoints, HTTP), f"{name}-a", name)
                key = key_of(named(es("s", [], HTTP), f"{name}-a", name))
            state.update(key, obj)
        programmer.update(state.changes())
        wanted = sorted(
            (f for fs in state.by_service().values() for f in fs), key=Frontend.sort_key
        )
        assert programmer.dump() == wanted
    assert state.changes() == {}
    again = Programmer(maps).sync(state.by_service(), full=True)
    assert (again.written, again.deleted) == (0, 0)
