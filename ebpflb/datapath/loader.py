"""Loads the datapath (compiled by bcc in a child process, see compile.py), adopts or migrates
the maps already pinned, attaches the programs to pod veths (tc) and to the node's external
interfaces (XDP or tc). The calling process never loads bcc or LLVM."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from ebpflb.datapath import _libbpf, addrfilter, ifaces, kbtf, kclock, layout, node, replyfilter
from ebpflb.datapath.compile import (
    MISMATCH,
    PROGRAM_TYPES,
    RETIRED_SOCK_PROGRAMS,
    SOCK_ATTACH_TYPES,
)
from ebpflb.datapath.compile import request as compile_request
from ebpflb.datapath.conntrack import GcStats, collect
from ebpflb.datapath.maps import MAP_SPECS, LbMaps, MapTypes
from ebpflb.datapath.migrate import Migration, remove_staging, share_socket_storage
from ebpflb.datapath.structs import IF_F_NO_XDP_TX, IF_F_PARTIAL_CSUM

log = logging.getLogger(__name__)

Direction = Literal["ingress", "egress"]
ExternalMode = Literal["xdp", "xdp-generic", "tc"]
EXTERNAL_MODES: tuple[ExternalMode, ...] = get_args(ExternalMode)

# The entry point per tc hook: from_pod balances and reverse-NATs at the pod
# veth's ingress; to_pod only reverse-NATs (replies from other nodes) at egress.
PROGRAMS: dict[Direction, str] = {"ingress": "from_pod", "egress": "to_pod"}
# External interfaces: nodeport_xdp is the fast path; nodeport_tc runs at tc
# ingress alone ("tc" mode) or behind XDP, for what XDP hands on (see bpf/xdp.h).
XDP_PROGRAM = "nodeport_xdp"
EXTERNAL_TC_PROGRAM = "nodeport_tc"
XDP_FLAGS: dict[ExternalMode, int] = {
    "xdp": _libbpf.XDP_FLAGS_DRV_MODE,
    "xdp-generic": _libbpf.XDP_FLAGS_SKB_MODE,
}
# How programs are put on tc hooks: tcx (Linux 6.6+: the program runs straight from the
# device's hook, without the clsact qdisc, its filter chain and cls_bpf around it) or a
# cls_bpf filter (direct-action, at FILTER_PRIO) under a clsact qdisc. "auto": tcx where
# the kernel has it.
TcAttach = Literal["auto", "tcx", "clsact"]
TC_ATTACH_MODES: tuple[TcAttach, ...] = get_args(TcAttach)
TCX_TYPES: dict[Direction, int] = {
    "ingress": _libbpf.BPF_TCX_INGRESS,
    "egress": _libbpf.BPF_TCX_EGRESS,
}
TC_PARENTS: dict[Direction, str] = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
FILTER_PRIO = 1
FILTER_HANDLE = ":1"
PINNED_PROGRAMS = tuple(PROGRAM_TYPES)
PINNED_NAMES = (*(s.name for s in MAP_SPECS), *PINNED_PROGRAMS, layout.LAYOUT_PIN)

# The mode attach_external() picks per driver, from what python -m
# ebpflb.datapath.nodeport_bench measured (see bpf/README.md). Native XDP
# where the driver has it and hands XDP whole checksums (virtio_net turns the
# host's checksum offload off while XDP runs); tc on a veth; tc for drivers
# not known to have native XDP.
DEFAULT_MODES: dict[str, ExternalMode] = {
    "veth": "tc",
    "virtio_net": "xdp",
    "ixgbe": "xdp",
    "i40e": "xdp",
    "ice": "xdp",
    "mlx5_core": "xdp",
    "mlx4_en": "xdp",
    "bnxt_en": "xdp",
    "ena": "xdp",
    "igb": "xdp",
    "igc": "xdp",
    "gve": "xdp",
}


def default_external_mode(ifname: str) -> ExternalMode:
    """The faster NodePort mode for the interface's kind, by its driver (see DEFAULT_MODES)."""
    return DEFAULT_MODES.get(ifaces.driver(ifname), "tc")


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
    max_sock_revnat: int = 131072  # (socket, VIP) pairs of unconnected UDP sockets translated
    ct_lifetime_tcp: int = 21600  # seconds, established TCP
    ct_lifetime_syn: int = 60  # seconds, TCP before the client's first non-SYN
    ct_lifetime_close: int = 10  # seconds, TCP after FIN or RST
    ct_lifetime_udp: int = 30  # seconds, idle UDP
    ct_refresh_ns: int = 1_000_000_000  # an entry's timestamp is rewritten at most this often
    hairpin_ip: str = "169.254.42.1"
    hash_seed: int = 0x5EED1B5
    # tc programs read the skb's checksum state (kbtf.py) and update L4 checksums by hand,
    # where the kernel allows it; False: always through the checksum helpers
    read_ip_summed: bool = True

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
            "node_config": 1,
            "sock_revnat": self.max_sock_revnat,
            "addr_filter": addrfilter.WORDS + 1,
            "reply_filter": replyfilter.ENTRIES,
            "sock_peer": 0,  # socket storage: one value per socket, no size of its own
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
            "LB_MAX_SOCK_REVNAT": self.max_sock_revnat,
            "LB_CT_LIFETIME_TCP": self.ct_lifetime_tcp,
            "LB_CT_LIFETIME_SYN": self.ct_lifetime_syn,
            "LB_CT_LIFETIME_CLOSE": self.ct_lifetime_close,
            "LB_CT_LIFETIME_UDP": self.ct_lifetime_udp,
            "LB_CT_REFRESH_NS": f"{self.ct_refresh_ns}ULL",
            "LB_HAIRPIN_ADDR": f"{hairpin:#x}",
            "LB_HASH_SEED": f"{self.hash_seed:#x}",
        }
        facts = kbtf.skb_facts() if self.read_ip_summed else None
        if facts is not None:
            defines.update(facts.cflags())
        clock = kclock.clock()  # None: lb_now() stays on CLOCK_MONOTONIC_COARSE, as now_ns()
        return [f"-D{k}={v}" for k, v in defines.items()] + (clock.cflags() if clock else [])


MAIN_SOURCE = "lb_kern.c"


def find_bpf_dir() -> Path:
    """The folder of lb_kern.c: $EBPFLB_BPF_DIR, else the repository's bpf/ (editable install)."""
    here = Path(__file__).resolve().parent
    candidates = [Path(os.environ["EBPFLB_BPF_DIR"])] if "EBPFLB_BPF_DIR" in os.environ else []
    candidates += [here.parents[1] / "bpf", here / "bpf"]
    for c in candidates:
        if (c / MAIN_SOURCE).is_file():
            return c
    raise DatapathError(
        f"bpf/{MAIN_SOURCE} not found (looked in {', '.join(map(str, candidates))})"
    )


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


def _compile(
    target: Path, config: DatapathConfig, bpf_dir: Path, expect: layout.Layout | None
) -> layout.Layout | None:
    """Compile and pin under target in a child process (see compile.py); None if the maps
    pinned there (of layout expect) do not have the compiled layout."""
    req = compile_request(target, config, bpf_dir, expect)
    proc = subprocess.run(
        [sys.executable, "-m", "ebpflb.datapath.compile"],
        input=req,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == MISMATCH:
        return None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise DatapathError(f"compiling {bpf_dir / MAIN_SOURCE} failed:\n{tail}")
    return layout.decode(bytes.fromhex(proc.stdout.strip()))


def _map_types(new: layout.Layout) -> MapTypes:
    """Key and value types of the maps whose layout is not our mirrors' (read by name)."""
    types: MapTypes = {}
    for spec in MAP_SPECS:
        m = new[spec.name]
        if (m.key, m.value) != (
            layout.StructLayout.of(spec.key_type),
            layout.StructLayout.of(spec.value_type),
        ):
            types[spec.name] = (
                layout.ctype(m.key, spec.key_type.__name__),
                layout.ctype(m.value, spec.value_type.__name__),
            )
    return types


def _tc_replace(ipr: Any, ifindex: int, parent: str, name: str, fd: int) -> None:
    """Put program fd at the tc hook parent of ifindex, replacing our filter in one step."""
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        FILTER_HANDLE,
        fd=fd,
        name=name,
        parent=parent,
        prio=FILTER_PRIO,
        direct_action=True,
    )


def _tcx_programs(ifindex: int, direction: Direction) -> list[tuple[str, int]]:
    """(name, program id) of the programs at a tcx hook of ifindex, in the order they run;
    none where the kernel has no tcx."""
    if not _libbpf.has_tcx():
        return []
    out = []
    for prog_id in _libbpf.tcx_prog_ids(ifindex, TCX_TYPES[direction]):
        name = _libbpf.prog_name(prog_id)
        if name is not None:
            out.append((name, prog_id))
    return out


def tc_programs(ifname: str, direction: Direction) -> list[tuple[str, int]]:
    """(name, program id) of the BPF programs on a tc hook of ifname, as we attach them:
    at its tcx hook, then cls_bpf filters at our prio. Acts in the calling thread's network
    namespace."""
    from pyroute2 import IPRoute

    ifindex = socket.if_nametoindex(ifname)
    with IPRoute() as ipr:
        return _tcx_programs(ifindex, direction) + _tc_programs(ipr, ifindex, ifname, direction)


def _tc_programs(
    ipr: Any, ifindex: int, ifname: str, direction: Direction
) -> list[tuple[str, int]]:
    """(name, program id) of the BPF filters at our prio on a tc hook of ifname (clsact).
    The ids come from tc (pyroute2 does not decode them), asked only where there is a BPF
    filter."""
    parent = int(TC_PARENTS[direction].replace(":", ""), 16)
    if not any(f.get_attr("TCA_KIND") == "bpf" for f in ipr.get_filters(ifindex, parent=parent)):
        return []
    out = subprocess.run(
        ["tc", "-j", "filter", "show", "dev", ifname, direction],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        (str(f["options"]["bpf_name"]), int(f["options"]["prog"]["id"]))
        for f in json.loads(out or "[]")
        if f.get("kind") == "bpf" and f.get("pref") == FILTER_PRIO and "options" in f
    ]


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


def check_pins(pin_dir: Path, config: DatapathConfig) -> list[str]:
    """Compare maps already pinned in pin_dir with what config compiles: raises an error
    naming those of another type or size (which a Datapath would migrate), else []."""
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
    if bad:
        raise DatapathError(f"incompatible pinned maps in {pin_dir}: {'; '.join(bad)}")
    return bad


def staging_dir(pin_dir: Path) -> Path:
    """Where a migration pins the new programs and maps until they replace the old."""
    return pin_dir.with_name(pin_dir.name + "-staging")  # bpffs refuses dots in names


def remove_pins(pin_dir: str | os.PathLike[str]) -> None:
    """Unpin every map and program of an instance (and of an unfinished migration's staging
    directory) and remove its directory if it is then empty."""
    d = Path(pin_dir)
    remove_staging(staging_dir(d))
    for name in (*PINNED_NAMES, *RETIRED_SOCK_PROGRAMS):  # an older version's too
        (d / name).unlink(missing_ok=True)
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("pin directory %s not removed: %s", d, e)


@contextlib.contextmanager
def _cgroup_fd(path: Path) -> Iterator[int]:
    """An fd of the cgroup v2 directory at path (what BPF_PROG_ATTACH takes)."""
    if _fs_type(path) != "cgroup2":
        raise DatapathError(f"{path} is not a cgroup v2 directory")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _detach_program(detach: Callable[[int], None], prog_id: int) -> None:
    """detach(an fd of program prog_id); a program or an attachment gone meanwhile is fine."""
    try:
        fd = _libbpf.prog_fd_by_id(prog_id)
    except _libbpf.BpfError:
        return  # gone meanwhile
    try:
        detach(fd)
    except _libbpf.BpfError as e:
        if e.errno != errno.ENOENT:
            raise
    finally:
        os.close(fd)


def _take_place(
    here: int,
    ours: list[int],
    attach: Callable[[int], None],
    detach: Callable[[int], None],
) -> None:
    """Make program `here` the one of ours at a hook whose programs named as ours are `ours`
    (ids): unless it is there already, attach(replace_fd) puts it in place of the first of
    them in one step (replace_fd: that program's fd), or adds it (-1) when there is none;
    the others are detached (detach(fd)): there are others only when two agents attached
    at once."""
    rest = [i for i in ours if i != here]
    if here not in ours:
        if rest:
            old_fd = _libbpf.prog_fd_by_id(rest.pop(0))
            try:
                attach(old_fd)
            finally:
                os.close(old_fd)
        else:
            attach(-1)
    for stale in rest:
        _detach_program(detach, stale)


def _detach_cgroup_program(cgroup_fd: int, prog_id: int, attach_type: int) -> None:
    _detach_program(partial(_libbpf.cgroup_detach, cgroup_fd, attach_type=attach_type), prog_id)


class Datapath:
    """One loaded instance of the datapath: programs, maps pinned under pin_dir, attachments.

    Pod veths (attach): from_pod (tc ingress of a pod's host veth) DNATs TCP/UDP to a
    frontend, reverse-NATs replies of balanced flows, refuses clients of frontends
    without backends (RST / ICMP port unreachable) and leaves every other packet byte
    for byte as it was. IPv4 fragments are among those left alone: only the first
    carries ports, so they cannot be balanced without reassembly (a fragmented datagram
    to a VIP is lost). to_pod (tc egress) only reverse-NATs, for replies from backends
    on other nodes.

    External interfaces (attach_external): NodePort frontends, in XDP, in tc, or in XDP
    with tc behind it for what XDP cannot finish. They need the node's addresses
    (set_node).

    A cgroup (attach_cgroup): socket-level load balancing for its processes, a frontend
    translated at connect() and sendmsg() instead of per packet.

    Maps already pinned under pin_dir are adopted (a restarted agent keeps every flow) when
    their pinned layout is the compiled one; otherwise their entries are migrated to new
    maps (see migrate.py) and the new programs swapped in on every attachment, right away
    or, with defer_migration, when finish_migration() is called (the agent first writes its
    state into the new maps). The programs stay attached, and working, after close() unless
    cleanup is asked for.
    Attaching and detaching act on the network namespace of the calling thread: call
    them from inside the node's namespace.
    """

    def __init__(
        self,
        pin_dir: str | os.PathLike[str],
        config: DatapathConfig | None = None,
        *,
        bpf_dir: Path | None = None,
        defer_migration: bool = False,
        tc_attach: TcAttach = "auto",
    ) -> None:
        self.config = config or DatapathConfig()
        if tc_attach not in TC_ATTACH_MODES:
            raise ValueError(f"tc_attach {tc_attach!r} is not one of {TC_ATTACH_MODES}")
        if tc_attach == "tcx" and not _libbpf.has_tcx():
            raise DatapathError("this kernel has no tcx hooks (Linux 6.6 and later)")
        # how attach() and attach_external() put programs on tc hooks: tcx, else a filter
        # under clsact (read at each attachment)
        self.tcx = tc_attach == "tcx" or (tc_attach == "auto" and _libbpf.has_tcx())
        self.pin_dir = Path(pin_dir)
        where = self.pin_dir if self.pin_dir.exists() else self.pin_dir.parent
        if _fs_type(where) != BPFFS_MAGIC_NAME:
            raise DatapathError(f"{self.pin_dir} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._staging = staging_dir(self.pin_dir)
        remove_staging(self._staging)  # left by a migration that did not finish
        self._migration: Migration | None = None
        bpf_dir = bpf_dir or find_bpf_dir()
        try:
            old = layout.read_pinned(self.pin_dir)
        except layout.LayoutError as e:
            raise DatapathError(f"pinned maps in {self.pin_dir}: {e}") from e
        new = None
        if old is None or old == layout.mirror_layout(self.config):
            new = _compile(self.pin_dir, self.config, bpf_dir, old)  # adopt (None: differs)
        if new is None:
            assert old is not None
            new = self._start_migration(old, bpf_dir)
        self.layout = new
        live = self._staging if self._migration else self.pin_dir
        self._progs: dict[str, int] = {}
        try:
            for name in PINNED_PROGRAMS:
                self._progs[name] = _libbpf.obj_get(str(live / name))
            self.maps = LbMaps.open(live, _map_types(new))
        except BaseException:
            self._close_programs()
            self._abort_migration()
            raise
        self._attached: set[tuple[int, Direction]] = set()
        self._external: dict[int, ExternalMode] = {}
        self._cgroups: set[Path] = set()
        self._closed = False
        if self._migration and not defer_migration:
            try:
                self.finish_migration()
            except BaseException:
                self.close()
                raise

    # -- a changed layout ------------------------------------------------

    def _start_migration(self, old: layout.Layout, bpf_dir: Path) -> layout.Layout:
        """Compile into the staging directory and copy the old maps' entries over."""
        self._staging.mkdir()
        try:
            want = layout.mirror_layout(self.config)
            shared = share_socket_storage(self.pin_dir, self._staging, old, want)
            new = _compile(self._staging, self.config, bpf_dir, None)
            assert new is not None
            if changed := [n for n in shared if new[n] != old[n]]:
                raise DatapathError(
                    f"{', '.join(changed)}: the compiled layout is not this code's mirrors'"
                )
            self._migration = Migration(self.pin_dir, self._staging, old, new)
            self._migration.copy_state()
        except BaseException:
            self._abort_migration()
            raise
        log.info(
            "maps in %s have another layout: migrating (%s)",
            self.pin_dir,
            self._migration.summary(),
        )
        return new

    @property
    def migrating(self) -> bool:
        """The new programs wait in the staging directory; finish_migration() swaps them in."""
        return self._migration is not None

    def finish_migration(self) -> None:
        """Swap the new programs in on every attachment of the old ones in this namespace
        (each in one step), copy the flows the old programs made meanwhile, carry the
        counters over and move the pins into place. If a swap fails, those done are undone
        and the old datapath is left as it was."""
        m = self._migration
        if m is None:
            return
        try:
            swapped = self._swap_programs()
        except BaseException as e:
            self._abort_migration()
            raise DatapathError(
                f"migrating {self.pin_dir}: swapping the programs failed ({e}); "
                "the old datapath is left as it was"
            ) from e
        m.copy_flows()
        m.carry_counters()
        m.move_pins()
        m.close()
        self._migration = None
        log.info("migrated %s: %d attachments swapped; %s", self.pin_dir, swapped, m.summary())

    def _abort_migration(self) -> None:
        if self._migration is not None:
            self._migration.close()
            self._migration = None
        remove_staging(self._staging)

    def _swap_programs(self) -> int:
        """Point every tcx, tc filter and XDP attachment of our programs at the new ones,
        each in one step; returns how many. On a failure those done are put back."""
        from pyroute2 import IPRoute

        undo: list[Callable[[], None]] = []
        old_fds: list[int] = []

        def old_program(prog_id: int) -> int:
            old_fds.append(_libbpf.prog_fd_by_id(prog_id))
            return old_fds[-1]

        with IPRoute() as ipr:
            try:
                for link in ipr.get_links():
                    idx, ifname = int(link["index"]), str(link.get_attr("IFLA_IFNAME"))
                    for direction, parent in TC_PARENTS.items():
                        tcx_type = TCX_TYPES[direction]
                        for name, prog_id in _tcx_programs(idx, direction):
                            if name not in self._progs:
                                continue
                            old_fd = old_program(prog_id)
                            new_fd = self._progs[name]
                            _libbpf.tcx_attach(idx, new_fd, tcx_type, replace_fd=old_fd)
                            undo.append(partial(_libbpf.tcx_attach, idx, old_fd, tcx_type, new_fd))
                        for name, prog_id in _tc_programs(ipr, idx, ifname, direction):
                            if name not in self._progs:
                                continue
                            old_fd = old_program(prog_id)
                            _tc_replace(ipr, idx, parent, name, self._progs[name])
                            undo.append(partial(_tc_replace, ipr, idx, parent, name, old_fd))
                    for flags in XDP_FLAGS.values():
                        if _libbpf.xdp_prog_name(idx, flags) != XDP_PROGRAM:
                            continue
                        old_fd = old_program(_libbpf.xdp_prog_id(idx, flags))
                        new_fd = self._progs[XDP_PROGRAM]
                        _libbpf.xdp_replace(idx, new_fd, old_fd, flags)
                        undo.append(partial(_libbpf.xdp_replace, idx, old_fd, new_fd, flags))
            except BaseException:
                for step in reversed(undo):
                    try:
                        step()
                    except Exception as err:  # keep undoing
                        log.error("putting an old program back failed: %s", err)
                raise
            finally:
                for fd in old_fds:
                    os.close(fd)
        return len(undo)

    @property
    def prog_fd(self) -> int:
        """fd of from_pod (for BPF_PROG_TEST_RUN)."""
        return self._progs[PROGRAMS["ingress"]]

    def program_fd(self, direction: Direction) -> int:
        return self._progs[PROGRAMS[direction]]

    def external_fd(self, hook: Literal["xdp", "tc"]) -> int:
        """fd of nodeport_xdp or nodeport_tc (for BPF_PROG_TEST_RUN)."""
        return self._progs[XDP_PROGRAM if hook == "xdp" else EXTERNAL_TC_PROGRAM]

    # -- pod veths --------------------------------------------------------

    def attach(self, ifindex: int, direction: Direction = "ingress") -> None:
        """Attach at tc ingress (from_pod) or egress (to_pod), replacing what an earlier
        program of ours (this instance's, an earlier agent's) had there."""
        self._tc_attach(ifindex, direction, PROGRAMS[direction])
        self._attached.add((ifindex, direction))

    def detach(self, ifindex: int, direction: Direction = "ingress") -> None:
        """Remove our program (also one left by an earlier agent, tcx or filter); the clsact
        qdisc too if unused."""
        self._tc_detach(ifindex, direction)
        self._attached.discard((ifindex, direction))

    @property
    def attached(self) -> frozenset[tuple[int, Direction]]:
        return frozenset(self._attached)

    def _tc_attach(self, ifindex: int, direction: Direction, program: str) -> None:
        # The new way in before the other way out (tcx runs first, and a packet it passes
        # skips clsact's filters), so that no packet goes by without one of them.
        if self.tcx:
            self._tcx_attach(ifindex, direction, program)
            self._clsact_detach(ifindex, direction)  # an older agent's filter
        else:
            self._clsact_attach(ifindex, direction, program)
            self._tcx_detach(ifindex, direction)  # an agent's on tcx

    def _tcx_attach(self, ifindex: int, direction: Direction, program: str) -> None:
        """Our program at the tcx hook: in place of the first program of ours there (by
        name), the others of ours removed; else after those of others."""
        fd, tcx_type = self._progs[program], TCX_TYPES[direction]
        _take_place(
            _libbpf.prog_info(fd).id,
            [i for n, i in _tcx_programs(ifindex, direction) if n in self._progs],
            partial(_libbpf.tcx_attach, ifindex, fd, tcx_type),
            partial(_libbpf.tcx_detach, ifindex, attach_type=tcx_type),
        )

    def _tcx_detach(self, ifindex: int, direction: Direction) -> None:
        """Remove every program of ours (by name) from the tcx hook."""
        detach = partial(_libbpf.tcx_detach, ifindex, attach_type=TCX_TYPES[direction])
        for name, prog_id in _tcx_programs(ifindex, direction):
            if name in self._progs:
                _detach_program(detach, prog_id)

    def _clsact_attach(self, ifindex: int, direction: Direction, program: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            _tc_replace(ipr, ifindex, TC_PARENTS[direction], program, self._progs[program])

    def _tc_detach(self, ifindex: int, direction: Direction) -> None:
        self._tcx_detach(ifindex, direction)
        self._clsact_detach(ifindex, direction)

    def _clsact_detach(self, ifindex: int, direction: Direction) -> None:
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

    # -- the node and its external interfaces ------------------------------

    def set_node(
        self,
        node_ips: Sequence[str],
        snat_ports: tuple[int, int] = node.DEFAULT_SNAT_PORTS,
    ) -> None:
        """This node's addresses (the first is the SNAT source of NodePort flows to remote
        backends) and the SNAT source ports; the external interfaces are kept."""
        settings = node.with_node_ips(node.read(self.maps.node_config), node_ips, snat_ports)
        node.write(self.maps.node_config, settings)

    def node_settings(self) -> node.NodeSettings:
        return node.read(self.maps.node_config)

    def attach_external(
        self, ifindex: int, mode: ExternalMode | None = None, *, xdp_tx: bool | None = None
    ) -> ExternalMode:
        """Serve NodePort frontends on an external interface: nodeport_tc at tc ingress, and
        in the XDP modes nodeport_xdp before it. mode None: default_external_mode() of the
        interface's driver. Replaces what an earlier call (or agent) attached; returns the
        mode.

        xdp_tx: whether XDP may transmit (XDP_TX) here; None: yes, except native XDP on a
        veth whose peer runs no native XDP program (the veth drops XDP_TX frames then).
        Without it XDP still DNATs to local backends and tc transmits the rest."""
        name = ifaces.ifname(ifindex)
        kind = ifaces.driver(name)
        if mode is None:
            mode = DEFAULT_MODES.get(kind, "tc")
        if mode not in EXTERNAL_MODES:
            raise ValueError(f"mode {mode!r} is not one of {EXTERNAL_MODES}")
        flags = IF_F_PARTIAL_CSUM if kind == "veth" else 0
        if xdp_tx is None:
            xdp_tx = not (
                mode == "xdp" and kind == "veth" and not ifaces.veth_peer_has_native_xdp(ifindex)
            )
        if not xdp_tx:
            flags |= IF_F_NO_XDP_TX
        settings = node.read(self.maps.node_config)
        node.write(self.maps.node_config, node.with_interface(settings, ifindex, flags))

        # tc first: XDP hands it packets as soon as XDP is there.
        self._external[ifindex] = mode
        self._tc_attach(ifindex, "ingress", EXTERNAL_TC_PROGRAM)
        for other, xdp_flags in XDP_FLAGS.items():
            if other != mode:
                self._xdp_detach_ours(ifindex, xdp_flags)
        if mode in XDP_FLAGS:
            try:
                _libbpf.xdp_attach(ifindex, self._progs[XDP_PROGRAM], XDP_FLAGS[mode])
            except _libbpf.BpfError as e:
                self.detach_external(ifindex)
                raise DatapathError(f"{mode} on {name} ({kind or 'no driver'}): {e}") from e
        log.info("NodePort on %s (%s): %s%s", name, kind, mode, "" if xdp_tx else ", no XDP_TX")
        return mode

    def detach_external(self, ifindex: int) -> None:
        """Remove what attach_external put on the interface (also an earlier agent's)."""
        for xdp_flags in XDP_FLAGS.values():
            self._xdp_detach_ours(ifindex, xdp_flags)
        self._tc_detach(ifindex, "ingress")
        settings = node.read(self.maps.node_config)
        if ifindex in settings.interfaces:
            node.write(self.maps.node_config, node.with_interface(settings, ifindex, None))
        self._external.pop(ifindex, None)

    def _xdp_detach_ours(self, ifindex: int, xdp_flags: int) -> None:
        """Detach the XDP program of that mode if it is nodeport_xdp (ours, or an earlier
        agent's); anything else is left alone."""
        try:
            name = _libbpf.xdp_prog_name(ifindex, xdp_flags)
        except _libbpf.BpfError as e:
            if e.errno == errno.ENODEV:
                return
            raise
        if name == XDP_PROGRAM[: _libbpf.BPF_OBJ_NAME_LEN - 1]:
            _libbpf.xdp_detach(ifindex, xdp_flags)

    @property
    def external(self) -> dict[int, ExternalMode]:
        """External interfaces this instance attached to, and their modes."""
        return dict(self._external)

    # -- socket-level load balancing (cgroups) ------------------------------

    def attach_cgroup(self, path: str | os.PathLike[str]) -> None:
        """Socket-level load balancing for every process in the cgroup (v2) at path and in
        its descendants: the sock_* programs (bpf/sock.h) at its connect4, sendmsg4,
        getpeername4 and recvmsg4 hooks, beside other programs there (BPF_F_ALLOW_MULTI).
        A program of ours already there (an earlier agent's, or an older version's) is
        replaced in one step, so a restart or an upgrade never leaves the hook empty; the
        attachments outlive this process, like the tc ones. An older version's program at a
        hook this one no longer uses (RETIRED_SOCK_PROGRAMS) is detached, after the others
        are in place."""
        where = Path(path)
        with _cgroup_fd(where) as fd:
            for name, attach_type in SOCK_ATTACH_TYPES.items():
                prog_fd = self._progs[name]
                mine = _libbpf.prog_info(prog_fd).id
                ours = [
                    i
                    for i in _libbpf.cgroup_prog_ids(fd, attach_type)
                    if _libbpf.prog_name(i) == name
                ]
                _take_place(
                    mine,
                    ours,
                    partial(_libbpf.cgroup_attach, fd, prog_fd, attach_type),
                    partial(_libbpf.cgroup_detach, fd, attach_type=attach_type),
                )
            self._detach_ours(fd, RETIRED_SOCK_PROGRAMS)
        self._cgroups.add(where)
        log.info("socket-level load balancing for the processes of cgroup %s", where)

    def detach_cgroup(self, path: str | os.PathLike[str]) -> None:
        """Take our socket-level programs off the cgroup (any of ours found there)."""
        where = Path(path)
        with _cgroup_fd(where) as fd:
            self._detach_ours(fd, {**SOCK_ATTACH_TYPES, **RETIRED_SOCK_PROGRAMS})
        self._cgroups.discard(where)

    @staticmethod
    def _detach_ours(cgroup_fd: int, programs: dict[str, int]) -> None:
        """Detach from the cgroup every program named as ours at its hook (name -> type)."""
        for name, attach_type in programs.items():
            for prog_id in _libbpf.cgroup_prog_ids(cgroup_fd, attach_type):
                if _libbpf.prog_name(prog_id) == name:
                    _detach_cgroup_program(cgroup_fd, prog_id, attach_type)

    # -- reading and cleaning up --------------------------------------------

    def counters(self) -> dict[str, int]:
        """The datapath's counters summed over CPUs."""
        return self.maps.counter_totals()

    def gc(self, now: int | None = None) -> GcStats:
        """Remove expired conntrack and affinity entries and rebuild the reply filter (see
        conntrack.collect). Not the filter while a migration waits: the old programs still
        make flows that finish_migration() copies in unmarked."""
        return collect(self.maps, now, reply_filter=not self.migrating)

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
                for ifindex in sorted(self._external):
                    try:
                        self.detach_external(ifindex)
                    except Exception as e:
                        log.warning("detach from external %s failed: %s", ifindex, e)
                for cgroup in sorted(self._cgroups):
                    try:
                        self.detach_cgroup(cgroup)
                    except Exception as e:
                        log.warning("detach from cgroup %s failed: %s", cgroup, e)
        finally:
            self.maps.close()
            self._close_programs()
            self._abort_migration()  # one never finished leaves the old datapath as it was
            if cleanup:
                remove_pins(self.pin_dir)

    def _close_programs(self) -> None:
        for fd in self._progs.values():
            os.close(fd)
        self._progs.clear()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
