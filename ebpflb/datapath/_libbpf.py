"""Thin ctypes bindings to the few libbpf.so.1 calls the datapath needs (maps, pins, test runs)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from ctypes import POINTER, c_char_p, c_int, c_uint32, c_uint64, c_void_p
from functools import cache

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SK_STORAGE = 24

BPF_OBJ_NAME_LEN = 16

# linux/if_link.h
XDP_FLAGS_SKB_MODE = 1 << 1  # generic XDP
XDP_FLAGS_DRV_MODE = 1 << 2  # native XDP
XDP_FLAGS_REPLACE = 1 << 4  # only if the attached program is opts.old_prog_fd


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (linux/bpf.h); the kernel fills what fits."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: bytes
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (linux/bpf.h), up to the name."""

    type: int
    id: int
    name: bytes
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.x (bpf/bpf.h)."""

    sz: int
    data_in: int | None
    data_out: int | None
    data_size_in: int
    data_size_out: int
    ctx_in: int | None
    ctx_out: int | None
    ctx_size_in: int
    ctx_size_out: int
    retval: int
    repeat: int
    duration: int
    flags: int
    cpu: int
    batch_size: int
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class XdpAttachOpts(ctypes.Structure):
    """struct bpf_xdp_attach_opts of libbpf 1.x."""

    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", c_int), ("_end", c_int)]


class ProgAttachOpts(ctypes.Structure):
    """struct bpf_prog_attach_opts of libbpf 1.1 (later versions only add fields)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", c_uint32), ("replace_prog_fd", c_int)]


BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2
# enum bpf_attach_type (Linux 6.6): tcx, the tc hooks without a qdisc (newer than the
# libbpf 1.1 headers of Debian 12, so spelled out here)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47


class BpfError(OSError):
    """A libbpf call failed; errno says why."""


@cache
def lib() -> ctypes.CDLL:
    """libbpf.so.1, with the signatures used here declared."""
    so = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for name, args in {
        "bpf_map_update_elem": [c_int, c_void_p, c_void_p, c_uint64],
        "bpf_map_lookup_elem": [c_int, c_void_p, c_void_p],
        "bpf_map_delete_elem": [c_int, c_void_p],
        "bpf_map_get_next_key": [c_int, c_void_p, c_void_p],
        "bpf_obj_get": [c_char_p],
        "bpf_obj_pin": [c_int, c_char_p],
        "bpf_obj_get_info_by_fd": [c_int, c_void_p, POINTER(c_uint32)],
        "bpf_prog_test_run_opts": [c_int, POINTER(TestRunOpts)],
        "bpf_xdp_attach": [c_int, c_int, c_uint32, c_void_p],
        "bpf_xdp_detach": [c_int, c_uint32, c_void_p],
        "bpf_xdp_query_id": [c_int, c_int, POINTER(c_uint32)],
        "bpf_prog_get_fd_by_id": [c_uint32],
        "bpf_prog_attach_opts": [c_int, c_int, c_uint32, POINTER(ProgAttachOpts)],
        "bpf_prog_detach2": [c_int, c_int, c_uint32],
        "bpf_prog_query": [
            c_int,
            c_uint32,
            c_uint32,
            POINTER(c_uint32),
            POINTER(c_uint32),
            POINTER(c_uint32),
        ],
        "bpf_map_create": [c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p],
        "bpf_map_update_batch": [c_int, c_void_p, c_void_p, POINTER(c_uint32), c_void_p],
        "bpf_map_delete_batch": [c_int, c_void_p, POINTER(c_uint32), c_void_p],
        "bpf_map_lookup_batch": [
            c_int,
            c_void_p,
            c_void_p,
            c_void_p,
            c_void_p,
            POINTER(c_uint32),
            c_void_p,
        ],
    }.items():
        fn = getattr(so, name)
        fn.argtypes = args
        fn.restype = c_int
    return so


def check(ret: int, what: str) -> int:
    """Raise BpfError for a libbpf 1.x failure (a negative errno), else return ret."""
    if ret < 0:
        code = -ret
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd."""
    return check(lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin {os.fspath(path)}")


def pin_replace(fd: int, path: str | os.PathLike[str]) -> None:
    """Pin fd at path, replacing what is pinned there in one step (pin aside, rename over)."""
    p = os.fspath(path)
    tmp = os.path.join(os.path.dirname(p), f"{os.path.basename(p)}-new")  # no dots in bpffs
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    obj_pin(fd, tmp)
    os.rename(tmp, p)


def map_create(map_type: int, name: str, key_size: int, value_size: int, entries: int) -> int:
    """A new map; returns its fd."""
    fd = lib().bpf_map_create(map_type, name.encode(), key_size, value_size, entries, None)
    return check(fd, f"creating map {name}")


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Write count entries (keys and values packed back to back) in one syscall.
    BpfError on failure: entries before the failing one may have been written."""
    n = c_uint32(count)
    check(lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(n), None), "batch update")


def array_lookup_range(fd: int, first: int, count: int, value_size: int) -> bytes:
    """The values of entries first..first+count-1 (first > 0) of an array map, back to back,
    in one syscall: a batch lookup resumes after the key given (first - 1)."""
    after, last = c_uint32(first - 1), c_uint32()
    keys = ctypes.create_string_buffer(4 * count)
    values = ctypes.create_string_buffer(value_size * count)
    n = c_uint32(count)
    ret = lib().bpf_map_lookup_batch(
        fd, ctypes.byref(after), ctypes.byref(last), keys, values, ctypes.byref(n), None
    )
    if ret != -errno.ENOENT:  # ENOENT: the map ended (with n short of count, refused below)
        check(ret, "batch lookup")
    if n.value != count:
        raise BpfError(errno.ERANGE, f"entries {first}..{first + count - 1}: {n.value} found")
    return values.raw


def map_delete_batch(fd: int, keys: bytes, count: int) -> None:
    """Delete count entries (keys packed back to back) in one syscall. BpfError on
    failure (ENOENT when a key is not there): entries before it may be gone."""
    n = c_uint32(count)
    check(lib().bpf_map_delete_batch(fd, keys, ctypes.byref(n), None), "batch delete")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    """Attach (or replace) the XDP program of ifindex in the mode flags says."""
    check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, None), f"XDP attach to {ifindex}")


def xdp_detach(ifindex: int, flags: int) -> None:
    check(lib().bpf_xdp_detach(ifindex, flags, None), f"XDP detach from {ifindex}")


def xdp_replace(ifindex: int, prog_fd: int, old_fd: int, flags: int) -> None:
    """Replace the XDP program of ifindex, only if it still is old_fd's (atomically)."""
    opts = XdpAttachOpts(sz=ctypes.sizeof(XdpAttachOpts), old_prog_fd=old_fd)
    ret = lib().bpf_xdp_attach(ifindex, prog_fd, flags | XDP_FLAGS_REPLACE, ctypes.byref(opts))
    check(ret, f"XDP replace on {ifindex}")


def xdp_prog_id(ifindex: int, flags: int) -> int:
    """Id of the XDP program attached to ifindex in that mode, 0 if there is none."""
    prog_id = c_uint32(0)
    check(lib().bpf_xdp_query_id(ifindex, flags, ctypes.byref(prog_id)), f"XDP query {ifindex}")
    return prog_id.value


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd of the program with that id."""
    return check(lib().bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")


def cgroup_attach(cgroup_fd: int, prog_fd: int, attach_type: int, replace_fd: int = -1) -> None:
    """Attach a program to a cgroup's hook beside others (BPF_F_ALLOW_MULTI); with replace_fd,
    in place of that program, in one step (fails if it is no longer attached there)."""
    _attach(cgroup_fd, prog_fd, attach_type, BPF_F_ALLOW_MULTI, replace_fd, "a cgroup")


def cgroup_detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    _detach(cgroup_fd, prog_fd, attach_type, "a cgroup")


def cgroup_prog_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to the cgroup itself at that hook (not inherited ones)."""
    return _query(cgroup_fd, attach_type, "querying a cgroup")


def tcx_attach(ifindex: int, prog_fd: int, attach_type: int, replace_fd: int = -1) -> None:
    """Attach a program to an interface's tcx hook (BPF_TCX_INGRESS/EGRESS), after the
    programs there; with replace_fd, in place of that program, in one step (fails if it is
    no longer attached there). EEXIST: the program is attached there already."""
    _attach(ifindex, prog_fd, attach_type, 0, replace_fd, f"interface {ifindex}")


def tcx_detach(ifindex: int, prog_fd: int, attach_type: int) -> None:
    _detach(ifindex, prog_fd, attach_type, f"interface {ifindex}")


def _attach(
    target: int, prog_fd: int, attach_type: int, flags: int, replace_fd: int, what: str
) -> None:
    """BPF_PROG_ATTACH to target (a cgroup's fd, an interface's index), in place of the
    program of replace_fd if it is >= 0 (BPF_F_REPLACE)."""
    if replace_fd >= 0:
        flags |= BPF_F_REPLACE
    opts = ProgAttachOpts(sz=ctypes.sizeof(ProgAttachOpts), flags=flags, replace_prog_fd=replace_fd)
    ret = lib().bpf_prog_attach_opts(prog_fd, target, attach_type, ctypes.byref(opts))
    check(ret, f"attaching to {what} (attach type {attach_type})")


def _detach(target: int, prog_fd: int, attach_type: int, what: str) -> None:
    ret = lib().bpf_prog_detach2(prog_fd, target, attach_type)
    check(ret, f"detaching from {what} (attach type {attach_type})")


def tcx_prog_ids(ifindex: int, attach_type: int) -> list[int]:
    """Ids of the programs at an interface's tcx hook, in the order they run. EINVAL: the
    kernel has no tcx (before Linux 6.6)."""
    return _query(ifindex, attach_type, f"tcx query of interface {ifindex}")


def _query(target: int, attach_type: int, what: str) -> list[int]:
    ids = (c_uint32 * 64)()
    count = c_uint32(len(ids))
    flags = c_uint32(0)
    ret = lib().bpf_prog_query(
        target, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)
    )
    check(ret, f"{what} (attach type {attach_type})")
    return list(ids[: count.value])


@cache
def has_tcx() -> bool:
    """Whether the kernel has tcx hooks: a query of the loopback interface (ifindex 1 in
    every network namespace) is understood."""
    try:
        tcx_prog_ids(1, BPF_TCX_INGRESS)
    except BpfError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


def prog_name(prog_id: int) -> str | None:
    """Name of the program with that id, None if it is gone."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return prog_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "info")
    return info


def xdp_prog_name(ifindex: int, flags: int) -> str | None:
    """Name of the XDP program attached to ifindex in that mode, None if there is none."""
    prog_id = xdp_prog_id(ifindex, flags)
    return prog_name(prog_id) if prog_id else None


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots in a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
