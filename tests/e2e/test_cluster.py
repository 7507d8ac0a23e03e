"""The namespace cluster itself: CNI pod networking, the underlay, isolation, clean teardown."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ebpflb.cluster import (
    Cluster,
    Pod,
    Server,
    cleanup_stale,
    connect_errno,
    curl,
    leftovers,
    stale_prefixes,
    tcp_request,
    udp_request,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests need root (network namespaces)"),
]

HTTP_PORT = 8080
UDP_PORT = 5353
WHOAMI_PORT = 9000
NODE_PORT = 30080
OUR_NETWORKS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("192.168.50.0/24"))

ClusterFactory = Callable[..., Cluster]


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    parsed: list[dict[str, Any]] = json.loads(out or "[]")
    return parsed


def _overlaps_ours(dst: str) -> bool:
    if dst == "default":
        return False
    net = ipaddress.ip_network(dst, strict=False)
    return any(net.version == ours.version and net.overlaps(ours) for ours in OUR_NETWORKS)


@dataclass(frozen=True)
class RootState:
    """The root namespace's routes into our address ranges (all tables) and its links."""

    routes: frozenset[str]
    links: frozenset[str]


def root_state() -> RootState:
    routes = frozenset(
        json.dumps(r, sort_keys=True)
        for r in _ip_json("route", "show", "table", "all")
        if _overlaps_ours(str(r.get("dst", "default")))
    )
    links = frozenset(str(link["ifname"]) for link in _ip_json("link", "show"))
    return RootState(routes, links)


@pytest.fixture(scope="module")
def root_baseline() -> RootState:
    """The root namespace before this module's clusters (the cluster fixtures request it)."""
    return root_state()


@dataclass(frozen=True)
class OneNode:
    cluster: Cluster
    web: Pod
    client: Pod
    http: Server
    udp: Server


@dataclass(frozen=True)
class TwoNodes:
    cluster: Cluster
    client: Pod
    far: Pod


@pytest.fixture(scope="module")
def one_node(root_baseline: RootState, make_module_cluster: ClusterFactory) -> OneNode:
    c = make_module_cluster(1)
    web = c.add_pod(0, "web")
    client = c.add_client_pod(0)
    http = c.start_http_server(web, HTTP_PORT)
    udp = c.start_udp_echo_server(web, UDP_PORT)
    return OneNode(c, web, client, http, udp)


@pytest.fixture(scope="module")
def two_nodes(root_baseline: RootState, make_module_cluster: ClusterFactory) -> TwoNodes:
    c = make_module_cluster(2)
    client = c.add_client_pod("node0")
    far = c.add_pod("node1", "far")
    c.start_whoami_server(far, WHOAMI_PORT)
    c.start_udp_echo_server(far, UDP_PORT)
    for node in c.nodes:
        c.start_http_server(node, NODE_PORT)
    return TwoNodes(c, client, far)


# One node


def test_pod_to_pod_http_through_nginx(one_node: OneNode) -> None:
    c = one_node.cluster
    body = curl(c.ns(one_node.client), f"http://{one_node.web.ip}:{HTTP_PORT}/", max_time=5)
    assert body == "web\n"
    assert one_node.http.running


def test_udp_echo_round_trip(one_node: OneNode) -> None:
    c = one_node.cluster
    client = one_node.client
    reply = udp_request(c.ns(client), one_node.web.ip, UDP_PORT, source=(client.ip, 40001))
    assert reply == f"web {client.ip}:40001\n"


def test_pod_is_wired_by_cni(one_node: OneNode) -> None:
    c = one_node.cluster
    node = c.node(0)
    web = one_node.web
    assert (node.pod_cidr, node.gateway, web.node) == ("10.244.0.0/24", "10.244.0.1", "node0")
    assert web.ip.startswith("10.244.0.") and web.ip != node.gateway
    assert web.netns == f"{c.prefix}-node0-web"
    # The pod's default route goes to the bridge's gateway address.
    routes = c.ns(web).ip_json("route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [(node.gateway, "eth0")]
    # The host side of its veth is a hairpin port of cni0 in the node namespace.
    (veth,) = c.ns(node).ip_json("-d", "link", "show", web.host_veth)
    assert veth["master"] == "cni0"
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True
    (bridge,) = c.ns(node).ip_json("addr", "show", "cni0")
    assert [(a["local"], a["prefixlen"]) for a in bridge["addr_info"]] == [(node.gateway, 24)]
    # host-local kept its state in the cluster's work directory, not /var/lib/cni.
    assert (c.workdir / "cni" / "node0" / f"{c.prefix}-node0" / web.ip).is_file()
    assert not Path("/var/lib/cni/networks", f"{c.prefix}-node0").exists()


def test_node_has_forwarding_and_no_default_route(one_node: OneNode) -> None:
    c = one_node.cluster
    node_ns = c.ns(c.node(0))
    assert node_ns.sysctl("net.ipv4.ip_forward") == "1"
    assert node_ns.ip_json("route", "show", "default") == []


def test_processes_run_in_the_namespace(one_node: OneNode) -> None:
    c = one_node.cluster
    node = c.node(0)
    for host_mounts in (False, True):
        done = c.ns(node).run(["ip", "-br", "addr", "show", "eth0"], host_mounts=host_mounts)
        assert done.returncode == 0 and f"{node.ip}/24" in done.stdout
        env = c.ns(node).run(["env"], host_mounts=host_mounts).stdout
        assert f"EBPFLB_CLUSTER={c.prefix}" in env.splitlines()


@pytest.mark.skipif(
    " /sys/fs/bpf bpf " not in Path("/proc/mounts").read_text(),
    reason="no bpffs mounted at /sys/fs/bpf",
)
def test_host_mounts_keeps_the_bpffs(one_node: OneNode) -> None:
    # `ip netns exec` mounts a fresh /sys, hiding the host's bpffs; an agent
    # that pins maps must be started with host_mounts=True.
    ns = one_node.cluster.ns(one_node.cluster.node(0))
    argv = ["stat", "-f", "-c", "%T", "/sys/fs/bpf"]
    assert ns.run(argv, host_mounts=True).stdout.strip() == "bpf_fs"
    assert ns.run(argv).stdout.strip() != "bpf_fs"


# Two nodes


def test_pod_reaches_pod_on_other_node_with_its_own_ip(two_nodes: TwoNodes) -> None:
    c, client, far = two_nodes.cluster, two_nodes.client, two_nodes.far
    assert (client.node, far.node) == ("node0", "node1")
    seen = curl(c.ns(client), f"http://{far.ip}:{WHOAMI_PORT}/")
    name, peer = seen.split()
    assert (name, peer.rsplit(":", 1)[0]) == ("far", client.ip)
    # Raw TCP and UDP the same way.
    assert tcp_request(c.ns(client), far.ip, WHOAMI_PORT).startswith(f"far {client.ip}:")
    assert udp_request(c.ns(client), far.ip, UDP_PORT).startswith(f"far {client.ip}:")


def test_nodes_route_to_each_others_pod_cidrs(two_nodes: TwoNodes) -> None:
    c = two_nodes.cluster
    for node in c.nodes:
        other = c.node(1 - node.index)
        (route,) = c.ns(node).ip_json("route", "show", other.pod_cidr)
        assert (route["gateway"], route["dev"]) == (other.ip, "eth0")
        assert node.ip == f"192.168.50.{10 + node.index}"


def test_external_reaches_node_ips_but_not_pods(two_nodes: TwoNodes) -> None:
    c = two_nodes.cluster
    ext = c.ns(c.external)
    assert c.external.ip == "192.168.50.200"
    for node in c.nodes:
        assert curl(ext, f"http://{node.ip}:{NODE_PORT}/") == f"{node.name}\n"
    for pod in (two_nodes.client, two_nodes.far):
        assert connect_errno(ext, pod.ip, WHOAMI_PORT) == errno.ENETUNREACH
    routes = ext.ip_json("route", "show", "table", "all")
    assert not [r for r in routes if str(r["dst"]).startswith("10.")]
    assert ext.ip_json("route", "show", "default") == []


def test_root_namespace_untouched(two_nodes: TwoNodes, root_baseline: RootState) -> None:
    c = two_nodes.cluster
    now = root_state()
    # No route into 10.244.0.0/16 or 192.168.50.0/24 beyond what was there before.
    assert now.routes <= root_baseline.routes
    new_links = now.links - root_baseline.links
    assert "cni0" not in now.links
    assert not [n for n in new_links if n.startswith(("veth", c.prefix))]
    # A veth from the root namespace into ours would give ours an nsid here.
    ours = [n for n in _ip_json("netns", "list") if n["name"].startswith(c.prefix)]
    assert sorted(n["name"] for n in ours) == sorted(c.namespaces)
    assert [n for n in ours if "id" in n] == []


# Teardown


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def test_close_leaves_nothing(make_cluster: ClusterFactory) -> None:
    c = make_cluster(2)
    web = c.add_pod(0, "web")
    far = c.add_pod(1, "far")
    servers = [
        c.start_http_server(web, HTTP_PORT),
        c.start_udp_echo_server(far, UDP_PORT),
        c.start_whoami_server(far, WHOAMI_PORT),
        c.start_http_server(c.node(1), NODE_PORT),
    ]
    # A process the cluster did not start must go too.
    stray = subprocess.Popen(["ip", "netns", "exec", far.netns, "sleep", "600"])
    try:
        prefix, workdir = c.prefix, c.workdir
        assert leftovers(prefix)
        c.close()
        assert leftovers(prefix) == []
        assert not workdir.exists()
        assert not any(s.running for s in servers)
        assert stray.wait(timeout=30) is not None
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        c.close()  # idempotent
    finally:
        if _alive(stray):
            stray.kill()
            stray.wait()


def test_close_after_error_inside_with(make_cluster: ClusterFactory) -> None:
    prefix = ""
    with pytest.raises(RuntimeError, match="boom"), make_cluster(1) as c:
        prefix = c.prefix
        pod = c.add_pod(0, "web")
        c.start_http_server(pod, HTTP_PORT)
        raise RuntimeError("boom")
    assert leftovers(prefix) == []


def test_remove_pod_releases_address_and_veth(make_cluster: ClusterFactory) -> None:
    c = make_cluster(1)
    node = c.node(0)
    keep = c.add_pod(node, "keep")
    gone = c.add_pod(node, "gone")
    c.start_http_server(gone, HTTP_PORT)
    ipam = c.workdir / "cni" / "node0" / f"{c.prefix}-node0"
    assert (ipam / gone.ip).is_file()
    c.remove_pod(gone)
    assert not (ipam / gone.ip).exists()
    assert (ipam / keep.ip).is_file()
    assert gone.netns not in c.namespaces
    assert not Path("/run/netns", gone.netns).exists()
    links = [link["ifname"] for link in c.ns(node).ip_json("link", "show")]
    assert gone.host_veth not in links and keep.host_veth in links
    assert [p.name for p in c.pods] == ["keep"]


def _wait_exit(proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    proc.wait(timeout=timeout)
    return proc.returncode


def test_sigterm_closes_the_cluster(child_cluster: tuple[subprocess.Popen[str], str]) -> None:
    proc, prefix = child_cluster
    assert any(item.startswith("process") for item in leftovers(prefix))
    proc.send_signal(signal.SIGTERM)
    _wait_exit(proc)
    assert "Terminated: terminated by SIGTERM" in (proc.stderr.read() if proc.stderr else "")
    assert leftovers(prefix) == []


def test_cleanup_stale_after_sigkill(child_cluster: tuple[subprocess.Popen[str], str]) -> None:
    proc, prefix = child_cluster
    assert prefix not in stale_prefixes()  # its owner is alive
    proc.kill()
    _wait_exit(proc)
    left = leftovers(prefix)
    assert any(item.startswith("netns") for item in left)
    assert any("nginx" in item for item in left)  # nginx outlives its parent's SIGKILL
    assert prefix in stale_prefixes()
    # A parallel session's stale sweep may have got to part of it first.
    assert set(cleanup_stale(prefix)) <= set(left)
    assert leftovers(prefix) == []
