"""Socket-level load balancing (bpf/sock.h) with real sockets: processes in a cgroup dial a
VIP and reach a backend pod directly, with no tc program attached anywhere (so nothing but
the cgroup programs can have translated them), and read the VIP back as their peer. A
connected socket's way back lives in its own storage (sock_peer), an unconnected UDP
socket's in the LRU map sock_revnat."""

from __future__ import annotations

import contextlib
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
from ebpflb.datapath.compile import (
    CGROUP_INET_SOCK_RELEASE,
    RETIRED_SOCK_PROGRAMS,
    SOCK_ATTACH_TYPES,
)
from ebpflb.datapath.loader import Datapath, DatapathError, remove_pins
from ebpflb.datapath.programmer import Backend, Frontend, Programmer
from ebpflb.datapath.structs import SockKey, SockValue, be32_to_ip, ip_to_be32, port_to_be16
from tests.datapath import netns
from tests.datapath.conftest import SOCK_LB_HOOKS, TEST_CONFIG, Lab, map_id, new_pin_dir
from tests.datapath.netns import Node, node
from tests.datapath.scripts import SERVER
from tests.datapath.variant import variant_bpf_dir

CGROUP2 = Path("/sys/fs/cgroup/unified")
VIP, DNS_VIP, EMPTY_VIP, STICKY_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.99", "10.96.0.77"

# argv: JSON list of [kind, host, port] or, for udp-connected, [kind, host, port, then]:
# [[host, port]...] the socket connects to next, one after the other; prints a JSON list of
# {"peer": [addr, port] the socket reports, "from": the datagram's source (UDP), "saw": the
#  address the server saw (whoami line), "then": [{"peer", "from"}] of each later connect,
#  "error": errno name or None}.
CLIENT = """
import errno, json, socket, sys
def exchange(s):
    s.send(b"x")
    got, src = s.recvfrom(4096)
    return got, src
def run(kind, host, port, then=()):
    out = {"peer": None, "from": None, "saw": None, "then": [], "error": None}
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
                got, out["from"] = exchange(s)
                for addr in then:
                    s.connect(tuple(addr))
                    peer = s.getpeername()
                    out["then"].append({"peer": peer, "from": exchange(s)[1]})
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
    assert {tuple(r["from"]) for r in connected} == {(DNS_VIP, 53)}
    assert {tuple(r["from"]) for r in datagrams} == {(DNS_VIP, 53)}

    # Connected sockets kept their way back in their own storage, not in sock_revnat: it
    # holds only the unconnected ones' (left to the LRU: one socket may have sent to several
    # VIPs). 20 sockets, both backends.
    ways = list(lab.dp.maps.sock_revnat.items())
    assert len(ways) == 20
    assert {be32_to_ip(k.addr) for k, _ in ways} == backends
    assert {(be32_to_ip(v.vip), k.proto) for k, v in ways} == {(DNS_VIP, 17)}
    c = lab.counters()
    assert c["sock_xlate"] == len(calls)
    # getpeername on 40 sockets, recvfrom on 30
    assert c["sock_revnat"] == 70
    assert c["errors"] == 0
    assert c["packets"] == 0  # no tc program saw a packet: none is attached


def test_with_tc_programs_and_a_rebuilt_reply_filter(lab: Lab, pods: Node, cgroup: Path) -> None:
    """from_pod and to_pod on every pod veth, the reply filter rebuilt: the packets of the
    connections socket LB sent to the backends skip the reverse lookup (those from the
    backends: the client's fail the address filter first), and a flow the tc path balances
    (ClientIP affinity) still has its replies translated, before and after another pass."""
    lab.sync(*frontends(pods))
    lab.dp.attach_cgroup(cgroup)
    veths = [pods.ifindex(pod.host_veth) for pod in pods.pods.values()]
    with netns.inside(pods.ns):
        for ifindex in veths:
            lab.dp.attach(ifindex, "ingress")
            lab.dp.attach(ifindex, "egress")
    try:
        lab.dp.gc()
        calls = [("tcp", VIP, 80)] * 10 + [("tcp", STICKY_VIP, 80)] * 3
        first = dial(pods, calls, cgroup)
        lab.dp.gc()
        results = first + dial(pods, calls, cgroup)
        assert [r["error"] for r in results] == [None] * len(results)
        assert {r["saw"] for r in results} == {pods.pods["c"].ip}
        assert [tuple(r["peer"]) for r in results] == [(c[1], 80) for c in calls] * 2
        c = lab.counters()
        assert c["sock_xlate"] == 20 and c["dnat"] >= 6 and c["errors"] == 0
        assert c["rev_nat"] >= 6  # at least each sticky connection's SYN-ACK
        assert c["rev_skipped"] >= 20  # at least each socket-LB connection's SYN-ACK
    finally:
        with netns.inside(pods.ns):
            for ifindex in veths:
                lab.dp.detach(ifindex, "ingress")
                lab.dp.detach(ifindex, "egress")


def test_a_udp_socket_connected_again_elsewhere_is_not_translated(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    """Connected to the VIP, then to each backend's own address (one of them the backend it
    was given): the socket's storage no longer speaks for it, its peer and its datagrams'
    source are the real ones."""
    lab.sync(*frontends(pods))
    lab.dp.attach_cgroup(cgroup)
    plain = [[pods.pods[b].ip, 5353] for b in ("b0", "b1")]
    results = dial(pods, [("udp-connected", DNS_VIP, 53, plain)] * 4, cgroup)
    assert [r["error"] for r in results] == [None] * 4
    for r in results:
        assert (tuple(r["peer"]), tuple(r["from"])) == ((DNS_VIP, 53), (DNS_VIP, 53))
        for addr, then in zip(plain, r["then"], strict=True):
            assert then == {"peer": addr, "from": addr}
    assert lab.counters()["sock_xlate"] == 4
    assert list(lab.dp.maps.sock_revnat.items()) == []


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


# Sockets kept open across a change of datapath. argv: JSON list of [kind, host, port]
# (tcp or udp-connected). Prints a JSON list of {"peer", "cookie"} once connected, then
# for each line read: a JSON list of {"peer", "from": a datagram's source (UDP)}.
HOLDER = """
import json, socket, sys
SO_COOKIE = 57
socks = []
for kind, host, port in json.loads(sys.argv[1]):
    s = socket.socket(type=socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, port))
    socks.append((kind, s))
def report(first):
    out = []
    for kind, s in socks:
        r = {"peer": s.getpeername()}
        if first:
            r["cookie"] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
        elif kind != "tcp":
            s.send(b"x")
            r["from"] = s.recvfrom(4096)[1]
        out.append(r)
    print(json.dumps(out), flush=True)
report(True)
for _ in sys.stdin:
    report(False)
"""


class Holder:
    """HOLDER's process: report() reads what its sockets tell (the first time: as they
    were when connected)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.asked = False

    def report(self) -> list[dict]:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.asked:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.asked = True
        line = self.proc.stdout.readline()
        assert line, "the holder died"
        return list(json.loads(line))


@contextlib.contextmanager
def holding(n: Node, socks: list[tuple[str, str, int]], cgroup: Path) -> Iterator[Holder]:
    """HOLDER running in the client pod as a member of cgroup (see dial)."""
    netns = ["ip", "netns", "exec", n.pods["c"].ns, sys.executable, "-c", HOLDER]
    argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *netns]
    proc = subprocess.Popen(
        [*argv, json.dumps(socks)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield Holder(proc)
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes


def test_sockets_connected_before_a_migration_keep_reading_the_vip(
    pods: Node, cgroup: Path, tmp_path: Path
) -> None:
    """The new programs of a migration (another conntrack layout) are handed the very
    sock_peer map: a TCP and a connected UDP socket connected by the old ones still read
    the VIP as their peer, and the UDP one its datagrams' source."""
    pin_dir = new_pin_dir()
    try:
        old = Datapath(pin_dir, TEST_CONFIG)
        Programmer(old).sync(frontends(pods))
        old.attach_cgroup(cgroup)
        peer_map = map_id(pin_dir / "sock_peer")
        old.close()
        pin_retired_program(pin_dir)
        with holding(pods, [("tcp", VIP, 80), ("udp-connected", DNS_VIP, 53)], cgroup) as h:
            assert [r["peer"] for r in h.report()] == [[VIP, 80], [DNS_VIP, 53]]
            new = Datapath(pin_dir, TEST_CONFIG, bpf_dir=variant_bpf_dir(tmp_path / "bpf"))
            try:
                assert new.layout["conntrack"] != old.layout["conntrack"]  # migrated
                assert map_id(pin_dir / "sock_peer") == peer_map
                assert not (pin_dir / "sock_release4").exists()
                new.attach_cgroup(cgroup)  # what the agent does at start
                before = new.counters()["sock_revnat"]
                tcp, udp = h.report()
                assert tcp == {"peer": [VIP, 80]}
                assert udp == {"peer": [DNS_VIP, 53], "from": [DNS_VIP, 53]}
                assert new.counters()["sock_revnat"] - before == 3  # the new programs did
            finally:
                new.close(cleanup=True)
    finally:
        remove_pins(pin_dir)


def test_a_connected_socket_without_storage_reads_its_sock_revnat_entry(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    """A socket an older datapath connected has its way back in sock_revnat (copied there
    by the migration), none in its storage: getpeername still finds it."""
    lab.dp.attach_cgroup(cgroup)
    b0 = pods.pods["b0"].ip
    with holding(pods, [("tcp", b0, 8080)], cgroup) as h:  # no frontend: not translated
        (first,) = h.report()
        assert first["peer"] == [b0, 8080]
        key = SockKey(cookie=first["cookie"], addr=ip_to_be32(b0), port=port_to_be16(8080), proto=6)
        lab.dp.maps.sock_revnat.update(key, SockValue(vip=ip_to_be32(VIP), port=port_to_be16(80)))
        assert h.report() == [{"peer": [VIP, 80]}]


def test_the_sock_revnat_fallback_is_only_for_a_backends_address(
    lab: Lab, pods: Node, cgroup: Path
) -> None:
    """Only a backend's address was ever given out, so getpeername looks in sock_revnat only
    for an address the address filter passes as a backend's: the same entry as above is not
    read while b0 backs no Service (the filter ready, with b1 only), and is once it does."""
    lab.dp.attach_cgroup(cgroup)
    b0, b1 = pods.pods["b0"].ip, pods.pods["b1"].ip
    lab.sync(Frontend(VIP, 80, "TCP", (Backend(b1, 8080),)))
    with holding(pods, [("tcp", b0, 8080)], cgroup) as h:
        (first,) = h.report()
        key = SockKey(cookie=first["cookie"], addr=ip_to_be32(b0), port=port_to_be16(8080), proto=6)
        lab.dp.maps.sock_revnat.update(key, SockValue(vip=ip_to_be32(VIP), port=port_to_be16(80)))
        assert h.report() == [{"peer": [b0, 8080]}]
        lab.sync(Frontend(VIP, 80, "TCP", (Backend(b1, 8080), Backend(b0, 8080))))
        assert h.report() == [{"peer": [VIP, 80]}]


def pin_retired_program(pin_dir: Path) -> None:
    """Pin something where an older datapath pinned sock_release4 (a program, but what the
    loader does with the pin does not depend on it)."""
    fd = _libbpf.map_create(_libbpf.BPF_MAP_TYPE_ARRAY, "sock_release4", 4, 4, 1)
    try:
        _libbpf.obj_pin(fd, pin_dir / "sock_release4")
    finally:
        os.close(fd)


def hooks(cgroup: Path) -> Counter[tuple[str, str]]:
    """(hook, program name) of the programs attached to the cgroup itself."""
    return Counter((p.attach_type, p.name) for p in attached_programs(cgroup))


OUR_HOOKS = SOCK_LB_HOOKS

# What an older datapath attached at sock_release (and, under another name, a program of
# someone else's, which must be left alone).
RELEASE_PROGRAMS = """
int sock_release4(struct bpf_sock *sk) { return 1; }
int not_ours(struct bpf_sock *sk) { return 1; }
"""


def test_a_restart_leaves_one_program_per_hook_and_detaches_an_older_release_program(
    cgroup: Path,
) -> None:
    from bcc import BPF

    assert set(RETIRED_SOCK_PROGRAMS) == {"sock_release4"}
    assert {name for _, name in OUR_HOOKS} == set(SOCK_ATTACH_TYPES)
    bpf = BPF(text=RELEASE_PROGRAMS.encode())
    pin_dir = new_pin_dir()
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in ("sock_release4", "not_ours"):
                fn = bpf.load_func(
                    name.encode(), BPF.CGROUP_SOCK, attach_type=CGROUP_INET_SOCK_RELEASE
                )
                _libbpf.cgroup_attach(fd, fn.fd, CGROUP_INET_SOCK_RELEASE)
        finally:
            os.close(fd)
        theirs = ("cgroup_inet_sock_release", "not_ours")
        first = Datapath(pin_dir, TEST_CONFIG)
        first.attach_cgroup(cgroup)
        assert hooks(cgroup) == OUR_HOOKS + Counter([theirs])
        first.close()

        # An older datapath's release program again, then a restart (recompiled programs,
        # the same maps); its pin is removed too.
        _libbpf.obj_pin(bpf.funcs[b"sock_release4"].fd, pin_dir / "sock_release4")
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            release = bpf.funcs[b"sock_release4"].fd
            _libbpf.cgroup_attach(fd, release, CGROUP_INET_SOCK_RELEASE)
        finally:
            os.close(fd)
        again = Datapath(pin_dir, TEST_CONFIG)
        try:
            assert not (pin_dir / "sock_release4").exists()
            again.attach_cgroup(cgroup)
            assert hooks(cgroup) == OUR_HOOKS + Counter([theirs])
            ids = {p.name: p.id for p in attached_programs(cgroup)}
            assert {ids[n] for n in SOCK_ATTACH_TYPES} == {
                _libbpf.prog_info(again._progs[n]).id for n in SOCK_ATTACH_TYPES
            }
            # detach_cgroup (--cleanup) takes an older release program off too.
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _libbpf.cgroup_attach(fd, release, CGROUP_INET_SOCK_RELEASE)
            finally:
                os.close(fd)
            again.detach_cgroup(cgroup)
            assert hooks(cgroup) == Counter([theirs])
        finally:
            again.close(cleanup=True)
    finally:
        bpf.cleanup()
        remove_pins(pin_dir)
