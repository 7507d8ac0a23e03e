"""cgroup v2 folders for a cluster's nodes: find the hierarchy, make, list and remove them."""

# A node's cgroup holds every process of the node and of its pods, so BPF
# programs attached to it (socket-level load balancing: connect4, sendmsg4...)
# act on exactly that node. Processes join a cgroup before they enter their
# namespace (netns.join_cgroup_argv). Removing one takes three steps, in this
# order: no process may be left in it (rmdir fails with EBUSY), programs are
# detached (the kernel would free them with the cgroup, but an explicit detach
# does not depend on a dying cgroup's delayed release), then rmdir, children
# before parents.

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ebpflb.cluster.netns import kill_pids

CGROUP2_FSTYPE = "cgroup2"


class CgroupError(RuntimeError):
    """No cgroup v2 hierarchy, or a cgroup could not be made or removed."""


@cache
def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup/unified on a hybrid host,
    /sys/fs/cgroup on a pure v2 one."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == CGROUP2_FSTYPE:
                return Path(fields[1])
    raise CgroupError("no cgroup2 file system is mounted (see /proc/self/mounts)")


def cgroup2_mounted() -> bool:
    try:
        cgroup2_root()
    except CgroupError:
        return False
    return True


def make_cgroup(path: Path) -> None:
    """mkdir a cgroup; it must not exist (a fresh cluster prefix never does)."""
    try:
        path.mkdir()
    except FileExistsError:
        raise CgroupError(f"cgroup {path} exists already") from None
    except OSError as e:
        raise CgroupError(f"cannot make cgroup {path}: {e.strerror}") from e


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of `pid` (the `0::` line of /proc/PID/cgroup), or None if it is gone."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def subtree(path: Path) -> list[Path]:
    """`path` and every cgroup below it, children before their parents."""
    found = []
    for top, dirs, _ in os.walk(path, topdown=False):
        found += [Path(top, d) for d in dirs]
    return [*found, path] if path.is_dir() else found


def cgroup_pids(path: Path) -> list[int]:
    """Live processes in `path` and the cgroups below it."""
    pids = []
    for cg in subtree(path):
        with contextlib.suppress(FileNotFoundError):
            pids += [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    return pids


def _populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


@dataclass(frozen=True)
class AttachedProgram:
    """A BPF program attached to a cgroup, as bpftool names it."""

    cgroup: Path
    attach_type: str
    """bpftool's (libbpf's) name: cgroup_inet4_connect, cgroup_udp4_sendmsg..."""
    id: int
    name: str

    def __str__(self) -> str:
        return f"program {self.id} ({self.name}, {self.attach_type}) on cgroup {self.cgroup}"


def attached_programs(path: Path) -> list[AttachedProgram]:
    """The BPF programs attached to this one cgroup (not those it inherits)."""
    done = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise CgroupError(f"bpftool cgroup show {path}: {done.stderr.strip()}")
    progs = json.loads(done.stdout) if done.stdout.strip() else []
    return [
        AttachedProgram(path, str(p["attach_type"]), int(p["id"]), str(p.get("name", "")))
        for p in progs
    ]


def detach_programs(path: Path) -> list[AttachedProgram]:
    """Detach every BPF program attached to this one cgroup; returns what was detached."""
    detached = attached_programs(path)
    for prog in detached:
        argv = ["bpftool", "cgroup", "detach", str(path), prog.attach_type, "id", str(prog.id)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise CgroupError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return detached


def remove_cgroup(path: Path, grace: float = 5.0) -> list[AttachedProgram]:
    """Remove cgroup `path` and those below it: stop their processes (SIGTERM, SIGKILL after
    `grace` seconds), detach their BPF programs, rmdir. Returns the programs detached.

    A missing `path` is not an error, so a cut-short removal can be redone.
    """
    if not path.is_dir():
        return []
    if pids := cgroup_pids(path):
        kill_pids(pids, grace)
    # Whatever forked while we were killing: cgroup.kill (Linux 5.14) takes the
    # whole subtree at once, new children included.
    kill_file = path / "cgroup.kill"
    if _populated(path) and kill_file.exists():
        kill_file.write_text("1\n")
    deadline = time.monotonic() + 10.0
    while _populated(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    detached: list[AttachedProgram] = []
    for cg in subtree(path):
        detached += detach_programs(cg)
        try:
            cg.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            left = cgroup_pids(cg) if e.errno == errno.EBUSY else []
            raise CgroupError(
                f"cannot remove cgroup {cg}: {e.strerror}"
                + (f" (processes still in it: {left})" if left else "")
            ) from e
    return detached
