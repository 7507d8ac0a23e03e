"""Compiles bpf/lb_tc.c with bcc, pins (or adopts) its maps per instance, attaches it to veths."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ebpflb.datapath import _libbpf
from ebpflb.datapath.conntrack import GcStats, collect
from ebpflb.datapath.maps import MAP_SPECS, LbMaps

log = logging.getLogger(__name__)

Direction = Literal["ingress", "egress"]

# The entry point per tc hook: from_pod balances and reverse-NATs at the pod
# veth's ingress; to_pod only reverse-NATs (replies from other nodes) at egress.
PROGRAMS: dict[Direction, str] = {"ingress": "from_pod", "egress": "to_pod"}
TC_PARENTS: dict[Direction, str] = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
FILTER_PRIO = 1
FILTER_HANDLE = ":1"

BPFFS_MAGIC_NAME = "bpf"


class DatapathError(RuntimeError):
    """The datapath cannot be loaded as asked."""


@dataclass(frozen=True)
class DatapathConfig:
    """Compile-time settings: each is a -D flag of bpf/lb_config.h."""

    max_services: int = 65536
    max_backends: int = 65536
    max_service_backends: int = 262144
    max_conntrack: int = 262144
    max_affinity: int = 65536
    ct_lifetime_tcp: int = 21600  # seconds, established TCP
    ct_lifetime_syn: int = 60  # seconds, TCP before the client's first non-SYN
    ct_lifetime_close: int = 10  # seconds, TCP after FIN or RST
    ct_lifetime_udp: int = 30  # seconds, idle UDP
    ct_refresh_ns: int = 1_000_000_000  # an entry's timestamp is rewritten at most this often
    hairpin_ip: str = "169.254.42.1"
    hash_seed: int = 0x5EED1B5

    def max_entries(self, map_name: str) -> int:
        return {
            "services": self.max_services,
            "backends": self.max_backends,
            "service_backends": self.max_service_backends,
            "service_members": self.max_service_backends,
            "conntrack": self.max_conntrack,
            "affinity": self.max_affinity,
            "counters": 1,
            "id_state": 1,
        }[map_name]

    def cflags(self, pin_dir: Path) -> list[str]:
        if ":" in str(pin_dir) or '"' in str(pin_dir):
            raise DatapathError(f"pin directory {pin_dir} must not contain ':' or '\"'")
        hairpin = int(ipaddress.IPv4Address(self.hairpin_ip))  # host order, as lb_config.h wants
        defines = {
            "LB_PIN_DIR": f'"{pin_dir}"',
            "LB_MAX_SERVICES": self.max_services,
            "LB_MAX_BACKENDS": self.max_backends,
            "LB_MAX_SERVICE_BACKENDS": self.max_service_backends,
            "LB_MAX_CONNTRACK": self.max_conntrack,
            "LB_MAX_AFFINITY": self.max_affinity,
            "LB_CT_LIFETIME_TCP": self.ct_lifetime_tcp,
            "LB_CT_LIFETIME_SYN": self.ct_lifetime_syn,
            "LB_CT_LIFETIME_CLOSE": self.ct_lifetime_close,
            "LB_CT_LIFETIME_UDP": self.ct_lifetime_udp,
            "LB_CT_REFRESH_NS": f"{self.ct_refresh_ns}ULL",
            "LB_HAIRPIN_ADDR": f"{hairpin:#x}",
            "LB_HASH_SEED": f"{self.hash_seed:#x}",
        }
        return [f"-D{k}={v}" for k, v in defines.items()]


def find_bpf_dir() -> Path:
    """The folder of lb_tc.c: $EBPFLB_BPF_DIR, else the repository's bpf/ (editable install)."""
    here = Path(__file__).resolve().parent
    candidates = [Path(os.environ["EBPFLB_BPF_DIR"])] if "EBPFLB_BPF_DIR" in os.environ else []
    candidates += [here.parents[1] / "bpf", here / "bpf"]
    for c in candidates:
        if (c / "lb_tc.c").is_file():
            return c
    raise DatapathError(f"bpf/lb_tc.c not found (looked in {', '.join(map(str, candidates))})")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def render_source(main: Path) -> str:
    """main with its local "..." includes inlined (each once), with #line markers.

    bcc rewrites map calls such as services.lookup(&k) only in the file it is
    given, not in headers, so the headers are pasted in; #line keeps compiler
    messages pointing at the right header and line.
    """
    seen: set[Path] = set()

    def inline(path: Path) -> list[str]:
        out = [f'#line 1 "{path}"']
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            inc = (path.parent / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.extend(inline(inc))
            out.append(f'#line {n + 1} "{path}"')
        return out

    seen.add(main.resolve())
    return "\n".join(inline(main.resolve())) + "\n"


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding path (from /proc/self/mounts)."""
    best, fstype = "", ""
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


def check_pins(pin_dir: Path, config: DatapathConfig, replace: bool = False) -> list[str]:
    """Compare maps already pinned in pin_dir with what config compiles.

    bcc adopts a pinned map whatever its type or size, so this is the check.
    Returns the names of the incompatible ones (unpinned when replace, else an
    error is raised).
    """
    bad: list[str] = []
    for spec in MAP_SPECS:
        path = pin_dir / spec.name
        if not path.exists():
            continue
        fd = _libbpf.obj_get(str(path))
        try:
            info = _libbpf.map_info(fd)
        finally:
            os.close(fd)
        want = (
            spec.map_type,
            ctypes.sizeof(spec.key_type),
            ctypes.sizeof(spec.value_type),
            config.max_entries(spec.name),
        )
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if want != have:
            bad.append(f"{spec.name}: pinned (type, key, value, entries) {have}, compiled {want}")
            if replace:
                path.unlink()
    if bad and not replace:
        raise DatapathError(f"incompatible pinned maps in {pin_dir}: {'; '.join(bad)}")
    return bad


def remove_pins(pin_dir: str | os.PathLike[str]) -> None:
    """Unpin every map of an instance and remove its directory if it is then empty."""
    d = Path(pin_dir)
    for spec in MAP_SPECS:
        (d / spec.name).unlink(missing_ok=True)
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("pin directory %s not removed: %s", d, e)


class Datapath:
    """One loaded instance of the datapath: program, maps pinned under pin_dir, tc attachments.

    from_pod (tc ingress of a pod's host veth) DNATs TCP/UDP to a frontend,
    reverse-NATs replies of balanced flows, refuses clients of frontends
    without backends (RST / ICMP port unreachable) and leaves every other
    packet byte for byte as it was. IPv4 fragments are among those left alone:
    only the first carries ports, so they cannot be balanced without
    reassembly (a fragmented datagram to a VIP is lost). to_pod (tc egress)
    only reverse-NATs, for replies from backends on other nodes.

    Maps already pinned under pin_dir are adopted (a restarted agent keeps
    every flow); the program stays attached, and working, after close() unless
    cleanup is asked for. attach()/detach() act on the network namespace of
    the calling thread: call them from inside the node's namespace.
    """

    def __init__(
        self,
        pin_dir: str | os.PathLike[str],
        config: DatapathConfig | None = None,
        *,
        replace_incompatible: bool = False,
        bpf_dir: Path | None = None,
    ) -> None:
        from bcc import BPF

        self.config = config or DatapathConfig()
        self.pin_dir = Path(pin_dir)
        where = self.pin_dir if self.pin_dir.exists() else self.pin_dir.parent
        if _fs_type(where) != BPFFS_MAGIC_NAME:
            raise DatapathError(f"{self.pin_dir} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        check_pins(self.pin_dir, self.config, replace=replace_incompatible)

        source = render_source((bpf_dir or find_bpf_dir()) / "lb_tc.c")
        self._bpf: Any = BPF(text=source.encode(), cflags=self.config.cflags(self.pin_dir))
        try:
            self._fns = {
                name: self._bpf.load_func(name.encode(), BPF.SCHED_CLS)
                for name in PROGRAMS.values()
            }
            self.maps = LbMaps.open(self.pin_dir)
        except BaseException:
            self._bpf.cleanup()
            raise
        self._attached: set[tuple[int, Direction]] = set()
        self._closed = False

    @property
    def prog_fd(self) -> int:
        """fd of from_pod (for BPF_PROG_TEST_RUN)."""
        return int(self._fns[PROGRAMS["ingress"]].fd)

    def program_fd(self, direction: Direction) -> int:
        return int(self._fns[PROGRAMS[direction]].fd)

    def bcc_table(self, name: str) -> Any:
        """bcc's view of a map (its Key/Leaf ctypes come from the compiled C: the layout test)."""
        return self._bpf[name.encode()]

    def attach(self, ifindex: int, direction: Direction = "ingress") -> None:
        """Attach at tc ingress (from_pod) or egress (to_pod), replacing our earlier filter."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        fn = self._fns[PROGRAMS[direction]]
        name = fn.name.decode() if isinstance(fn.name, bytes) else str(fn.name)
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                fd=fn.fd,
                name=name,
                parent=TC_PARENTS[direction],
                prio=FILTER_PRIO,
                direct_action=True,
            )
        self._attached.add((ifindex, direction))

    def detach(self, ifindex: int, direction: Direction = "ingress") -> None:
        """Remove our filter (also one left by an earlier agent); the clsact qdisc too if unused."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        gone = (errno.ENOENT, errno.EINVAL, errno.ENODEV)
        with IPRoute() as ipr:
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    ifindex,
                    FILTER_HANDLE,
                    parent=TC_PARENTS[direction],
                    prio=FILTER_PRIO,
                )
            except NetlinkError as e:
                if e.code not in gone:
                    raise
            try:
                in_use = any(
                    list(ipr.get_filters(ifindex, parent=int(p.replace(":", ""), 16)))
                    for p in TC_PARENTS.values()
                )
                if not in_use:
                    ipr.tc("del", "clsact", ifindex)
            except NetlinkError as e:
                if e.code not in gone:
                    raise
        self._attached.discard((ifindex, direction))

    @property
    def attached(self) -> frozenset[tuple[int, Direction]]:
        return frozenset(self._attached)

    def counters(self) -> dict[str, int]:
        """The datapath's counters summed over CPUs."""
        return self.maps.counter_totals()

    def gc(self, now: int | None = None) -> GcStats:
        """Remove expired conntrack and affinity entries (see conntrack.collect)."""
        return collect(self.maps, now)

    def close(self, cleanup: bool = False) -> None:
        """Release this process's handles; cleanup: also detach what we attached, unpin the maps."""
        if self._closed:
            return
        self._closed = True
        try:
            if cleanup:
                for ifindex, direction in sorted(self._attached):
                    try:
                        self.detach(ifindex, direction)
                    except Exception as e:  # keep cleaning up
                        log.warning("detach from %s %s failed: %s", ifindex, direction, e)
        finally:
            self.maps.close()
            self._bpf.cleanup()
            if cleanup:
                remove_pins(self.pin_dir)

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
