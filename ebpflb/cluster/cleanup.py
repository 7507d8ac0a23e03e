"""Finding and removing what clusters leave behind; closing open clusters at exit or SIGTERM."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Protocol

from ebpflb.cluster.cgroups import (
    CgroupError,
    attached_programs,
    cgroup2_root,
    cgroup_pids,
    remove_cgroup,
    subtree,
)
from ebpflb.cluster.netns import (
    MARKER_ENV,
    NetnsError,
    delete_netns,
    kill_pids,
    list_netns,
    netns_id,
    netns_path,
    pids_in_netns,
    process_info,
    run_ip,
)

log = logging.getLogger(__name__)

PREFIX_BASE = "elb-"
"""Every cluster prefix is this plus 6 hex digits: elb-1a2b3c."""

CNI_STATE_DIR = Path("/var/lib/cni/networks")
"""host-local's default dataDir: a cluster never writes there, and leftovers checks it."""

OWNER_FILE = "owner.json"


def new_prefix() -> str:
    """A fresh cluster prefix, e.g. elb-1a2b3c."""
    return f"{PREFIX_BASE}{secrets.token_hex(3)}"


def matches(name: str, prefix: str) -> bool:
    """Does `name` belong to `prefix`? (elb-1a2b3c owns elb-1a2b3c-node0, not elb-1a2b3cd.)"""
    if prefix.endswith("-"):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + "-")


def _arg_matches(arg: str, prefix: str) -> bool:
    return any(matches(part, prefix) for part in arg.split("/"))


def _temp_root() -> Path:
    return Path(tempfile.gettempdir())


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def write_owner(workdir: Path) -> None:
    """Record this process as the owner of a cluster's work directory."""
    owner = {"pid": os.getpid(), "start": _start_time(os.getpid())}
    tmp = workdir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(owner))
    tmp.rename(workdir / OWNER_FILE)


def _owner_alive(workdir: Path) -> bool | None:
    """True/False if the owner file says so; None if there is no readable owner file."""
    try:
        owner = json.loads((workdir / OWNER_FILE).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    start = owner.get("start")
    return start is not None and _start_time(pid) == start


def _workdirs(prefix: str) -> list[Path]:
    try:
        entries = sorted(_temp_root().iterdir())
    except OSError:
        return []
    return [p for p in entries if matches(p.name, prefix)]


def _own_processes(prefix: str) -> list[tuple[int, str]]:
    """Processes that belong to `prefix`: marked, named after it, inside its namespaces
    or its cgroups."""
    me = os.getpid()
    in_ns = set(pids_in_netns(i for n in list_netns() if matches(n, prefix) for i in _ids(n)))
    in_ns.update(pid for cg in _cgroups(prefix) for pid in cgroup_pids(cg))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        info = process_info(pid)
        if info is None:
            continue
        argv, env = info
        if not argv:  # kernel thread or zombie
            continue
        marker = env.get(MARKER_ENV, "")
        if (
            pid in in_ns
            or (marker and matches(marker, prefix))
            or any(_arg_matches(a, prefix) for a in argv)
        ):
            found.append((pid, " ".join(argv)))
    return found


def _ids(name: str) -> list[tuple[int, int]]:
    i = netns_id(netns_path(name))
    return [i] if i else []


def _root_links(prefix: str) -> list[str]:
    try:
        links = json.loads(run_ip(["-j", "link", "show"]) or "[]")
    except (NetnsError, ValueError):
        return []
    return [str(link["ifname"]) for link in links if matches(str(link.get("ifname", "")), prefix)]


def _cgroups(prefix: str) -> list[Path]:
    """Cluster cgroups (top-level cgroup v2 folders, one per cluster) named after `prefix`."""
    try:
        root = cgroup2_root()
        return [p for p in sorted(root.iterdir()) if p.is_dir() and matches(p.name, prefix)]
    except (CgroupError, OSError):
        return []


def _cgroup_leftovers(prefix: str) -> list[str]:
    found = []
    for top in _cgroups(prefix):
        found.append(f"cgroup {top}")
        for cg in subtree(top):
            try:
                found += [str(prog) for prog in attached_programs(cg)]
            except CgroupError as e:
                found.append(str(e))
    return found


def _cni_state(prefix: str) -> list[Path]:
    try:
        return [p for p in sorted(CNI_STATE_DIR.iterdir()) if matches(p.name, prefix)]
    except OSError:
        return []


def leftovers(prefix: str) -> list[str]:
    """Everything on this machine that carries `prefix`: namespaces, root-ns links, processes,
    cgroups (with the BPF programs attached to them), temp dirs (with their host-local
    dataDir) and any host-local state under /var/lib/cni.

    Empty after a cluster with this prefix is closed.
    """
    found = [f"netns {n}" for n in list_netns(lambda n: matches(n, prefix))]
    found += [f"link {name} (root namespace)" for name in _root_links(prefix)]
    found += [f"process {pid}: {cmd}" for pid, cmd in _own_processes(prefix)]
    found += _cgroup_leftovers(prefix)
    found += [f"path {p}" for p in _workdirs(prefix)]
    found += [f"path {p}" for p in _cni_state(prefix)]
    return found


def cleanup_stale(prefix: str) -> list[str]:
    """Remove everything `leftovers(prefix)` would list; returns what was there.

    Use it with one cluster's prefix (elb-1a2b3c), or with PREFIX_BASE only
    when no other cluster may be running on the machine; `stale_prefixes()`
    says which clusters' owners are gone.
    """
    before = leftovers(prefix)
    pids = [pid for pid, _ in _own_processes(prefix)]
    if pids:
        kill_pids(pids, grace=2.0)
    # Pods before nodes (longer names first); veths go with their namespaces.
    for name in sorted(list_netns(lambda n: matches(n, prefix)), key=len, reverse=True):
        try:
            delete_netns(name)
        except NetnsError as e:
            log.warning("cleanup_stale: %s", e)
    for link in _root_links(prefix):
        try:
            run_ip(["link", "delete", link])
        except NetnsError as e:
            log.warning("cleanup_stale: %s", e)
    for cgroup in _cgroups(prefix):
        try:
            remove_cgroup(cgroup, grace=2.0)
        except (CgroupError, OSError) as e:
            log.warning("cleanup_stale: %s", e)
    # Work directories last: stale_prefixes() finds a crashed cluster by them.
    for path in _workdirs(prefix) + _cni_state(prefix):
        shutil.rmtree(path, ignore_errors=True)
    return before


def stale_prefixes(base: str = PREFIX_BASE, min_age: float = 60.0) -> list[str]:
    """Cluster prefixes under `base` whose owning process is gone.

    Only prefixes with a work directory (/tmp/<prefix>-*) are considered, so
    namespaces that some other tool named elb-... are never taken for ours. A
    prefix is stale when none of its work directories names a live owner; one
    without an owner file counts only once it is `min_age` seconds old (its
    cluster may be starting up). A cluster removes its work directory last.
    """
    pattern = re.compile(rf"^({re.escape(base)}[0-9a-f]{{6}})-")
    prefixes: set[str] = set()
    for path in _workdirs(base):
        if m := pattern.match(path.name):
            prefixes.add(m.group(1))
    stale = []
    now = time.time()
    for prefix in sorted(prefixes):
        alive = False
        for workdir in _workdirs(prefix):
            state = _owner_alive(workdir)
            young = False
            with contextlib.suppress(OSError):
                young = now - workdir.stat().st_mtime < min_age
            if state or (state is None and young):
                alive = True
        if not alive:
            stale.append(prefix)
    return stale


# Closing open clusters when the process ends.


class Closable(Protocol):
    def close(self) -> None: ...


_open: dict[int, tuple[int, Closable]] = {}
"""id(obj) -> (pid of the process that opened it, obj)."""
_lock = threading.Lock()
_hooks_installed = False


def _close_all() -> None:
    with _lock:
        # A forked child inherits this hook, not the clusters: leave them alone.
        objs = [obj for pid, obj in _open.values() if pid == os.getpid()]
    for obj in reversed(objs):
        try:
            obj.close()
        except Exception:
            log.exception("closing %r at exit", obj)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP once a cluster is open.

    A KeyboardInterrupt, so it unwinds `with Cluster()` blocks and pytest stops
    the session and runs fixture finalizers (a SystemExit would only fail the
    current test); whatever is still open is closed by the atexit hook.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


_critical_depth = 0
_pending_signal: int | None = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending_signal
    if _critical_depth:
        _pending_signal = signum  # raised when the critical section ends
        return
    raise Terminated(signum)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold off SIGTERM/SIGHUP's Terminated until the block is done (teardown runs whole)."""
    global _critical_depth, _pending_signal
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if _critical_depth == 0 and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            raise Terminated(signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def track(obj: Closable) -> None:
    """Close `obj` at interpreter exit and on SIGTERM/SIGHUP unless it was closed before."""
    with _lock:
        _install_hooks()
        _open[id(obj)] = (os.getpid(), obj)


def untrack(obj: Closable) -> None:
    with _lock:
        _open.pop(id(obj), None)
