"""Fixtures of the datapath tier: one compiled program per session, maps emptied per test."""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebpflb.datapath import _libbpf, kclock
from ebpflb.datapath.conntrack import now_ns
from ebpflb.datapath.loader import Datapath, DatapathConfig, Direction, remove_pins, tc_programs
from ebpflb.datapath.programmer import Frontend, Programmer, SyncStats
from ebpflb.datapath.structs import CT_REVERSE, CtValue, be16_to_port, be32_to_ip
from tests.datapath import netns, packets

BPFFS = Path("/sys/fs/bpf")

# Small maps: quick to create; lifetimes as in production.
TEST_CONFIG = DatapathConfig(
    max_services=1024,
    max_backends=1024,
    max_service_backends=4096,
    max_conntrack=4096,
    max_affinity=1024,
)


def skip_reason() -> str | None:
    """Why the datapath tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (BPF programs, bpffs pins)"
    try:
        import bcc  # noqa: F401
    except Exception as e:  # ImportError, or bcc's own failures
        return f"bcc unavailable: {e}"
    with open("/proc/self/mounts") as f:
        if not any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            return f"no bpffs mounted at {BPFFS}"
    return None


def new_pin_dir() -> Path:
    return BPFFS / f"ebpflb-test-{secrets.token_hex(4)}"


def clock_before() -> int:
    """A time no stamp the datapath writes from now on is earlier than: now_ns() less a
    tick (lb_now() lags now_ns() by one while the interrupt that moves jiffies is late)."""
    return now_ns() - kclock.resolution()


def prog_id(fd: int) -> int:
    """The kernel's id of the program fd."""
    return int(_libbpf.prog_info(fd).id)


def tc_programs_in(n: netns.Node, ifname: str, hook: Direction) -> list[tuple[str, int]]:
    """(name, id) of the programs on a tc hook of ifname in node n: tcx, then our clsact
    filter (loader.tc_programs)."""
    with netns.inside(n.ns):
        return tc_programs(ifname, hook)


def map_id(path: Path) -> int:
    """The kernel's id of the map pinned at path (the same id: the very same map)."""
    fd = _libbpf.obj_get(str(path))
    try:
        return int(_libbpf.map_info(fd).id)
    finally:
        os.close(fd)


# The socket-level programs a cgroup holds after attach_cgroup(): (bpftool's hook name,
# program name), one each; none at sock_release (older datapaths had sock_release4 there).
SOCK_LB_HOOKS = Counter(
    {
        ("cgroup_inet4_connect", "sock_connect4"): 1,
        ("cgroup_udp4_sendmsg", "sock_sendmsg4"): 1,
        ("cgroup_inet4_getpeername", "sock_peername4"): 1,
        ("cgroup_udp4_recvmsg", "sock_recvmsg4"): 1,
    }
)


@contextmanager
def own_datapath(config: DatapathConfig = TEST_CONFIG) -> Iterator[Datapath]:
    """A datapath compiled with config, its maps pinned in a private directory, detached
    and unpinned after (skips the test where the tier cannot run)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    pin_dir = new_pin_dir()
    try:
        dp = Datapath(pin_dir, config)
    except BaseException:
        remove_pins(pin_dir)
        raise
    try:
        yield dp
    finally:
        dp.close(cleanup=True)
        remove_pins(pin_dir)


@pytest.fixture(scope="session")
def datapath() -> Iterator[Datapath]:
    """The program compiled once for the session, its maps pinned in a private directory."""
    with own_datapath() as dp:
        yield dp


FlowKey = tuple[str, str, int, str, int]


@dataclass
class Lab:
    """The datapath with empty maps, a Programmer for it and a runner."""

    dp: Datapath
    programmer: Programmer

    def sync(self, *frontends: Frontend) -> SyncStats:
        return self.programmer.sync(frontends)

    def run(self, frame: bytes, ifindex: int = 0) -> tuple[int, bytes]:
        return packets.run(self.dp.prog_fd, frame, ifindex=ifindex)

    def run_egress(self, frame: bytes) -> tuple[int, bytes]:
        return packets.run(self.dp.program_fd("egress"), frame)

    def run_external(self, hook: str, frame: bytes, ifindex: int = 0) -> tuple[int, bytes]:
        """nodeport_xdp (hook "xdp") or nodeport_tc ("tc"), the frame coming in on ifindex
        (of the calling thread's namespace)."""
        fd = self.dp.external_fd("xdp" if hook == "xdp" else "tc")
        return packets.run(fd, frame, xdp=hook == "xdp", ifindex=ifindex)

    def counters(self) -> dict[str, int]:
        return self.dp.counters()

    def ct(self) -> dict[FlowKey, CtValue]:
        """Conntrack entries by (direction, src, sport, dst, dport)."""
        return {
            (
                "rev" if k.dir == CT_REVERSE else "fwd",
                be32_to_ip(k.saddr),
                be16_to_port(k.sport),
                be32_to_ip(k.daddr),
                be16_to_port(k.dport),
            ): v
            for k, v in self.dp.maps.conntrack.items()
        }

    def age_ct(self, seconds: float, direction: str | None = None) -> None:
        """Make conntrack entries (of one direction, or all) look last seen `seconds` ago."""
        then = now_ns() - int(seconds * 1e9)
        for k, v in self.dp.maps.conntrack.items():
            if direction is None or (k.dir == CT_REVERSE) == (direction == "rev"):
                v.last_seen = then
                self.dp.maps.conntrack.update(k, v)

    def drop_ct(self, direction: str) -> None:
        for k, _ in self.dp.maps.conntrack.items():
            if (k.dir == CT_REVERSE) == (direction == "rev"):
                self.dp.maps.conntrack.delete(k)


@pytest.fixture
def lab(datapath: Datapath) -> Lab:
    datapath.maps.clear()
    return Lab(datapath, Programmer(datapath))
