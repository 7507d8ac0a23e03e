"""Defaulting and validation: one table row per rule, each asserting the exact error strings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpflb import validation
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import from_manifest, load_documents
from ebpflb.validation import (
    ErrorType,
    FieldError,
    apply_defaults,
    is_dns1035_label,
    is_dns1123_label,
    is_dns1123_subdomain,
    is_iana_svc_name,
    is_ipv4,
    is_ipv4_cidr,
    validate,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = Path(os.environ.get("EBPFLB_MANIFESTS") or REPO.parent / "shared" / "manifests")

# Kubernetes' pattern explanations, written out here rather than imported, so a
# change to the module's wording shows up as a failing test.
DNS1035 = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
    "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_NAME = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
    "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
PORT_RANGE = "must be between 1 and 65535"
IPV4 = "must be a valid IPv4 address"


# ------------------------------------------------------------------ manifest builders


def service(meta: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A valid ClusterIP Service `web` with one port, changed by meta and spec."""
    spec = {"selector": {"app": "web"}, "ports": [{"port": 80}], **spec}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", **(meta or {})},
        "spec": spec,
    }


def node_port(**spec: Any) -> dict[str, Any]:
    return service(type="NodePort", **spec)


def pod(
    containers: list[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    if containers is None:
        containers = [{"name": "app", "ports": [{"containerPort": 80, "name": "http"}]}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "labels": {"app": "web"}, **(meta or {})},
        "spec": {"containers": containers, **spec},
        "status": status or {},
    }


def node(
    spec: dict[str, Any] | None = None,
    addresses: list[dict[str, str]] | None = None,
    name: str = "node-a",
) -> dict[str, Any]:
    if addresses is None:
        addresses = [{"type": "InternalIP", "address": "192.168.1.10"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": spec if spec is not None else {"podCIDR": "10.244.1.0/24"},
        "status": {"addresses": addresses},
    }


def endpoint_slice(
    endpoints: list[dict[str, Any]] | None = None,
    ports: list[dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-abc12", "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": endpoints if endpoints is not None else [{"addresses": ["10.244.1.5"]}],
        "ports": ports if ports is not None else [{"name": "", "port": 8080}],
        **top,
    }


def defaulted(manifest: dict[str, Any]) -> pb.Object:
    obj = from_manifest(manifest)
    apply_defaults(obj)
    return obj


def errors_of(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    return [
        str(e) for e in validate(defaulted(manifest), defaulted(old) if old is not None else None)
    ]


# ------------------------------------------------------------------ the users' manifests


def _user_documents() -> list[Any]:
    if not MANIFESTS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {MANIFESTS}"))]
    return [
        pytest.param(doc, id=f"{path.name}[{i}]")
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for i, doc in enumerate(load_documents(path.read_text()))
    ]


@pytest.mark.parametrize("doc", _user_documents())
def test_users_manifests_are_valid(doc: dict[str, Any]) -> None:
    obj = defaulted(doc)
    assert [str(e) for e in validate(obj)] == []
    assert [str(e) for e in validate(obj, obj)] == []  # re-applying it unchanged


# ------------------------------------------------------------------ the rules

VALID = [
    pytest.param(service(), id="service-minimal"),
    pytest.param(service(ports=[{"port": 53, "protocol": "UDP"}]), id="service-udp"),
    pytest.param(service(clusterIP="None", ports=[]), id="service-headless-no-ports"),
    pytest.param(service(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10"]), id="cluster-ips"),
    pytest.param(service(selector={}), id="service-without-selector"),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": "http"}]), id="service-named-target-port"
    ),
    pytest.param(
        node_port(
            ports=[
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
            ]
        ),
        id="same-node-port-different-protocols",
    ),
    pytest.param(node_port(externalTrafficPolicy="Local"), id="nodeport-etp-local"),
    pytest.param(service(internalTrafficPolicy="Local"), id="itp-local"),
    pytest.param(
        service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {}}),
        id="client-ip-affinity-defaulted-timeout",
    ),
    pytest.param(service(ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack"), id="ip-families-ipv4"),
    pytest.param(
        service(meta={"annotations": {"Example.com/Note": "any value at all!"}}),
        id="annotation-key-any-case",
    ),
    pytest.param(pod(), id="pod"),
    pytest.param(
        pod(nodeName="node-a", status={"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}),
        id="pod-scheduled-with-ip",
    ),
    pytest.param(node(), id="node"),
    pytest.param(
        node(addresses=[{"type": "Hostname", "address": "node-a.example"}]), id="node-hostname"
    ),
    pytest.param(endpoint_slice(), id="endpoint-slice"),
]


@pytest.mark.parametrize("manifest", VALID)
def test_valid(manifest: dict[str, Any]) -> None:
    assert errors_of(manifest) == []


LONG_NAME = "a" * 64

# (manifest, every error it must produce, in order)
INVALID = [
    # ---- metadata
    pytest.param(service(meta={"name": ""}), ["metadata.name: Required value"], id="name-missing"),
    pytest.param(
        service(meta={"name": "My_Service"}),
        [f'metadata.name: Invalid value: "My_Service": {DNS1035}'],
        id="service-name-not-dns1035",
    ),
    pytest.param(
        service(meta={"name": "1web"}),
        [f'metadata.name: Invalid value: "1web": {DNS1035}'],
        id="service-name-starts-with-digit",
    ),
    pytest.param(
        service(meta={"name": LONG_NAME}),
        [f'metadata.name: Invalid value: "{LONG_NAME}": must be no more than 63 characters'],
        id="service-name-too-long",
    ),
    pytest.param(
        service(meta={"namespace": "Prod.1"}),
        [f'metadata.namespace: Invalid value: "Prod.1": {DNS1123_LABEL}'],
        id="namespace-not-dns1123-label",
    ),
    pytest.param(
        service(meta={"namespace": "prod.eu"}),
        ['metadata.namespace: Invalid value: "prod.eu": must not contain dots'],
        id="namespace-with-dots",
    ),
    pytest.param(
        service(meta={"labels": {"-app": "web"}}),
        [f'metadata.labels: Invalid value: "-app": {LABEL_NAME}'],
        id="label-key-bad",
    ),
    pytest.param(
        service(meta={"labels": {"app": "web server"}}),
        [f'metadata.labels: Invalid value: "web server": {LABEL_VALUE}'],
        id="label-value-bad",
    ),
    pytest.param(
        service(meta={"annotations": {"a/b/c": "x"}}),
        [
            'metadata.annotations: Invalid value: "a/b/c": a qualified name must consist of '
            "alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used "
            "for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS "
            "subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ],
        id="annotation-key-bad",
    ),
    pytest.param(
        service(meta={"annotations": {"big": "x" * (256 * 1024)}}),
        ["metadata.annotations: Too long: must have at most 262144 bytes"],
        id="annotations-too-big",
    ),
    # ---- Service type
    pytest.param(
        service(type="LoadBalancer"),
        [
            'spec.type: Unsupported value: "LoadBalancer": supported values: "ClusterIP", '
            '"NodePort" (LoadBalancer Services are not supported by ebpflb)'
        ],
        id="type-loadbalancer",
    ),
    pytest.param(
        service(type="ExternalName"),
        [
            'spec.type: Unsupported value: "ExternalName": supported values: "ClusterIP", '
            '"NodePort" (ExternalName Services are not supported by ebpflb)'
        ],
        id="type-externalname",
    ),
    pytest.param(
        service(type="clusterip"),
        ['spec.type: Unsupported value: "clusterip": supported values: "ClusterIP", "NodePort"'],
        id="type-wrong-case",
    ),
    # ---- ports
    pytest.param(service(ports=[]), ["spec.ports: Required value"], id="no-ports"),
    pytest.param(
        service(ports=[{"port": 0, "targetPort": 8080}]),
        [f"spec.ports[0].port: Invalid value: 0: {PORT_RANGE}"],
        id="port-0",
    ),
    pytest.param(
        service(ports=[{"port": 70000, "targetPort": 8080}]),
        [f"spec.ports[0].port: Invalid value: 70000: {PORT_RANGE}"],
        id="port-70000",
    ),
    pytest.param(
        service(ports=[{"port": 80, "protocol": "FOO"}]),
        ['spec.ports[0].protocol: Unsupported value: "FOO": supported values: "TCP", "UDP"'],
        id="protocol-foo",
    ),
    pytest.param(
        service(ports=[{"port": 80, "protocol": "SCTP"}]),
        [
            'spec.ports[0].protocol: Unsupported value: "SCTP": supported values: "TCP", "UDP" '
            "(ebpflb does not support SCTP yet)"
        ],
        id="protocol-sctp",
    ),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": "a-very-long-port-name"}]),
        [
            'spec.ports[0].targetPort: Invalid value: "a-very-long-port-name": '
            "must be no more than 15 characters"
        ],
        id="target-port-name-too-long",
    ),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": "web--http"}]),
        [
            'spec.ports[0].targetPort: Invalid value: "web--http": must not contain consecutive '
            "hyphens"
        ],
        id="target-port-name-double-hyphen",
    ),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": "8080"}]),
        ['spec.ports[0].targetPort: Invalid value: "8080": must contain at least one letter (a-z)'],
        id="target-port-name-digits-only",
    ),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": "-Http"}]),
        [
            'spec.ports[0].targetPort: Invalid value: "-Http": must contain only alpha-numeric '
            "characters (a-z, 0-9), and hyphens (-)",
            'spec.ports[0].targetPort: Invalid value: "-Http": must not begin or end with a hyphen',
        ],
        id="target-port-name-every-problem",
    ),
    pytest.param(
        service(ports=[{"port": 80, "targetPort": 65536}]),
        [f"spec.ports[0].targetPort: Invalid value: 65536: {PORT_RANGE}"],
        id="target-port-number-out-of-range",
    ),
    pytest.param(
        service(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
        ['spec.ports[1].name: Duplicate value: "http"'],
        id="port-name-duplicate",
    ),
    pytest.param(
        service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
        ["spec.ports[1]: Duplicate value: 80/TCP"],
        id="port-protocol-duplicate",
    ),
    pytest.param(
        service(ports=[{"name": "http", "port": 80}, {"port": 443}]),
        ["spec.ports[1].name: Required value"],
        id="port-name-required-with-two-ports",
    ),
    pytest.param(
        service(ports=[{"name": "Web_HTTP", "port": 80}]),
        [f'spec.ports[0].name: Invalid value: "Web_HTTP": {DNS1123_LABEL}'],
        id="port-name-not-dns1123-label",
    ),
    pytest.param(
        service(ports=[{"port": 80, "appProtocol": "-http"}]),
        [f'spec.ports[0].appProtocol: Invalid value: "-http": {LABEL_NAME}'],
        id="app-protocol-bad",
    ),
    # ---- nodePort
    pytest.param(
        service(ports=[{"port": 80, "nodePort": 30080}]),
        ["spec.ports[0].nodePort: Forbidden: may not be used when type is 'ClusterIP'"],
        id="node-port-on-clusterip",
    ),
    pytest.param(
        node_port(ports=[{"port": 80, "nodePort": 70000}]),
        [f"spec.ports[0].nodePort: Invalid value: 70000: {PORT_RANGE}"],
        id="node-port-out-of-range",
    ),
    pytest.param(
        node_port(
            ports=[
                {"name": "a", "port": 80, "nodePort": 30080},
                {"name": "b", "port": 81, "nodePort": 30080},
            ]
        ),
        ["spec.ports[1].nodePort: Duplicate value: 30080"],
        id="node-port-twice-same-protocol",
    ),
    # ---- clusterIP
    pytest.param(
        service(clusterIP="10.96.0.999"),
        [f'spec.clusterIP: Invalid value: "10.96.0.999": {IPV4}'],
        id="cluster-ip-bad-octet",
    ),
    pytest.param(
        service(clusterIP="10.96.0.010"),
        [f'spec.clusterIP: Invalid value: "10.96.0.010": {IPV4}'],
        id="cluster-ip-leading-zero",
    ),
    pytest.param(
        service(clusterIP="fd00::10"),
        [f'spec.clusterIP: Invalid value: "fd00::10": {IPV4}'],
        id="cluster-ip-ipv6",
    ),
    pytest.param(
        node_port(clusterIP="None"),
        ["spec.clusterIP: Invalid value: \"None\": may not be set to 'None' for NodePort services"],
        id="headless-nodeport",
    ),
    pytest.param(
        service(clusterIP="10.96.0.10", clusterIPs=["10.96.0.11"]),
        ['spec.clusterIPs[0]: Invalid value: "10.96.0.11": must match spec.clusterIP'],
        id="cluster-ips-disagree",
    ),
    pytest.param(
        service(clusterIPs=["10.96.0.10", "10.96.0.11"]),
        ["spec.clusterIPs: Too many: 2: must have at most 1 items"],
        id="cluster-ips-two",
    ),
    # ---- session affinity
    pytest.param(
        service(sessionAffinity="Sticky"),
        ['spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None"'],
        id="session-affinity-bad",
    ),
    pytest.param(
        service(
            sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}
        ),
        [
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 0: must be "
            "between 1 and 86400"
        ],
        id="affinity-timeout-0",
    ),
    pytest.param(
        service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}},
        ),
        [
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 86401: must be "
            "between 1 and 86400"
        ],
        id="affinity-timeout-too-long",
    ),
    pytest.param(
        service(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
        ["spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None"],
        id="affinity-config-with-affinity-none",
    ),
    # ---- traffic policies and the rest of the spec
    pytest.param(
        service(externalTrafficPolicy="Local"),
        [
            'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for '
            "externally-accessible services"
        ],
        id="etp-local-on-clusterip",
    ),
    pytest.param(
        node_port(externalTrafficPolicy="Global"),
        [
            'spec.externalTrafficPolicy: Unsupported value: "Global": supported values: '
            '"Cluster", "Local"'
        ],
        id="etp-bad",
    ),
    pytest.param(
        service(internalTrafficPolicy="Node"),
        [
            'spec.internalTrafficPolicy: Unsupported value: "Node": supported values: '
            '"Cluster", "Local"'
        ],
        id="itp-bad",
    ),
    pytest.param(
        service(selector={"app": "web", "bad key": "x"}),
        [f'spec.selector: Invalid value: "bad key": {LABEL_NAME}'],
        id="selector-key-bad",
    ),
    pytest.param(
        service(selector={"app": "x" * 64}),
        [f'spec.selector: Invalid value: "{"x" * 64}": must be no more than 63 characters'],
        id="selector-value-too-long",
    ),
    pytest.param(
        node_port(healthCheckNodePort=30999),
        [
            "spec.healthCheckNodePort: Invalid value: 30999: may only be set when type is "
            "'NodePort' and externalTrafficPolicy is 'Local'"
        ],
        id="health-check-node-port-cluster-policy",
    ),
    pytest.param(
        node_port(healthCheckNodePort=70000, externalTrafficPolicy="Local"),
        ["spec.healthCheckNodePort: Invalid value: 70000: must be between 1 and 65535"],
        id="health-check-node-port-out-of-range",
    ),
    pytest.param(
        service(ipFamilies=["IPv6"]),
        [
            'spec.ipFamilies[0]: Unsupported value: "IPv6": supported values: "IPv4" (ebpflb is '
            "IPv4-only)"
        ],
        id="ip-family-ipv6",
    ),
    pytest.param(
        service(ipFamilyPolicy="RequireDualStack"),
        [
            'spec.ipFamilyPolicy: Invalid value: "RequireDualStack": '
            "this cluster is not configured for dual-stack services"
        ],
        id="require-dual-stack",
    ),
    pytest.param(
        service(
            meta={"name": "Web"},
            ports=[{"port": 0, "targetPort": 80, "protocol": "SCTP"}, {"port": 99999}],
        ),
        [
            f'metadata.name: Invalid value: "Web": {DNS1035}',
            "spec.ports[0].name: Required value",
            f"spec.ports[0].port: Invalid value: 0: {PORT_RANGE}",
            'spec.ports[0].protocol: Unsupported value: "SCTP": supported values: "TCP", "UDP" '
            "(ebpflb does not support SCTP yet)",
            "spec.ports[1].name: Required value",
            f"spec.ports[1].port: Invalid value: 99999: {PORT_RANGE}",
            f"spec.ports[1].targetPort: Invalid value: 99999: {PORT_RANGE}",
        ],
        id="every-error-not-just-the-first",
    ),
    # ---- Pod
    pytest.param(pod(containers=[]), ["spec.containers: Required value"], id="pod-no-containers"),
    pytest.param(
        pod(containers=[{"image": "nginx"}]),
        ["spec.containers[0].name: Required value"],
        id="pod-container-name-missing",
    ),
    pytest.param(
        pod(containers=[{"name": "app"}, {"name": "app"}]),
        ['spec.containers[1].name: Duplicate value: "app"'],
        id="pod-container-name-duplicate",
    ),
    pytest.param(
        pod(meta={"name": "Web_1"}),
        [f'metadata.name: Invalid value: "Web_1": {DNS1123_SUBDOMAIN}'],
        id="pod-name-not-subdomain",
    ),
    pytest.param(
        pod(
            containers=[{"name": "app", "ports": [{"containerPort": 0}, {"containerPort": 65536}]}]
        ),
        [
            "spec.containers[0].ports[0].containerPort: Required value",
            f"spec.containers[0].ports[1].containerPort: Invalid value: 65536: {PORT_RANGE}",
        ],
        id="pod-container-port-range",
    ),
    pytest.param(
        pod(
            containers=[
                {"name": "app", "ports": [{"containerPort": 80, "name": "http-web-service"}]}
            ]
        ),
        [
            'spec.containers[0].ports[0].name: Invalid value: "http-web-service": must be no '
            "more than 15 characters"
        ],
        id="pod-port-name-too-long",
    ),
    pytest.param(
        pod(
            containers=[
                {"name": "a", "ports": [{"containerPort": 80, "name": "http"}]},
                {"name": "b", "ports": [{"containerPort": 81, "name": "http"}]},
            ]
        ),
        ['spec.containers[1].ports[0].name: Duplicate value: "http"'],
        id="pod-port-name-duplicate-across-containers",
    ),
    pytest.param(
        pod(containers=[{"name": "app", "ports": [{"containerPort": 80, "protocol": "SCTP"}]}]),
        [
            'spec.containers[0].ports[0].protocol: Unsupported value: "SCTP": supported values: '
            '"TCP", "UDP" (ebpflb does not support SCTP yet)'
        ],
        id="pod-port-sctp",
    ),
    pytest.param(
        pod(nodeName="Node_A"),
        [f'spec.nodeName: Invalid value: "Node_A": {DNS1123_SUBDOMAIN}'],
        id="pod-node-name-bad",
    ),
    pytest.param(
        pod(status={"podIP": "10.244.1.256"}),
        [f'status.podIP: Invalid value: "10.244.1.256": {IPV4}'],
        id="pod-ip-bad",
    ),
    pytest.param(
        pod(status={"phase": "Sleeping"}),
        [
            'status.phase: Unsupported value: "Sleeping": supported values: "Failed", '
            '"Pending", "Running", "Succeeded", "Unknown"'
        ],
        id="pod-phase-bad",
    ),
    pytest.param(
        pod(status={"conditions": [{"type": "Ready", "status": "yes"}]}),
        [
            'status.conditions[0].status: Unsupported value: "yes": supported values: "False", '
            '"True", "Unknown"'
        ],
        id="pod-condition-status-bad",
    ),
    # ---- Node
    pytest.param(
        node(name="Node_A"),
        [f'metadata.name: Invalid value: "Node_A": {DNS1123_SUBDOMAIN}'],
        id="node-name-bad",
    ),
    pytest.param(
        node(spec={"podCIDR": "10.244.1.0/33"}),
        [
            'spec.podCIDR: Invalid value: "10.244.1.0/33": must be a valid IPv4 CIDR (e.g. '
            "10.244.1.0/24)"
        ],
        id="node-pod-cidr-prefix-too-long",
    ),
    pytest.param(
        node(spec={"podCIDR": "10.244.1.0"}),
        [
            'spec.podCIDR: Invalid value: "10.244.1.0": must be a valid IPv4 CIDR (e.g. '
            "10.244.1.0/24)"
        ],
        id="node-pod-cidr-no-prefix",
    ),
    pytest.param(
        node(spec={"podCIDR": "10.244.1.1/24"}),
        [
            'spec.podCIDR: Invalid value: "10.244.1.1/24": must have no host bits set (e.g. '
            "10.244.1.0/24)"
        ],
        id="node-pod-cidr-host-bits",
    ),
    pytest.param(
        node(addresses=[{"type": "InternalIP", "address": "node-a"}]),
        [f'status.addresses[0].address: Invalid value: "node-a": {IPV4}'],
        id="node-internal-ip-not-ip",
    ),
    pytest.param(
        node(addresses=[{"type": "InternalDNS", "address": "node-a.example"}]),
        [
            'status.addresses[0].type: Unsupported value: "InternalDNS": supported values: '
            '"ExternalIP", "Hostname", "InternalIP"'
        ],
        id="node-address-type-bad",
    ),
    # ---- EndpointSlice
    pytest.param(
        endpoint_slice(addressType="IPv6"),
        ['addressType: Unsupported value: "IPv6": supported values: "IPv4" (ebpflb is IPv4-only)'],
        id="slice-ipv6",
    ),
    pytest.param(
        endpoint_slice(endpoints=[{"addresses": []}]),
        ["endpoints[0].addresses: Required value: must contain at least 1 address"],
        id="slice-endpoint-without-address",
    ),
    pytest.param(
        endpoint_slice(endpoints=[{"addresses": ["10.244.1.5", "10.244.1"]}]),
        [f'endpoints[0].addresses[1]: Invalid value: "10.244.1": {IPV4}'],
        id="slice-address-bad",
    ),
    pytest.param(
        endpoint_slice(ports=[{"port": 0}]),
        [f"ports[0].port: Invalid value: 0: {PORT_RANGE}"],
        id="slice-port-0",
    ),
    pytest.param(
        endpoint_slice(ports=[{"port": 80}, {"port": 81, "protocol": "UDP"}]),
        ['ports[1].name: Duplicate value: ""'],
        id="slice-port-names-duplicate",
    ),
    pytest.param(
        endpoint_slice(ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]),
        ['ports[0].protocol: Unsupported value: "ICMP": supported values: "TCP", "UDP"'],
        id="slice-protocol-bad",
    ),
]


@pytest.mark.parametrize(("manifest", "expected"), INVALID)
def test_invalid(manifest: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(manifest) == expected


# (old, new, errors of the update)
UPDATES = [
    pytest.param(
        service(clusterIP="10.96.0.10"),
        service(clusterIP="10.96.0.11"),
        ['spec.clusterIP: Invalid value: "10.96.0.11": field is immutable'],
        id="cluster-ip-changed",
    ),
    pytest.param(
        service(clusterIP="None", ports=[]),
        service(clusterIP="10.96.0.11"),
        ['spec.clusterIP: Invalid value: "10.96.0.11": field is immutable'],
        id="headless-to-virtual-ip",
    ),
    pytest.param(
        service(clusterIP="10.96.0.10"), service(), [], id="cluster-ip-left-empty-is-the-merge"
    ),
    pytest.param(service(), service(clusterIP="10.96.0.12"), [], id="cluster-ip-set-on-update"),
    pytest.param(
        service(clusterIP="10.96.0.10"),
        service(clusterIP="10.96.0.10", type="NodePort"),
        [],
        id="same-cluster-ip-other-type",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), UPDATES)
def test_update(old: dict[str, Any], new: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(new, old) == expected


def test_update_of_another_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        validate(defaulted(service()), defaulted(pod()))


# ------------------------------------------------------------------ without defaults

# What validate says of objects that skipped apply_defaults (as the API server would).
RAW = [
    pytest.param(
        service(meta={"namespace": "default"}),
        [
            "spec.ports[0].protocol: Required value",
            "spec.ports[0].targetPort: Required value",
            "spec.sessionAffinity: Required value",
            "spec.type: Required value",
        ],
        id="service",
    ),
    pytest.param(
        {**node(), "metadata": {"name": "node-a", "namespace": "default"}},
        ["metadata.namespace: Forbidden: not allowed on this type"],
        id="node-with-namespace",
    ),
    pytest.param(
        endpoint_slice(ports=[]),
        ["metadata.namespace: Required value", "addressType: Required value"],
        id="endpoint-slice",
    ),
    pytest.param(
        service(
            sessionAffinity="ClientIP",
            type="ClusterIP",
            internalTrafficPolicy="Cluster",
            ports=[{"port": 80, "protocol": "TCP", "targetPort": 80}],
            meta={"namespace": "default"},
        ),
        [
            "spec.sessionAffinityConfig: Required value: when session affinity type is ClientIP",
        ],
        id="client-ip-without-timeout",
    ),
]


@pytest.mark.parametrize(("manifest", "expected"), RAW)
def test_without_defaults(manifest: dict[str, Any], expected: list[str]) -> None:
    assert [str(e) for e in validate(from_manifest(manifest))] == expected


# ------------------------------------------------------------------ defaults


def test_service_defaults() -> None:
    obj = defaulted(service(ports=[{"port": 80}, {"port": 53, "name": "dns", "targetPort": "dns"}]))
    svc = obj.service
    assert (svc.api_version, svc.kind, svc.metadata.namespace) == ("v1", "Service", "default")
    assert svc.spec.type == "ClusterIP"
    assert [p.protocol for p in svc.spec.ports] == ["TCP", "TCP"]
    assert svc.spec.ports[0].target_port.int_val == 80
    assert svc.spec.ports[1].target_port.str_val == "dns"
    assert svc.spec.session_affinity == "None"
    assert not svc.spec.HasField("session_affinity_config")
    assert svc.spec.external_traffic_policy == ""
    assert svc.spec.internal_traffic_policy == "Cluster"
    assert svc.spec.cluster_ip == ""  # the allocator's


def test_nodeport_defaults_external_traffic_policy() -> None:
    assert defaulted(node_port()).service.spec.external_traffic_policy == "Cluster"
    local = defaulted(node_port(externalTrafficPolicy="Local"))
    assert local.service.spec.external_traffic_policy == "Local"


def test_target_port_zero_or_empty_means_port() -> None:
    for target in (0, ""):
        obj = defaulted(service(ports=[{"port": 8443, "targetPort": target}]))
        assert obj.service.spec.ports[0].target_port.int_val == 8443


def test_client_ip_affinity_timeout_default_and_kept() -> None:
    svc = defaulted(service(sessionAffinity="ClientIP")).service
    assert svc.spec.session_affinity_config.client_ip.timeout_seconds == 10800
    cfg = {"clientIP": {"timeoutSeconds": 60}}
    svc = defaulted(service(sessionAffinity="ClientIP", sessionAffinityConfig=cfg)).service
    assert svc.spec.session_affinity_config.client_ip.timeout_seconds == 60


def test_cluster_ip_taken_from_cluster_ips() -> None:
    svc = defaulted(service(clusterIPs=["10.96.0.20"])).service
    assert svc.spec.cluster_ip == "10.96.0.20"


def test_namespace_kept_and_cleared_for_nodes() -> None:
    assert defaulted(service(meta={"namespace": "prod"})).service.metadata.namespace == "prod"
    n = {**node(), "metadata": {"name": "node-a", "namespace": "default"}}
    assert defaulted(n).node.metadata.namespace == ""


def test_pod_and_endpoint_slice_defaults() -> None:
    p = defaulted(pod()).pod
    assert p.spec.containers[0].ports[0].protocol == "TCP"
    assert (p.api_version, p.kind, p.metadata.namespace) == ("v1", "Pod", "default")
    es = defaulted(endpoint_slice()).endpoint_slice
    assert es.address_type == "IPv4"
    assert es.ports[0].protocol == "TCP"
    assert es.api_version == "discovery.k8s.io/v1"


def test_defaults_are_idempotent() -> None:
    once = defaulted(node_port(sessionAffinity="ClientIP"))
    twice = pb.Object()
    twice.CopyFrom(once)
    apply_defaults(twice)
    assert twice == once


# ------------------------------------------------------------------ FieldError


@pytest.mark.parametrize(
    ("error", "text"),
    [
        pytest.param(FieldError.invalid("a", 0, "d"), "a: Invalid value: 0: d", id="int-bare"),
        pytest.param(
            FieldError.invalid("a", "x", "d"), 'a: Invalid value: "x": d', id="str-quoted"
        ),
        pytest.param(FieldError.invalid("a", True, "d"), "a: Invalid value: true: d", id="bool"),
        pytest.param(FieldError.invalid("a", None, "d"), "a: Invalid value: null: d", id="null"),
        pytest.param(
            FieldError.invalid("a", 'say "hi"\n\\\x01é', "d"),
            'a: Invalid value: "say \\"hi\\"\\n\\\\\\x01é": d',
            id="go-quoting",
        ),
        pytest.param(FieldError.required("a"), "a: Required value", id="required"),
        pytest.param(FieldError.required("a", "why"), "a: Required value: why", id="required-why"),
        pytest.param(FieldError.forbidden("a", "no"), "a: Forbidden: no", id="forbidden"),
        pytest.param(FieldError.duplicate("a", "x"), 'a: Duplicate value: "x"', id="duplicate"),
        pytest.param(
            FieldError.not_supported("a", "x", ["b", "a"]),
            'a: Unsupported value: "x": supported values: "a", "b"',
            id="not-supported-sorted",
        ),
        pytest.param(
            FieldError.too_many("a", 3, 2),
            "a: Too many: 3: must have at most 2 items",
            id="too-many",
        ),
    ],
)
def test_field_error_format(error: FieldError, text: str) -> None:
    assert str(error) == text


def test_field_error_kind() -> None:
    e = FieldError.invalid("spec.clusterIP", "x", "d")
    assert e.kind == ErrorType.INVALID
    assert ErrorType.INVALID.value == "FieldValueInvalid"
    assert ErrorType.NOT_SUPPORTED.text == "Unsupported value"
    with pytest.raises(ValueError):
        FieldError("a", "Bogus", 1, "")


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        pytest.param(is_dns1035_label, "web-1", True, id="1035-ok"),
        pytest.param(is_dns1035_label, "1web", False, id="1035-digit-first"),
        pytest.param(is_dns1123_label, "1web", True, id="1123-digit-first"),
        pytest.param(is_dns1123_label, "a.b", False, id="1123-label-dots"),
        pytest.param(is_dns1123_subdomain, "a.b-c.d", True, id="subdomain-ok"),
        pytest.param(is_dns1123_subdomain, "a..b", False, id="subdomain-empty-part"),
        pytest.param(is_dns1123_subdomain, "a" * 254, False, id="subdomain-too-long"),
        pytest.param(is_iana_svc_name, "http-web-svc", True, id="iana-ok"),
        pytest.param(is_iana_svc_name, "http-web-service", False, id="iana-16-chars"),
        pytest.param(is_iana_svc_name, "123", False, id="iana-no-letter"),
        pytest.param(is_ipv4, "0.0.0.0", True, id="ipv4-zeros"),
        pytest.param(is_ipv4, "255.255.255.255", True, id="ipv4-max"),
        pytest.param(is_ipv4, "256.1.1.1", False, id="ipv4-256"),
        pytest.param(is_ipv4, "1.2.3", False, id="ipv4-three-parts"),
        pytest.param(is_ipv4, "01.2.3.4", False, id="ipv4-leading-zero"),
        pytest.param(is_ipv4, " 1.2.3.4", False, id="ipv4-space"),
        pytest.param(is_ipv4, "1.2.3.4\n", False, id="ipv4-newline"),
        pytest.param(is_ipv4_cidr, "0.0.0.0/0", True, id="cidr-default"),
        pytest.param(is_ipv4_cidr, "10.244.1.0/24", True, id="cidr-ok"),
        pytest.param(is_ipv4_cidr, "10.244.1.0/024", False, id="cidr-leading-zero"),
    ],
)
def test_format_helpers(check: Any, value: str, expected: bool) -> None:
    assert check(value) is expected


# ------------------------------------------------------------------ the fast path for Services


class _Picker:
    """Draws a valid value for every field but one, the broken one (or none): each rule
    is broken on its own, in a Service otherwise of the usual shape."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.broken = draw(st.integers(0, 45))  # the how-many-th pick; past the last: none
        self.picks = 0

    def __call__(self, valid: list[Any], invalid: list[Any]) -> Any:
        self.picks += 1
        return self.draw(st.sampled_from(invalid if self.picks == self.broken else valid))


def _service_msg(draw: st.DrawFn) -> pb.Service:
    """A Service of the usual shape with (mostly) one field made invalid, defaulted or not."""
    pick = _Picker(draw)
    s = pb.Service(api_version=pick(["v1", ""], ["v2"]))
    s.kind = pick(["Service", ""], ["Pod"])
    s.metadata.name = pick(["web", "web-1", "a"], ["Web", "1web", "web.1", "", "a" * 64])
    s.metadata.namespace = pick(["default", "kube-system"], ["", "Default", "a.b"])
    s.metadata.generation = pick([0, 3], [-1])
    keys, bad_keys = ["app", "example.com/app"], ["a/b/c", "-x", "", "x" * 64, "/app"]
    values, bad_values = ["web", "", "v1.2_3"], ["-v", "v" * 64, "a b"]
    for labels in (s.metadata.labels, s.spec.selector):
        for _ in range(draw(st.integers(0, 2))):
            labels[pick(keys, bad_keys)] = pick(values, bad_values)
    s.metadata.annotations.update(pick([{}], [{"note": "x"}, {"-bad": "x"}]))
    spec = s.spec
    spec.type = pick(["ClusterIP"], ["", "NodePort", "LoadBalancer", "Foo"])
    spec.session_affinity = pick(["None"], ["", "ClientIP", "Sticky"])
    if pick([False], [True]):
        spec.session_affinity_config.client_ip.timeout_seconds = draw(st.sampled_from([0, 60]))
    spec.external_traffic_policy = pick([""], ["Cluster", "Local", "Bad"])
    spec.health_check_node_port = pick([0], [30001])
    spec.internal_traffic_policy = pick(["Cluster", "Local"], ["", "Bad", "cluster"])
    spec.ip_families.extend(pick([[], ["IPv4"]], [["IPv6"], ["IPv4", "IPv4"]]))
    spec.ip_family_policy = pick(
        ["", "SingleStack", "PreferDualStack"], ["RequireDualStack", "Any"]
    )
    spec.cluster_ip = pick(["", "10.96.0.1"], ["None", "10.96.0.256", "1.2.3", "010.96.0.1"])
    spec.cluster_ips.extend(
        pick([[], [spec.cluster_ip]] if spec.cluster_ip else [[]], [[""], ["10.96.0.2"], ["None"]])
    )
    for i in range(pick([1, 2, 3], [0])):
        again = ["http"] if i else []  # a name or port the first one has
        name = pick([("http", "dns", "metrics")[i]], ["", "HTTP", "h" * 64, *again])
        p = spec.ports.add(name=name)
        p.port = pick([(80, 53, 9090)[i]], [0, 65536, *([80] if i else [])])
        p.protocol = pick(["TCP", "UDP"], ["", "SCTP", "tcp"])
        target = pick([8080, "http"], [None, 0, 70000, "Bad_Name", "", "123"])
        if isinstance(target, int):
            p.target_port.int_val = target
        elif isinstance(target, str):
            p.target_port.str_val = target
        p.node_port = pick([0], [30080])
        p.app_protocol = pick([""], ["http", "-x"])
    if draw(st.booleans()):
        obj = pb.Object(service=s)
        apply_defaults(obj)
        return obj.service
    return s


@settings(max_examples=2000, deadline=None)
@given(st.composite(_service_msg)())
def test_the_fast_path_takes_only_services_the_rules_accept(svc: pb.Service) -> None:
    """validate() skips the rules for Services of the usual shape: only ever for one
    they have nothing to say about."""
    if validation._plain_service(svc):
        assert list(validation._service(svc)) == []


def test_the_usual_services_take_the_fast_path() -> None:
    assert validation._plain_service(defaulted(service()).service)
    two = service(
        ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    )
    assert validation._plain_service(defaulted(two).service)
    named = service(ports=[{"port": 80, "targetPort": "http"}], internalTrafficPolicy="Local")
    assert validation._plain_service(defaulted(named).service)
