"""A dozen broken manifests: each is refused with one line naming the field, and nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli_e2e import MANIFESTS, run

pytestmark = pytest.mark.api

SVC = """apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
{spec}"""


def svc(name: str, spec: str) -> str:
    return SVC.format(name=name, spec="\n".join("  " + line for line in spec.strip().splitlines()))


BROKEN = [
    ("port-0", svc("p0", "ports:\n- port: 0"), "spec.ports[0].port: Invalid value: 0"),
    (
        "port-70000",
        svc("p70k", "ports:\n- port: 70000"),
        "spec.ports[0].port: Invalid value: 70000",
    ),
    (
        "duplicate-node-port",
        svc("dup-np", "type: NodePort\nports:\n- port: 80\n  nodePort: 30080"),
        "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated",
    ),
    (
        "cluster-ip-outside-range",
        svc("outside", "clusterIP: 10.0.0.1\nports:\n- port: 80"),
        'spec.clusterIP: Invalid value: "10.0.0.1": provided IP is not in the valid range',
    ),
    (
        "cluster-ip-taken",
        svc("taken", "clusterIP: 10.96.0.10\nports:\n- port: 80"),
        'spec.clusterIP: Invalid value: "10.96.0.10": provided IP is already allocated',
    ),
    (
        "unknown-protocol",
        svc("proto", "ports:\n- port: 80\n  protocol: FOO"),
        'spec.ports[0].protocol: Unsupported value: "FOO"',
    ),
    (
        "sctp",
        svc("sctp", "ports:\n- port: 80\n  protocol: SCTP"),
        'spec.ports[0].protocol: Unsupported value: "SCTP"',
    ),
    (
        "invalid-name",
        svc("My_Service", "ports:\n- port: 80"),
        'metadata.name: Invalid value: "My_Service"',
    ),
    (
        "target-port-name-too-long",
        svc("longname", "ports:\n- port: 80\n  targetPort: a-very-long-port-name"),
        'spec.ports[0].targetPort: Invalid value: "a-very-long-port-name"',
    ),
    (
        "duplicate-port-names",
        svc("dupname", "ports:\n- name: web\n  port: 80\n- name: web\n  port: 81"),
        'spec.ports[1].name: Duplicate value: "web"',
    ),
    (
        "node-port-on-cluster-ip",
        svc("np-cip", "ports:\n- port: 80\n  nodePort: 30123"),
        "spec.ports[0].nodePort: Forbidden",
    ),
    (
        "bad-session-affinity",
        svc("aff", "sessionAffinity: Sticky\nports:\n- port: 80"),
        'spec.sessionAffinity: Unsupported value: "Sticky"',
    ),
    (
        "load-balancer-type",
        svc("lb", "type: LoadBalancer\nports:\n- port: 80"),
        'spec.type: Unsupported value: "LoadBalancer"',
    ),
    ("port-not-a-number", svc("nan", "ports:\n- port: http"), "port"),
    (
        "missing-name",
        "apiVersion: v1\nkind: Service\nspec:\n  ports:\n  - port: 80\n",
        "metadata.name: Required value",
    ),
]


@pytest.mark.parametrize(
    ("manifest", "needle"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_manifest_is_refused_naming_the_field(
    registry_addr: str, tmp_path: Path, manifest: str, needle: str
) -> None:
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    before = run(registry_addr, "get", "svc", "-o", "yaml").ok().out
    f = tmp_path / "broken.yaml"
    f.write_text(manifest)
    line = run(registry_addr, "apply", "-f", str(f)).one_error()
    assert needle in line, line
    assert run(registry_addr, "get", "svc", "-o", "yaml").ok().out == before
