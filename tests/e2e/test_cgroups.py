"""Per-node cgroups: every process (and socket) of a node and its pods is in the node's cgroup,
a BPF program attached there sees that node only, and nothing is left after close or a crash."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ebpflb.cluster import (
    ClientError,
    Cluster,
    cleanup_stale,
    connect_errno,
    curl,
    leftovers,
    new_prefix,
    stale_prefixes,
    tcp_request,
)
from ebpflb.cluster.cgroups import (
    AttachedProgram,
    CgroupError,
    attached_programs,
    cgroup2_mounted,
    cgroup2_root,
    cgroup_of,
    cgroup_pids,
    detach_programs,
)
from ebpflb.cluster.netns import Netns, NetnsError, netns_id, netns_path
from ebpflb.harness import EBPFLB, LbCluster, until
from tests.e2e.conftest import child_cluster_process

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests need root (namespaces, cgroups)"),
    pytest.mark.skipif(not cgroup2_mounted(), reason="no cgroup2 file system mounted"),
]

PORT = 9000
ClusterFactory = Callable[..., Cluster]
Attach = Callable[[Path, int], AttachedProgram]

# connect4: refuse (EPERM) connections to one port, let the rest through.
DENY_PORT = r"""
int deny_port(struct bpf_sock_addr *ctx)
{
    /* user_port holds the port in network byte order. */
    return ctx->user_port == DENIED_PORT_BE ? 0 : 1;
}
"""


@pytest.fixture
def deny_connect() -> Iterator[Attach]:
    """Attaches a connect4 program refusing one port to a cgroup; unloads it afterwards.

    Detaching is left to the code under test (close, the leftover sweep)."""
    bcc = pytest.importorskip("bcc")
    loaded: list[Any] = []

    def attach(cgroup: Path, port: int) -> AttachedProgram:
        bpf = bcc.BPF(text=DENY_PORT.encode(), cflags=[f"-DDENIED_PORT_BE={socket.htons(port)}"])
        loaded.append(bpf)
        connect4 = bcc.BPFAttachType.CGROUP_INET4_CONNECT
        fn = bpf.load_func(b"deny_port", bcc.BPF.CGROUP_SOCK_ADDR, attach_type=connect4)
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bcc.BPF.attach_func(fn, fd, connect4)
        finally:
            os.close(fd)
        [prog] = attached_programs(cgroup)
        assert (prog.attach_type, prog.name) == ("cgroup_inet4_connect", "deny_port")
        return prog

    yield attach
    for bpf in loaded:
        bpf.cleanup()


def _as_seen_in_proc(cgroup: Path) -> str:
    """How /proc/PID/cgroup's 0:: line names `cgroup`."""
    return "/" + str(cgroup.relative_to(cgroup2_root()))


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def _program_ids_in_tree() -> set[int]:
    """Ids of every BPF program attached anywhere in the cgroup v2 hierarchy."""
    argv = ["bpftool", "-j", "cgroup", "tree", str(cgroup2_root())]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {p["id"] for cg in json.loads(out or "[]") for p in cg["programs"]}


def test_processes_and_sockets_are_in_their_nodes_cgroup(make_cluster: ClusterFactory) -> None:
    c = make_cluster(2, cgroups=True)
    n0, n1 = c.nodes
    assert c.cgroup is not None and n0.cgroup is not None and n1.cgroup is not None
    a, b = c.add_pod(n0, "a"), c.add_pod(n1, "b")
    servers = [
        c.start_http_server(a, 8080),  # nginx: a master and a worker
        c.start_whoami_server(b, PORT),
        c.start_udp_echo_server(n1, 5353),
    ]
    ours = cgroup_of(os.getpid())
    want = {
        a.netns: _as_seen_in_proc(n0.cgroup),
        n0.netns: _as_seen_in_proc(n0.cgroup),
        b.netns: _as_seen_in_proc(n1.cgroup),
        n1.netns: _as_seen_in_proc(n1.cgroup),
        c.external.netns: ours,  # not a node: stays where the cluster's owner is
        c.underlay: ours,
    }
    for name, cgroup in want.items():
        for host_mounts in (False, True):
            done = c.ns(name).run(["cat", "/proc/self/cgroup"], host_mounts=host_mounts)
            assert f"0::{cgroup}\n" in done.stdout, (name, host_mounts)
    for server in servers:
        assert cgroup_of(server.process.pid) == want[server.netns]
    # Each node's cgroup holds only processes of the node and of its own pods.
    for node in c.nodes:
        assert node.cgroup is not None
        spaces = [node.netns, *(p.netns for p in c.pods if p.node == node.name)]
        allowed = {netns_id(netns_path(n)) for n in spaces}
        pids = cgroup_pids(node.cgroup)
        assert pids
        assert {netns_id(f"/proc/{pid}/ns/net") for pid in pids} <= allowed
    assert len(cgroup_pids(n0.cgroup)) >= 2  # nginx's worker followed its master
    # Sockets are handed over by a helper in the cgroup; its errors come through as they are.
    with pytest.raises(OSError) as here:
        socket.socket(socket.AF_INET, 12345)
    with pytest.raises(OSError) as there:
        c.ns(a).socket(socket.AF_INET, 12345)
    assert there.value.errno == here.value.errno == errno.EINVAL
    with c.ns(a).socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert (s.family, s.type) == (socket.AF_INET, socket.SOCK_DGRAM)
    assert tcp_request(c.ns(a), b.ip, PORT).startswith(f"b {a.ip}:")

    c.close()
    assert not c.cgroup.exists()
    assert leftovers(c.prefix) == []


def test_a_program_on_a_nodes_cgroup_acts_on_that_node_only(
    make_cluster: ClusterFactory, deny_connect: Attach
) -> None:
    c = make_cluster(2, cgroups=True)
    n0, n1 = c.nodes
    assert n0.cgroup is not None and n1.cgroup is not None
    web = c.add_pod(n0, "web")
    near, far = c.add_client_pod(n0), c.add_client_pod(n1)
    c.start_whoami_server(web, PORT)
    url = f"http://{web.ip}:{PORT}/"

    prog = deny_connect(n1.cgroup, PORT)
    # Node 1's pods and the node itself are refused at connect(), whether the
    # socket comes from a process there or is handed over by Netns.socket.
    with pytest.raises(ClientError) as refused:
        tcp_request(c.ns(far), web.ip, PORT)
    assert refused.value.code == errno.EPERM
    assert connect_errno(c.ns(n1), web.ip, PORT) == errno.EPERM
    with pytest.raises(ClientError) as refused:
        curl(c.ns(far), url)
    assert refused.value.code == 7  # curl: failed to connect
    # Node 0 is untouched, and so are other ports from node 1.
    assert tcp_request(c.ns(near), web.ip, PORT).startswith(f"web {near.ip}:")
    assert curl(c.ns(n0), url).startswith("web ")
    assert connect_errno(c.ns(far), web.ip, PORT + 1) == errno.ECONNREFUSED

    assert detach_programs(n1.cgroup) == [prog]
    assert attached_programs(n1.cgroup) == []
    assert tcp_request(c.ns(far), web.ip, PORT).startswith(f"web {far.ip}:")

    # A program still attached at close is detached with its cgroup.
    again = deny_connect(n1.cgroup, PORT)
    assert str(again) in leftovers(c.prefix)
    c.close()
    assert again.id not in _program_ids_in_tree()
    assert not n1.cgroup.exists()
    assert leftovers(c.prefix) == []


def test_sweep_removes_a_crashed_clusters_cgroup_and_programs(deny_connect: Attach) -> None:
    with child_cluster_process(cgroups=True) as (proc, prefix):
        cgroup = cgroup2_root() / prefix
        prog = deny_connect(cgroup / "node0", PORT)
        proc.kill()
        proc.wait(timeout=60)
        left = leftovers(prefix)
        assert f"cgroup {cgroup}" in left
        assert str(prog) in left
        assert any("nginx" in item for item in left)  # outlived its parent, in the cgroup
        assert cgroup_pids(cgroup)
        assert prefix in stale_prefixes()
        # A parallel session's stale sweep may have got to part of it first.
        assert set(cleanup_stale(prefix)) <= set(left)
        assert not cgroup.exists()
        assert prog.id not in _program_ids_in_tree()
        assert leftovers(prefix) == []


def test_an_existing_cgroup_is_a_clear_error() -> None:
    prefix = new_prefix()
    taken = cgroup2_root() / prefix
    taken.mkdir()
    try:
        with pytest.raises(CgroupError, match=f"cgroup {taken} exists already"):
            Cluster(1, prefix=prefix, cgroups=True)
    finally:
        cleanup_stale(prefix)  # a prefix's sweep takes whatever carries it: the cgroup too
    assert not taken.exists()


def test_a_missing_cgroup_is_a_clear_error(make_cluster: ClusterFactory) -> None:
    c = make_cluster(1, cgroups=True, external=False)
    assert c.cgroup is not None
    missing = c.cgroup / "missing"
    ns = Netns(c.node(0).netns, c.prefix, cgroup=missing)
    done = ns.run(["true"])
    assert done.returncode != 0 and f"{missing}/cgroup.procs" in done.stderr
    with pytest.raises(NetnsError, match=f"socket maker in .*{missing}/cgroup.procs"):
        ns.socket()


def test_agents_run_in_their_nodes_cgroup() -> None:
    with LbCluster(2, cgroups=True) as lb:
        for node in lb.cluster.nodes:
            assert node.cgroup is not None
            assert "--socket-lb-cgroup" not in lb.agent_argv(node)
            agent = lb.agents[node.name]
            # The pid is the agent's once the cgroup shell and nsenter have exec'd it.
            until(lambda a=agent: _argv(a.pid)[: len(EBPFLB) + 1] == [*EBPFLB, "agent"])
            assert cgroup_of(agent.pid) == _as_seen_in_proc(node.cgroup)
            assert agent.poll() is None, lb.agent_log(node)
        prefix, cgroup = lb.prefix, lb.cluster.cgroup
    assert cgroup is not None and not cgroup.exists()
    assert leftovers(prefix) == []


def test_socket_lb_hands_each_agent_its_nodes_cgroup() -> None:
    with LbCluster(2, start_agents=False, socket_lb=True) as lb:
        for node in lb.cluster.nodes:
            argv = lb.agent_argv(node)
            i = argv.index("--socket-lb-cgroup")
            assert argv[i + 1] == str(node.cgroup)
            assert node.cgroup is not None and node.cgroup.parent == lb.cluster.cgroup
        prefix = lb.prefix
    assert leftovers(prefix) == []
