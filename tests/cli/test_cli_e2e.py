"""The `ebpflb` console script as a user runs it, against a real registry process."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.api

EBPFLB = Path(sys.executable).with_name("ebpflb")


def manifests_dir() -> Path:
    env = os.environ.get("EBPFLB_MANIFESTS")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "manifests"


MANIFESTS = manifests_dir()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def ok(self) -> Run:
        assert self.code == 0, self.err
        assert "Traceback" not in self.err
        return self

    def one_error(self) -> str:
        """The run failed with exactly one line on stderr (no traceback): that line."""
        assert self.code != 0, self.out
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        return lines[0]


def run(addr: str, *args: str, stdin: str | None = None) -> Run:
    env = {**os.environ, "EBPFLB_REGISTRY": addr}
    p = subprocess.run(
        [str(EBPFLB), *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )
    return Run(p.returncode, p.stdout, p.stderr)


def table(text: str) -> list[list[str]]:
    """A kubectl table as rows of cells (header included); cells never contain spaces here."""
    return [line.split() for line in text.splitlines()]


def pod(name: str, ip: str, labels: dict[str, str], ready: bool = True) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": "node-a",
                "containers": [
                    {"name": "web", "ports": [{"name": "http-web-svc", "containerPort": 8080}]}
                ],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": str(ready)}],
            },
        }
    )


SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector:
    app: {name}
  ports:
  - port: {port}
"""


def test_the_console_script_is_installed() -> None:
    assert EBPFLB.is_file(), f"{EBPFLB}: run make setup"


def test_apply_every_users_manifest(registry_addr: str) -> None:
    expected = {
        "my-service.yaml": ["service/my-service created"],
        "nginx-named-port.yaml": ["pod/nginx created", "service/nginx-service created"],
        "nodeport.yaml": ["service/web-nodeport created"],
        "udp-dns.yaml": ["service/dns created"],
    }
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert [f.name for f in files] == sorted(expected)
    for f in files:
        r = run(registry_addr, "apply", "-f", str(f)).ok()
        assert r.out.splitlines() == expected[f.name]
        assert r.err == ""
    # The whole folder again: nothing changed.
    r = run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    assert r.out.splitlines() == [
        line.replace("created", "unchanged") for f in files for line in expected[f.name]
    ]


def test_get_services(registry_addr: str) -> None:
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    r = run(registry_addr, "get", "svc").ok()
    lines = r.out.splitlines()
    assert re.fullmatch(r"NAME {12}TYPE {8}CLUSTER-IP +EXTERNAL-IP   PORT\(S\) {9}AGE", lines[0]), (
        lines[0]
    )
    rows = {row[0]: row for row in table(r.out)[1:]}
    assert sorted(rows) == ["dns", "my-service", "nginx-service", "web-nodeport"]
    assert rows["dns"][1:5] == ["ClusterIP", "10.96.0.10", "<none>", "53/UDP,53/TCP"]
    assert rows["web-nodeport"][1] == "NodePort"
    assert rows["web-nodeport"][4] == "80:30080/TCP"
    assert rows["my-service"][4] == "80/TCP"
    for row in rows.values():
        assert ipaddress.ip_address(row[2]) in ipaddress.ip_network("10.96.0.0/12")
        assert re.fullmatch(r"\d+s", row[5])
    # Every row is aligned under the header.
    for column in ("TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"):
        at = lines[0].index(column)
        assert all(line[at - 3 : at] == "   " and line[at] != " " for line in lines[1:])

    wide = table(run(registry_addr, "get", "services", "-o", "wide").ok().out)
    assert wide[0][-1] == "SELECTOR"
    assert {row[0]: row[-1] for row in wide[1:]}["dns"] == "k8s-app=dns"

    everywhere = table(run(registry_addr, "get", "svc", "-A").ok().out)
    assert everywhere[0][:2] == ["NAMESPACE", "NAME"]
    assert {row[0] for row in everywhere[1:]} == {"default"}

    one = table(run(registry_addr, "get", "service", "dns").ok().out)
    assert [row[0] for row in one] == ["NAME", "dns"]


def test_get_missing_name(registry_addr: str) -> None:
    r = run(registry_addr, "get", "svc", "x")
    assert r.one_error() == 'Error from server (NotFound): services "x" not found'
    assert r.out == ""
    run(registry_addr, "apply", "-f", str(MANIFESTS / "udp-dns.yaml")).ok()
    r = run(registry_addr, "get", "svc", "dns", "x")
    assert r.one_error() == 'Error from server (NotFound): services "x" not found'
    assert [row[0] for row in table(r.out)] == ["NAME", "dns"]


def test_nothing_found(registry_addr: str) -> None:
    r = run(registry_addr, "get", "pods").ok()
    assert (r.out, r.err) == ("", "No resources found in default namespace.\n")
    r = run(registry_addr, "get", "svc", "-n", "prod").ok()
    assert r.err == "No resources found in prod namespace.\n"
    r = run(registry_addr, "get", "nodes").ok()
    assert r.err == "No resources found\n"
    r = run(registry_addr, "get", "svc", "-o", "yaml").ok()
    assert yaml.safe_load(r.out) == {
        "apiVersion": "v1",
        "items": [],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def test_a_bad_document_among_good_ones_applies_none(registry_addr: str, tmp_path: Path) -> None:
    good = (MANIFESTS / "my-service.yaml").read_text()
    bad = SERVICE.format(name="bad", port=0)
    f = tmp_path / "mixed.yaml"
    f.write_text(good + "---\n" + bad + "---\n" + SERVICE.format(name="also-good", port=8080))
    r = run(registry_addr, "apply", "-f", str(f))
    line = r.one_error()
    assert line.startswith('Error from server (Invalid): Service "bad" is invalid: ')
    assert "spec.ports[0].port: Invalid value: 0" in line
    assert r.out == ""
    r = run(registry_addr, "get", "svc").ok()
    assert r.err == "No resources found in default namespace.\n"
    # Across files too: one Apply for everything given.
    (tmp_path / "only-bad.yaml").write_text(bad)
    r = run(
        registry_addr,
        "apply",
        "-f",
        str(MANIFESTS / "my-service.yaml"),
        "-f",
        str(tmp_path / "only-bad.yaml"),
    )
    r.one_error()
    assert "No resources found" in run(registry_addr, "get", "svc").ok().err


def test_a_manifest_that_does_not_parse_sends_nothing(registry_addr: str, tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text(
        SERVICE.format(name="fine", port=80) + "---\napiVersion: v1\nkind: Service\nmetadata: [\n"
    )
    r = run(registry_addr, "apply", "-f", str(f))
    assert r.one_error().startswith(f"error: {f}: not valid YAML or JSON: ")
    g = tmp_path / "wrong.yaml"
    g.write_text(SERVICE.format(name="fine", port=80) + "---\napiVersion: v2\nkind: Service\n")
    r = run(registry_addr, "apply", "-f", str(g))
    assert (
        r.one_error() == f'error: {g}: document 2: apiVersion: Invalid value: "v2": Service is v1'
    )
    assert "No resources found" in run(registry_addr, "get", "svc").ok().err


def test_unknown_fields_warn_and_apply(registry_addr: str) -> None:
    text = SERVICE.format(name="web", port=80) + "  foo: bar\n"
    r = run(registry_addr, "apply", "-f", "-", stdin=text).ok()
    assert r.err == 'Warning: unknown field "spec.foo"\n'
    assert r.out == "service/web created\n"


def test_conflicts_are_one_line(registry_addr: str) -> None:
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    taken = (MANIFESTS / "nodeport.yaml").read_text().replace("web-nodeport", "other-nodeport")
    r = run(registry_addr, "apply", "-f", "-", stdin=taken)
    assert r.one_error().startswith("Error from server (")
    assert "30080" in r.err
    same_ip = (MANIFESTS / "udp-dns.yaml").read_text().replace("name: dns\n", "name: dns2\n", 1)
    r = run(registry_addr, "apply", "-f", "-", stdin=same_ip)
    assert r.one_error().startswith("Error from server (")
    assert "10.96.0.10" in r.err


def test_registry_down(tmp_path: Path) -> None:
    addr = f"unix://{tmp_path}/nothing.sock"
    r = run(addr, "get", "svc")
    assert r.one_error().startswith(f"error: cannot reach the registry at {addr}: ")
    # The flag wins over the environment, before or after the subcommand.
    for args in (["--registry", addr, "get", "svc"], ["get", "svc", "--registry", addr]):
        r = run("unix:///elsewhere.sock", *args)
        assert r.one_error().startswith(f"error: cannot reach the registry at {addr}: ")


def test_dry_run_stores_nothing(registry_addr: str) -> None:
    r = run(registry_addr, "apply", "--dry-run", "-f", str(MANIFESTS / "nodeport.yaml")).ok()
    assert r.out == "service/web-nodeport created (server dry run)\n"
    assert "No resources found" in run(registry_addr, "get", "svc").ok().err


def test_delete(registry_addr: str) -> None:
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    r = run(registry_addr, "delete", "svc", "dns", "my-service").ok()
    assert r.out == 'service "dns" deleted\nservice "my-service" deleted\n'
    r = run(registry_addr, "delete", "service", "dns")
    assert r.one_error() == 'Error from server (NotFound): services "dns" not found'
    r = run(registry_addr, "delete", "-f", str(MANIFESTS / "nginx-named-port.yaml")).ok()
    assert r.out == 'pod "nginx" deleted\nservice "nginx-service" deleted\n'
    r = run(registry_addr, "delete", "-f", str(MANIFESTS / "nginx-named-port.yaml"))
    assert r.code == 1
    where = f'error when deleting "{MANIFESTS / "nginx-named-port.yaml"}"'
    assert r.err.splitlines() == [
        f'Error from server (NotFound): {where}: pods "nginx" not found',
        f'Error from server (NotFound): {where}: services "nginx-service" not found',
    ]
    run(
        registry_addr,
        "delete",
        "-f",
        str(MANIFESTS / "nginx-named-port.yaml"),
        "--ignore-not-found",
    ).ok()
    assert [row[0] for row in table(run(registry_addr, "get", "svc").ok().out)] == [
        "NAME",
        "web-nodeport",
    ]


def test_delete_pod_with_grace_period_leaves_it_terminating(registry_addr: str) -> None:
    run(registry_addr, "apply", "-f", "-", stdin=pod("web-1", "10.244.0.5", {"app": "web"})).ok()
    r = run(registry_addr, "delete", "pod", "web-1", "--grace-period", "300").ok()
    assert r.out == 'pod "web-1" deleted\n'
    rows = table(run(registry_addr, "get", "pods").ok().out)
    assert rows[1][:3] == ["web-1", "1/1", "Terminating"]


def test_endpoints_pods_nodes_and_describe(registry_addr: str) -> None:
    node = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24}
status:
  addresses: [{type: InternalIP, address: 192.168.50.10}]
"""
    pods = [
        pod("web-1", "10.244.0.5", {"app.kubernetes.io/name": "proxy"}),
        pod("web-2", "10.244.0.6", {"app.kubernetes.io/name": "proxy"}),
        pod("web-3", "10.244.0.7", {"app.kubernetes.io/name": "proxy"}, ready=False),
    ]
    stdin = "---\n".join([node, *pods])
    run(registry_addr, "apply", "-f", "-", stdin=stdin).ok()
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()

    rows = {row[0]: row for row in table(run(registry_addr, "get", "endpoints").ok().out)}
    assert rows["NAME"] == ["NAME", "ENDPOINTS", "AGE"]
    assert rows["nginx-service"][1] == "10.244.0.5:8080,10.244.0.6:8080"
    assert rows["web-nodeport"][1] == "10.244.0.5:8080,10.244.0.6:8080"
    assert rows["my-service"][1] == "<none>"
    one = table(run(registry_addr, "get", "ep", "nginx-service").ok().out)
    assert [row[0] for row in one] == ["NAME", "nginx-service"]
    r = run(registry_addr, "get", "ep", "nope")
    assert r.one_error() == 'Error from server (NotFound): endpoints "nope" not found'

    slices = table(run(registry_addr, "get", "endpointslices").ok().out)
    assert slices[0] == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert {tuple(row[1:4]) for row in slices[1:]} == {
        ("IPv4", "8080", "10.244.0.5,10.244.0.6,10.244.0.7")
    }

    pods_table = {
        row[0]: row for row in table(run(registry_addr, "get", "po", "-o", "wide").ok().out)
    }
    assert pods_table["NAME"] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert pods_table["web-1"][1:4] == ["1/1", "Running", "0"]
    assert pods_table["web-3"][1] == "0/1"
    assert pods_table["web-1"][5:] == ["10.244.0.5", "node-a"]
    assert pods_table["nginx"][5:] == ["<none>", "<none>"]

    nodes = table(run(registry_addr, "get", "nodes").ok().out)
    assert nodes[0] == ["NAME", "STATUS", "INTERNAL-IP", "POD-CIDR", "AGE"]
    assert nodes[1][0] == "node-a" and nodes[1][2:4] == ["192.168.50.10", "10.244.0.0/24"]

    text = run(registry_addr, "describe", "service", "web-nodeport").ok().out
    fields = [tuple(re.split(r":\s+", line, maxsplit=1)) for line in text.splitlines()]
    assert fields[:2] == [("Name", "web-nodeport"), ("Namespace", "default")]
    assert ("Selector", "app.kubernetes.io/name=proxy") in fields
    assert ("Type", "NodePort") in fields
    assert ("Port", "http  80/TCP") in fields
    assert ("TargetPort", "http-web-svc/TCP") in fields
    assert ("NodePort", "http  30080/TCP") in fields
    assert ("Endpoints", "10.244.0.5:8080,10.244.0.6:8080") in fields
    assert ("Session Affinity", "None") in fields
    assert ("External Traffic Policy", "Cluster") in fields
    assert ("Internal Traffic Policy", "Cluster") in fields
    # Values start in one column, two spaces after the longest key.
    assert {
        line.index(value) for (key, value), line in zip(fields, text.splitlines(), strict=True)
    } == {len("Internal Traffic Policy:  ")}
    r = run(registry_addr, "describe", "svc", "nope")
    assert r.one_error() == 'Error from server (NotFound): services "nope" not found'


def test_output_formats(registry_addr: str) -> None:
    run(registry_addr, "apply", "-f", str(MANIFESTS)).ok()
    one = yaml.safe_load(run(registry_addr, "get", "svc", "dns", "-o", "yaml").ok().out)
    assert (one["kind"], one["metadata"]["name"], one["spec"]["clusterIP"]) == (
        "Service",
        "dns",
        "10.96.0.10",
    )
    listed = json.loads(run(registry_addr, "get", "svc", "-o", "json").ok().out)
    assert listed["kind"] == "List"
    assert [i["metadata"]["name"] for i in listed["items"]] == [
        "dns",
        "my-service",
        "nginx-service",
        "web-nodeport",
    ]
    r = run(registry_addr, "get", "svc", "-o", "name").ok()
    assert r.out.splitlines() == [
        "service/dns",
        "service/my-service",
        "service/nginx-service",
        "service/web-nodeport",
    ]
    # What get -o yaml prints applies back unchanged.
    r = run(
        registry_addr,
        "apply",
        "-f",
        "-",
        stdin=run(registry_addr, "get", "svc", "-o", "yaml").ok().out,
    ).ok()
    assert r.out.splitlines() == [
        f"{name} unchanged"
        for name in run(registry_addr, "get", "svc", "-o", "name").out.splitlines()
    ]


def test_selector_and_namespaces(registry_addr: str) -> None:
    labelled = SERVICE.format(name="web", port=80).replace(
        "  name: web\n", "  name: web\n  labels: {tier: front}\n"
    )
    run(registry_addr, "apply", "-f", "-", stdin=labelled).ok()
    r = run(
        registry_addr, "apply", "-n", "prod", "-f", "-", stdin=SERVICE.format(name="api", port=80)
    ).ok()
    assert r.out == "service/api created\n"
    assert [
        row[0] for row in table(run(registry_addr, "get", "svc", "-l", "tier=front").ok().out)
    ] == ["NAME", "web"]
    assert "No resources found" in run(registry_addr, "get", "svc", "-l", "tier=back").ok().err
    assert [row[0] for row in table(run(registry_addr, "get", "svc", "-n", "prod").ok().out)] == [
        "NAME",
        "api",
    ]
    rows = table(run(registry_addr, "get", "svc", "-A").ok().out)
    assert [row[:2] for row in rows] == [["NAMESPACE", "NAME"], ["default", "web"], ["prod", "api"]]
    r = run(registry_addr, "get", "svc", "-l", "tier in (front")
    assert r.one_error().startswith("Error from server (")
