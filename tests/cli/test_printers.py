"""The printers against golden files: fixed objects, a fixed `now`, exact text."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ebpflb import printers
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import KINDS, from_manifest, kind_of, message_of

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def check_golden(name: str, text: str) -> None:
    """text must equal golden/NAME; EBPFLB_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("EBPFLB_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def obj(
    kind: str, name: str, created: str | None, namespace: str = "default", **rest: Any
) -> pb.Object:
    meta: dict[str, Any] = {"name": name, **rest.pop("metadata", {})}
    if KINDS[kind].namespaced:
        meta["namespace"] = namespace
    if created is not None:
        meta["creationTimestamp"] = created
    doc = {"apiVersion": KINDS[kind].api_version, "kind": kind, "metadata": meta, **rest}
    return from_manifest(doc)


# ------------------------------------------------------------------ fixtures

SERVICES = [
    obj(
        "Service",
        "dns",
        ago(days=2),
        spec={
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "selector": {"k8s-app": "dns"},
            "ports": [
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353},
                {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 5353},
            ],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
    ),
    obj(
        "Service",
        "external-db",
        None,  # no creation time: AGE <unknown>
        spec={"clusterIP": "10.100.7.1", "ports": [{"port": 5432}]},
    ),
    obj(
        "Service",
        "my-service",
        ago(seconds=5),
        spec={
            "clusterIP": "10.96.12.34",
            "selector": {"app.kubernetes.io/name": "MyApp"},
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}],
        },
    ),
    obj(
        "Service",
        "web-nodeport",
        ago(minutes=3, seconds=12),
        metadata={
            "labels": {"app": "web", "team": "edge"},
            "annotations": {"owner": "edge@example.com"},
        },
        spec={
            "type": "NodePort",
            "clusterIP": "10.101.66.25",
            "clusterIPs": ["10.101.66.25"],
            "selector": {"tier": "frontend", "app": "web"},
            "ports": [
                {
                    "name": "http",
                    "protocol": "TCP",
                    "port": 80,
                    "targetPort": "http-web-svc",
                    "nodePort": 30080,
                },
                {
                    "name": "https",
                    "protocol": "TCP",
                    "port": 443,
                    "targetPort": 8443,
                    "nodePort": 30443,
                },
            ],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Cluster",
            "healthCheckNodePort": 31234,
        },
    ),
]
HEADLESS = obj(
    "Service",
    "postgres",
    ago(days=400),
    namespace="db",
    spec={"clusterIP": "None", "selector": {"app": "postgres"}, "ports": [{"port": 5432}]},
)


def pod(
    name: str, created: str, ready: bool | None, containers: int = 1, **status: Any
) -> pb.Object:
    conditions = [] if ready is None else [{"type": "Ready", "status": str(ready)}]
    spec: dict[str, Any] = {"containers": [{"name": f"c{i}"} for i in range(containers)]}
    if "node" in status:
        spec["nodeName"] = status.pop("node")
    metadata = {"deletionTimestamp": status.pop("deleting")} if "deleting" in status else {}
    return obj(
        "Pod",
        name,
        created,
        metadata=metadata,
        spec=spec,
        status={"conditions": conditions, **status},
    )


PODS = [
    pod(
        "web-1", ago(hours=7, minutes=59), True, phase="Running", podIP="10.244.0.5", node="node-a"
    ),
    pod(
        "web-2",
        ago(hours=30),
        True,
        containers=2,
        phase="Running",
        podIP="10.244.1.7",
        node="node-b",
    ),
    pod("web-3", ago(minutes=11), False, phase="Running", podIP="10.244.0.9", node="node-a"),
    pod("pending", ago(seconds=119), None),
    # No Ready condition but an IP and Running: the registry counts it ready, so does READY.
    pod(
        "handmade", ago(days=3, hours=4), None, phase="Running", podIP="10.244.0.20", node="node-a"
    ),
    pod(
        "leaving",
        ago(minutes=9),
        True,
        phase="Running",
        podIP="10.244.0.6",
        node="node-a",
        deleting=ago(seconds=2),
    ),
]

NODES = [
    obj(
        "Node",
        "node-a",
        ago(days=30),
        spec={"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        status={
            "addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "192.168.50.10"},
            ]
        },
    ),
    obj("Node", "node-b", ago(hours=2), spec={"podCIDR": "10.244.1.0/24"}),
]


def endpoint(ip: str, ready: bool | None = True) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}


def eps(
    name: str,
    service: str | None,
    created: str,
    ports: list[dict[str, Any]],
    endpoints: list[dict[str, Any]],
    namespace: str = "default",
) -> pb.Object:
    labels = {"kubernetes.io/service-name": service} if service else {}
    return obj(
        "EndpointSlice",
        name,
        created,
        namespace=namespace,
        metadata={"labels": labels},
        addressType="IPv4",
        ports=ports,
        endpoints=endpoints,
    )


SLICES = [
    eps(
        "dns-7f3a1",
        "dns",
        ago(days=2),
        [
            {"name": "dns", "protocol": "UDP", "port": 5353},
            {"name": "dns-tcp", "protocol": "TCP", "port": 5353},
        ],
        [endpoint("10.244.0.3")],
    ),
    eps(
        "web-nodeport-4c2d9",
        "web-nodeport",
        ago(minutes=3),
        [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "https", "protocol": "TCP", "port": 8443},
        ],
        [
            endpoint("10.244.0.5"),
            endpoint("10.244.1.7"),
            endpoint("10.244.0.9", ready=False),
            endpoint("10.244.0.20", ready=None),
            endpoint("10.244.2.4"),
        ],
    ),
    eps(
        "web-nodeport-9e0b1",
        "web-nodeport",
        ago(minutes=2),
        [
            {"name": "http", "protocol": "TCP", "port": 80},
            {"name": "https", "protocol": "TCP", "port": 8443},
        ],
        [endpoint("10.244.3.2")],
    ),
    eps(
        "external-db-manual",
        "external-db",
        ago(hours=1),
        [{"port": 5432}, {"name": "metrics"}],
        [endpoint("192.0.2.10"), endpoint("192.0.2.11")],
    ),
    eps("empty", None, ago(seconds=30), [], []),
    eps("postgres-1", "postgres", ago(days=400), [], [endpoint("10.244.0.40")], namespace="db"),
]


def slices_of(service: str) -> list[pb.EndpointSlice]:
    return [
        o.endpoint_slice
        for o in SLICES
        if o.endpoint_slice.metadata.labels.get("kubernetes.io/service-name") == service
    ]


# ------------------------------------------------------------------ golden files


@pytest.mark.parametrize(
    ("golden", "kind", "objects", "wide", "with_namespace"),
    [
        ("services.txt", "Service", SERVICES, False, False),
        ("services_wide.txt", "Service", SERVICES, True, False),
        ("services_all_namespaces.txt", "Service", [HEADLESS, *SERVICES], False, True),
        ("pods.txt", "Pod", PODS, False, False),
        ("pods_wide.txt", "Pod", PODS, True, False),
        ("nodes.txt", "Node", NODES, False, False),
        ("nodes_all_namespaces.txt", "Node", NODES, True, True),
        ("endpointslices.txt", "EndpointSlice", SLICES, False, False),
    ],
)
def test_get_table(
    golden: str, kind: str, objects: list[pb.Object], wide: bool, with_namespace: bool
) -> None:
    text = printers.get_table(KINDS[kind], objects, NOW, wide=wide, with_namespace=with_namespace)
    check_golden(golden, text)


def test_endpoints_view() -> None:
    services = [o.service for o in [HEADLESS, *SERVICES]]
    rows = printers.service_endpoints(services, [o.endpoint_slice for o in SLICES])
    check_golden("endpoints.txt", printers.endpoints_table(rows, NOW, with_namespace=True))


def test_endpoints_view_lists_selector_services_without_slices_and_orphan_slices() -> None:
    services = [o.service for o in SERVICES]
    orphan = eps("gone-abc12", "gone", ago(minutes=1), [{"port": 80}], [endpoint("10.0.0.1")])
    rows = printers.service_endpoints(services[:1], [orphan.endpoint_slice])
    assert [(r.name, len(r.slices)) for r in rows] == [("dns", 0), ("gone", 1)]
    assert (
        printers.service_endpoints(services[:1], [orphan.endpoint_slice], orphans=False)[0].name
        == "dns"
    )
    # A Service without a selector and without slices has no Endpoints.
    assert printers.service_endpoints(services[1:2], []) == []


@pytest.mark.parametrize(
    ("golden", "service"),
    [
        ("describe_my_service.txt", SERVICES[2]),
        ("describe_dns.txt", SERVICES[0]),
        ("describe_web_nodeport.txt", SERVICES[3]),
        ("describe_postgres.txt", HEADLESS),
    ],
)
def test_describe_service(golden: str, service: pb.Object) -> None:
    svc = service.service
    check_golden(golden, printers.describe_service(svc, slices_of(svc.metadata.name)))


def test_yaml_single_and_list() -> None:
    check_golden("service.yaml.txt", printers.to_yaml(SERVICES[3:4], single=True))
    check_golden("list.yaml.txt", printers.to_yaml([NODES[1], SLICES[0]], single=False))
    check_golden("empty_list.yaml.txt", printers.to_yaml([], single=False))


def test_json_single_and_list() -> None:
    check_golden("service.json.txt", printers.to_json(SERVICES[2:3], single=True))
    check_golden("list.json.txt", printers.to_json([PODS[0]], single=False))


# ------------------------------------------------------------------ cells


# k8s.io/apimachinery/pkg/util/duration's HumanDuration, case by case.
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "<invalid>"),
        (-1.5, "0s"),
        (-0.5, "0s"),
        (0, "0s"),
        (5.9, "5s"),
        (119, "119s"),
        (120, "2m"),
        (192, "3m12s"),
        (9 * 60 + 59, "9m59s"),
        (10 * 60, "10m"),
        (179 * 60 + 59, "179m"),
        (3 * 3600, "3h"),
        (7 * 3600 + 59 * 60, "7h59m"),
        (8 * 3600, "8h"),
        (47 * 3600 + 3599, "47h"),
        (48 * 3600, "2d"),
        (7 * 86400 + 23 * 3600, "7d23h"),
        (8 * 86400, "8d"),
        (729 * 86400, "729d"),
        (2 * 365 * 86400, "2y"),
        (3 * 365 * 86400 + 10 * 86400, "3y10d"),
        (8 * 365 * 86400, "8y"),
        (20 * 365 * 86400 + 86400, "20y"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert printers.human_duration(seconds) == text


def test_age_without_creation_time_is_unknown() -> None:
    assert printers.age(pb.ObjectMeta(name="x"), NOW) == "<unknown>"


def test_tabwrite_is_go_tabwriter() -> None:
    # Columns are per block of consecutive lines with a cell there; last cells are not padded.
    text = "a:\tx\tone\nlonger key:\ty\nb:\tzz\ttwo\n\tcontinued\nno tab\nc:\t1\n"
    assert printers.tabwrite(text, minwidth=0, padding=2) == (
        "a:           x  one\n"
        "longer key:  y\n"
        "b:           zz  two\n"
        "             continued\n"
        "no tab\n"
        "c:  1\n"
    )
    # minwidth 6: a one-letter column is still 6 wide
    assert printers.table(["a", "bb"], [["x", "y"]]) == "A     BB\nx     y\n"


@pytest.mark.parametrize(
    ("o", "ref", "deleted"),
    [
        (SERVICES[2], "service/my-service", 'service "my-service" deleted'),
        (PODS[0], "pod/web-1", 'pod "web-1" deleted'),
        (NODES[0], "node/node-a", 'node "node-a" deleted'),
        (
            SLICES[0],
            "endpointslice.discovery.k8s.io/dns-7f3a1",
            'endpointslice.discovery.k8s.io "dns-7f3a1" deleted',
        ),
    ],
)
def test_names(o: pb.Object, ref: str, deleted: str) -> None:
    assert printers.object_ref(o) == ref
    assert printers.deleted_line(kind_of(o), message_of(o).metadata.name) == deleted


def test_not_found() -> None:
    assert printers.not_found(KINDS["Service"], "x") == 'services "x" not found'
    assert (
        printers.not_found(KINDS["EndpointSlice"], "x")
        == 'endpointslices.discovery.k8s.io "x" not found'
    )


def test_ready_endpoints_by_port_and_truncated() -> None:
    web = slices_of("web-nodeport")
    assert printers.ready_endpoints(web, port_name="https") == (
        "10.244.0.20:8443,10.244.0.5:8443,10.244.1.7:8443 + 2 more..."
    )
    assert printers.ready_endpoints(slices_of("postgres")) == "10.244.0.40"
    assert printers.ready_endpoints([]) == ""
