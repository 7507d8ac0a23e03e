"""Socket-level load balancing (bpf/sock.h) with real sockets: processes in a cgroup dial a
VIP and reach a backend pod directly, with no tc program attached anywhere (so nothing but
the cgroup programs can have translated them), and read the VIP back as their peer."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpflb.cluster.cgroups import attached_programs, detach_programs
from ebpflb.datapath import _libbpf
from ebpflb.datapath.compile import SOCK_ATTACH_TYPES
from ebpflb.datapath.loader import Datapath, DatapathError, remove_pins
from ebpflb.datapath.programmer import Backend, Frontend
from ebpflb.datapath.structs import be32_to_ip
from tests.datapath.conftest import TEST_CONFIG, Lab, new_pin_dir
from tests.datapath.netns import Node, node
from tests.datapath.scripts import SERVER

CGROUP2 = Path("/sys/fs/cgroup/unified")
VIP, DNS_VIP, EMPTY_VIP, STICKY_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.99", "10.96.0.77"

# argv: JSON list of [kind, host, port]; prints a JSON list of
# {"peer": [addr, port] the socket reports, "from": the datagram's source (UDP), "saw": the
#  address the server saw (whoami line), "error": errno name or None}.
CLIENT = """
import errno, json, socket, sys
def run(kind, host, port):
    out = {"peer": None, "from": None, "saw": None, "error": None}
    try:
        if kind == "tcp":
            with socket.create_connection((host, port), timeout=2) as s:
                out["peer"] = s.getpeername()
                s.sendall(b"x")
                s.shutdown(socket.SHUT_WR)
                got = b""
                while d := s.recv(4096):
                    got += d
        elif kind == "udp-connected":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.connect((host, port))
                out["peer"] = s.getpeername()
                s.send(b"x")
                got = s.recv(4096)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(b"x", (host, port))
                got, src = s.recvfrom(4096)
                out["from"] = src
        out["saw"] = got.split(b"\\n")[0].decode()
    except OSError as e:
        out["error"] = errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
    return out
print(json.dumps([run(*c) for c in json.loads(sys.argv[1])]))
"""


def attached_names(cgroup: Path) -> Counter[str]:
    """Names of the programs attached to the cgroup itself."""
    return Counter(p.name for p in attached_programs(cgroup))


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v2 at {CGROUP2}")
    path = CGROUP2 / f"ebpflb-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        detach_programs(path)  # whatever a failed test left attached
        path.rmdir()


@pytest.fixture
def pods() -> Iterator[Node]:
    """A node with a client pod and two backends running whoami servers (TCP 8080, UDP 5353);
    no program on any veth."""
    with node() as n:
        n.add_pod("c", 5)
        for name, host in (("b0", 21), ("b1", 22)):
            n.add_pod(name, host)
            n.start(name, SERVER, "whoami", "tcp:8080", "udp:5353")
        yield n


def dial(n: Node, calls: list[tuple[str, str, int]], cgroup: Path | None) -> list[dict]:
    """Run the client in the client pod, as a member of cgroup (moved there before it enters
    the namespace: `ip netns exec` hides /sys/fs/cgroup), or of none of ours."""
    netns = ["ip", "netns", "exec", n.pods["c"].ns, sys.executable, "-c", CLIENT]
    argv = [*netns, json.dumps(calls)]
    if cgroup is not None:
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(done.stdout))


def frontends(n: Node) -> list[Frontend]:
    b0, b1 = n.pods["b0"].ip, n.pods["b1"].ip
    return [
        Frontend(VIP, 80, "TCP", (Backend(b0, 8080), Backend(b1, 8080))),
        Frontend(DNS_VIP, 53, "UDP", (Backend(b0, 5353), Backend(b1, 5353))),
        Frontend(EMPTY_VIP, 80, "TCP", ()),
        Frontend(STICKY_VIP, 80, "TCP", (Backend(b0, 8080),), affinity_timeout=60),
    ]


def test_connect_and_datagrams_reach_backends_and_read_back_as_the_vip(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    lab.sync(*frontends(pods))
    lab.dp.attach_cgroup(cgroup)
    client = pods.pods["c"].ip
    backends = {pods.pods["b0"].ip, pods.pods["b1"].ip}

    calls = [("tcp", VIP, 80)] * 30 + [("udp-connected", DNS_VIP, 53)] * 10
    calls += [("udp", DNS_VIP, 53)] * 20
    results = dial(pods, calls, cgroup)

    # Every call answered, by a backend that saw the client itself (no NAT on any packet).
    assert [r["error"] for r in results] == [None] * len(calls)
    assert {r["saw"] for r in results} == {client}
    tcp, connected, datagrams = results[:30], results[30:40], results[40:]
    assert {tuple(r["peer"]) for r in tcp} == {(VIP, 80)}
    assert {tuple(r["peer"]) for r in connected} == {(DNS_VIP, 53)}
    assert {tuple(r["from"]) for r in datagrams} == {(DNS_VIP, 53)}

    # The ways back of closed connected sockets are gone (sock_release4); an unconnected
    # socket's stay for the LRU (it may have sent to several VIPs). 20 sockets, both backends.
    ways = list(lab.dp.maps.sock_revnat.items())
    assert len(ways) == 20
    assert {be32_to_ip(k.addr) for k, _ in ways} == backends
    assert {(be32_to_ip(v.vip), k.proto) for k, v in ways} == {(DNS_VIP, 17)}
    c = lab.counters()
    assert c["sock_xlate"] == len(calls)
    # getpeername on 40 sockets, recvfrom on 20 (and on the connected ones' recv: none)
    assert c["sock_revnat"] >= len(calls)
    assert c["packets"] == 0  # no tc program saw a packet: none is attached


def test_left_to_tc_without_backends_with_affinity_and_outside_the_cgroup(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    lab.sync(*frontends(pods))
    lab.dp.attach_cgroup(cgroup)
    inside = dial(pods, [("tcp", EMPTY_VIP, 80), ("tcp", STICKY_VIP, 80)], cgroup)
    outside = dial(pods, [("tcp", VIP, 80)], None)
    # Not translated: with no tc program here the node cannot route the VIP.
    for r in [*inside, *outside]:
        assert r["error"] in {"EHOSTUNREACH", "ENETUNREACH", "timeout"}, r
    assert lab.counters()["sock_xlate"] == 0
    assert list(lab.dp.maps.sock_revnat.items()) == []


def test_attach_is_idempotent_replaces_an_older_datapath_and_detaches(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    lab.dp.attach_cgroup(cgroup)
    lab.dp.attach_cgroup(cgroup)  # a restarted agent: the same pinned programs
    assert attached_names(cgroup) == Counter(dict.fromkeys(SOCK_ATTACH_TYPES, 1))

    # Another datapath (an upgrade: other programs) takes the hooks over in place.
    pin_dir = new_pin_dir()
    other = Datapath(pin_dir, TEST_CONFIG)
    try:
        other.attach_cgroup(cgroup)
        assert attached_names(cgroup) == Counter(dict.fromkeys(SOCK_ATTACH_TYPES, 1))
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ids = {_libbpf.cgroup_prog_ids(fd, t)[0] for t in SOCK_ATTACH_TYPES.values()}
        finally:
            os.close(fd)
        theirs = {_libbpf.prog_info(other._progs[name]).id for name in SOCK_ATTACH_TYPES}
        assert ids == theirs

        # Its programs work with its maps: the client is balanced by `other` now.
        other.maps.clear()
        from ebpflb.datapath.programmer import Programmer

        Programmer(other).sync(frontends(pods))
        assert [r["error"] for r in dial(pods, [("tcp", VIP, 80)], cgroup)] == [None]
        assert other.counters()["sock_xlate"] == 1

        other.detach_cgroup(cgroup)
        assert attached_names(cgroup) == Counter()
    finally:
        other.close(cleanup=True)
        remove_pins(pin_dir)

    # cleanup detaches what the datapath attached (close(cleanup=True) does this too)
    lab.dp.attach_cgroup(cgroup)
    lab.dp.detach_cgroup(cgroup)
    assert attached_names(cgroup) == Counter()


def test_not_a_cgroup(lab: Lab, tmp_path: Path) -> None:
    with pytest.raises(DatapathError, match="not a cgroup v2 directory"):
        lab.dp.attach_cgroup(tmp_path)
