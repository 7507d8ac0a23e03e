"""Named network namespaces: create and delete them, run processes and open sockets inside them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ebpflb.cluster.programs import PYTHON, SOCKET_MAKER

NETNS_DIR = Path("/var/run/netns")
"""Where `ip netns add` bind-mounts named namespaces (iproute2's NETNS_RUN_DIR)."""

MARKER_ENV = "EBPFLB_CLUSTER"
"""Environment variable set in every process started in a cluster namespace: its prefix."""

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class NetnsError(RuntimeError):
    """An `ip` command or a namespace operation failed."""


def run_ip(args: Sequence[str], *, netns: str | None = None, timeout: float = 30.0) -> str:
    """Run `ip [-n netns] args...` and return its stdout; raise NetnsError on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout}s") from e
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def ip_batch(commands: Iterable[str], *, netns: str | None = None, timeout: float = 30.0) -> None:
    """Run several `ip` commands in one process (`ip -batch -`), stopping at the first error."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    text = "".join(f"{c}\n" for c in commands)
    try:
        done = subprocess.run(
            argv, input=text, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout}s") from e
    if done.returncode != 0:
        raise NetnsError(f"ip -batch in {netns or 'root ns'}: {done.stderr.strip()}\n{text}")


def netns_path(name: str) -> Path:
    """The file that names namespace `name` (what CNI_NETNS and setns(2) take)."""
    return NETNS_DIR / name


def list_netns(match: Callable[[str], bool] | None = None) -> list[str]:
    """Names of the named network namespaces, optionally filtered."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [n for n in names if match is None or match(n)]


def add_netns(name: str) -> None:
    """Create a named network namespace (fails if it exists)."""
    run_ip(["netns", "add", name])


def delete_netns(name: str) -> None:
    """Delete a named network namespace; a missing one is not an error."""
    if not netns_path(name).exists():
        return
    run_ip(["netns", "delete", name])


def join_cgroup_argv(cgroup: Path) -> list[str]:
    """The argv prefix that moves a command into cgroup v2 `cgroup` before it runs.

    The shell writes "0" (itself) to cgroup.procs, then execs the command,
    which keeps the cgroup, and so do its children. It must come before
    `ip netns exec`, whose fresh /sys hides the cgroup2 mount. If the cgroup
    is gone the command does not run (the shell says why on stderr).
    """
    return ["sh", "-c", 'echo 0 >"$0/cgroup.procs" && exec "$@"', str(cgroup)]


def exec_argv(name: str, *, cgroup: Path | None = None, host_mounts: bool = False) -> list[str]:
    """The argv prefix that runs a command in namespace `name` (and `cgroup`, if given).

    `ip netns exec` (the default) gives the command a private mount
    namespace with a fresh /sys of this network namespace, which HIDES the
    host's /sys/fs/bpf (bpffs), cgroup2 and tracefs mounts. With
    `host_mounts`, `nsenter --net` enters only the network namespace and
    keeps the caller's mounts (what an agent that pins maps needs), but
    /sys/class/net then shows the root namespace's interfaces: use netlink.
    """
    if host_mounts:
        enter = ["nsenter", f"--net={netns_path(name)}", "--"]
    else:
        enter = ["ip", "netns", "exec", name]
    return [*join_cgroup_argv(cgroup), *enter] if cgroup is not None else enter


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Call `fn` in a short-lived thread that has entered namespace `name`.

    setns(CLONE_NEWNET) changes only the calling thread, so the rest of the
    process stays where it is. Sockets made by `fn` keep belonging to `name`
    after the thread is gone; /proc/sys/net opened by `fn` is `name`'s.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if int(_libc.setns(fd, _CLONE_NEWNET)) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    thread = threading.Thread(target=target, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def netns_id(path: Path | str) -> tuple[int, int] | None:
    """(st_dev, st_ino) that identifies the namespace behind `path`, or None if it is gone."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def pids_in_netns(ids: Iterable[tuple[int, int]]) -> list[int]:
    """Live processes (not this one) whose network namespace is one of `ids`."""
    wanted = set(ids)
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid != me and netns_id(f"/proc/{pid}/ns/net") in wanted and not _is_zombie_or_gone(pid):
            found.append(pid)
    return found


def process_info(pid: int) -> tuple[list[str], dict[str, str]] | None:
    """argv and environment of `pid`, or None if it cannot be read (gone, kernel thread)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    env = {}
    for item in environ.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return argv, env


def kill_pids(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM `pids`, wait up to `grace` seconds, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if all(_is_zombie_or_gone(p) for p in pids):
                return
            time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members may all be zombies of a parent that has not reaped them yet.
    return any(_pgid_of(pid) == pgid and not _is_zombie_or_gone(pid) for pid in _pids())


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def stop_process_groups(procs: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> None:
    """Stop processes started in sessions of their own, with everything in their groups.

    SIGTERM to every group at once (nginx's master passes it to its workers),
    SIGKILL to what is left after `grace` seconds, and reap the leaders so no
    zombie is left.
    """
    pending = [p for p in procs if p.poll() is None or _group_alive(p.pid)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for proc in pending:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            time.sleep(0.02)
            for proc in list(pending):
                if proc.poll() is not None and not _group_alive(proc.pid):
                    pending.remove(proc)
        if not pending:
            return
    for proc in pending:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def stop_process_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop one process started in a session of its own, and its whole group."""
    stop_process_groups([proc], grace)


class Netns:
    """A handle on one named network namespace made by a cluster.

    Processes started with `popen` are tracked and stopped by `stop_all`
    (the cluster calls it on close). Each runs in its own session, so a
    whole process group (nginx's master and workers) is stopped at once.

    With a `cgroup` (a cgroup v2 folder), every process started through this
    handle runs in it, and so does every socket made by `socket` (see there).
    """

    def __init__(self, name: str, marker: str, cgroup: Path | None = None) -> None:
        self.name = name
        self.marker = marker
        self.cgroup = cgroup
        self._procs: list[subprocess.Popen[Any]] = []
        self._maker: _SocketMaker | None = None
        self._maker_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> Path:
        return netns_path(self.name)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Processes started by `popen` that have not been stopped."""
        return list(self._procs)

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(os.environ if env is None else env)
        merged[MARKER_ENV] = self.marker
        return merged

    def exec_prefix(self, host_mounts: bool = False) -> list[str]:
        """The argv prefix that runs a command in this namespace and cgroup (see `exec_argv`)."""
        return exec_argv(self.name, cgroup=self.cgroup, host_mounts=host_mounts)

    def popen(
        self, argv: Sequence[str], *, host_mounts: bool = False, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside the namespace, tracked so the cluster stops it on close.

        Keyword arguments go to subprocess.Popen; stdin defaults to /dev/null
        and the process gets a session of its own (its group is what gets
        killed). See `exec_prefix` for `host_mounts`.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw["env"] = self._env(kw.get("env"))
        kw["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [*self.exec_prefix(host_mounts), *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        *,
        check: bool = False,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        host_mounts: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace to completion and capture its output as text.

        On timeout the whole process group is killed and TimeoutExpired raised.
        See `exec_prefix` for `host_mounts`.
        """
        full = [*self.exec_prefix(host_mounts), *argv]
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except BaseException:
            stop_process_group(proc, grace=0.0)
            proc.communicate()
            raise
        done = subprocess.CompletedProcess(full, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        """Stop one process started by `popen` (and its process group)."""
        stop_process_group(proc, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process started by `popen` that is still tracked."""
        stop_process_groups(self._procs, grace)
        self._procs.clear()
        with self._maker_lock:
            if self._maker is not None:
                self._maker.close()
                self._maker = None

    def call(self, fn: Callable[[], T]) -> T:
        """Call `fn` from a thread inside this namespace (see `in_netns`)."""
        return in_netns(self.name, fn)

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket that lives in this namespace, usable from any thread of this process.

        The kernel stamps a socket with the cgroup of the process that makes
        it, and cgroup BPF programs (connect4, sendmsg4) go by that stamp. So
        with a cgroup, the socket is made by a helper process inside this
        namespace and cgroup (started at the first call, stopped by
        `stop_all`) and handed over; without one, by a thread of this process.
        """
        if self.cgroup is None:
            return self.call(lambda: socket.socket(family, type, proto))
        with self._maker_lock:
            if self._maker is None or not self._maker.running:
                if self._maker is not None:
                    self._maker.close()
                self._maker = _SocketMaker(self)
            maker = self._maker
        return maker.make(family, type, proto)

    def set_sysctls(self, settings: Mapping[str, str | int]) -> None:
        """Write sysctls (dotted keys, e.g. net.ipv4.ip_forward) in this namespace."""

        def write() -> None:
            for key, value in settings.items():
                Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")

        self.call(write)

    def sysctl(self, key: str) -> str:
        """Read one sysctl (dotted key) in this namespace."""
        return self.call(lambda: Path("/proc/sys", *key.split(".")).read_text().strip())

    def ip(self, *args: str) -> str:
        """Run `ip -n <this namespace> args...` and return its stdout."""
        return run_ip(args, netns=self.name)

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        """Run `ip -j -n <this namespace> args...` and parse its JSON output."""
        out = run_ip(["-j", *args], netns=self.name).strip()
        parsed: list[dict[str, Any]] = json.loads(out) if out else []
        return parsed


class _SocketMaker:
    """programs/socket_maker.py running in a namespace (and its cgroup), asked for sockets
    over a unix socket pair; each answer carries the new socket's descriptor."""

    TIMEOUT = 60.0
    """For an answer, the helper's start-up included (a loaded machine is slow to start Python)."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:  # the helper's end: once it is closed here, its exit reads as EOF
            self.proc = ns.popen(
                [PYTHON, "-I", str(SOCKET_MAKER), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        ours.settimeout(self.TIMEOUT)
        self.channel = ours
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def make(self, family: int, type: int, proto: int) -> socket.socket:
        with self._lock:
            try:
                self.channel.sendall(struct.pack("=iii", family, type, proto))
                msg, fds, _, _ = socket.recv_fds(self.channel, 256, 1)
            except OSError as e:  # TimeoutError, or ECONNRESET from a helper that died
                raise self._failed(str(e)) from e
            if not msg:
                raise self._failed("it closed its end")
        if fds:
            return socket.socket(fileno=fds[0])
        code, _, text = msg.decode().partition(" ")
        raise OSError(int(code), text)

    def _failed(self, what: str) -> NetnsError:
        """Stop the helper (a late answer would be taken for the next request's: the next
        socket() starts a new one) and say what it left on stderr."""
        self.ns.stop(self.proc, grace=0)
        err = self.proc.stderr.read() if self.proc.stderr else b""
        self.close()
        return NetnsError(
            f"socket maker in {self.ns.name}: {what} (exit status {self.proc.returncode}): "
            + err.decode(errors="replace").strip()
        )

    def close(self) -> None:
        """Close our end (the helper exits on EOF) and the helper's stderr pipe."""
        self.channel.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
