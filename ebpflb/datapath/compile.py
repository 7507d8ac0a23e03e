"""The compiler child: bcc compiles, loads and pins programs, maps and layout, then exits.

The loader runs `python -m ebpflb.datapath.compile` (a JSON request on stdin, the layout on
stdout) so that bcc and LLVM, most of a process's memory once loaded, never live in the
agent, which opens what is pinned by path.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ebpflb.datapath import _libbpf, kbtf, layout
from ebpflb.datapath.maps import MAP_SPECS

MISMATCH = 3  # exit status: the pinned maps' layout is not what was compiled

SCHED_CLS, XDP, CGROUP_SOCK_ADDR = 3, 6, 18  # bcc's BPF.<program type>
# The cgroup hook (enum bpf_attach_type) of each socket-level program, fixed at load.
CGROUP_INET4_CONNECT, CGROUP_UDP4_SENDMSG, CGROUP_UDP4_RECVMSG = 10, 14, 19
CGROUP_INET4_GETPEERNAME, CGROUP_INET_SOCK_RELEASE = 29, 34
SOCK_ATTACH_TYPES = {
    "sock_connect4": CGROUP_INET4_CONNECT,
    "sock_sendmsg4": CGROUP_UDP4_SENDMSG,
    "sock_peername4": CGROUP_INET4_GETPEERNAME,
    "sock_recvmsg4": CGROUP_UDP4_RECVMSG,
}
# Socket-level programs older datapaths pinned and attached that this one no longer has
# (sock_release4 deleted a closed socket's sock_revnat entry; a connected socket's way back
# now lives in its own storage): the loader unpins them and detaches them from a cgroup,
# recognised by name like ours.
RETIRED_SOCK_PROGRAMS = {"sock_release4": CGROUP_INET_SOCK_RELEASE}
# Pinned programs: name -> program type.
PROGRAM_TYPES = {
    "from_pod": SCHED_CLS,
    "to_pod": SCHED_CLS,
    "nodeport_tc": SCHED_CLS,
    "nodeport_xdp": XDP,
    **dict.fromkeys(SOCK_ATTACH_TYPES, CGROUP_SOCK_ADDR),
}

# The helper number the tc programs call for the kfunc bpf_cast_to_kern_ctx
# (LB_KFUNC_KERN_CTX_CALL in bpf/lb_config.h), and the instruction it becomes.
KFUNC_KERN_CTX_CALL = 0x7EB1
BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2  # src_reg of a kfunc call; imm is the kfunc's BTF id


def patch_kfunc_calls(bpf: Any, name: bytes, btf_id: int) -> int:
    """Turn program name's calls of helper KFUNC_KERN_CTX_CALL into calls of the kfunc
    btf_id, in bcc's copy of the bytecode before it is loaded (bcc 0.26 has no kfunc
    relocation). Returns how many calls were turned."""
    from bcc import lib

    start = lib.bpf_function_start(bpf.module, name)
    size = lib.bpf_function_size(bpf.module, name)
    insns = bytearray(ctypes.string_at(start, size))
    turned = 0
    for off in range(0, size - 7, 8):  # the second half of a 16-byte load has opcode 0
        op, regs, _jump, imm = struct.unpack_from("<BBhi", insns, off)
        if op == BPF_CALL and regs == 0 and imm == KFUNC_KERN_CTX_CALL:
            struct.pack_into("<BBhi", insns, off, BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, btf_id)
            turned += 1
    if turned:
        ctypes.memmove(start, bytes(insns), size)
    return turned


def compiled_layout(bpf: Any) -> layout.Layout:
    """The layout bcc compiled: field names and offsets from the C, type and size from the
    kernel's maps. The types are decoded from bcc's descriptions of the C directly, not
    through bpf[name]: bcc 0.26 has no Python table for socket storage (and for a per-CPU
    map the description is one CPU's value, as the layout wants)."""
    from bcc import BPF, lib

    out: layout.Layout = {}
    for spec in MAP_SPECS:
        name = spec.name.encode()
        fd = lib.bpf_table_fd(bpf.module, name)
        if fd < 0:
            raise KeyError(f"map {spec.name} is not in the compiled program")
        key, value = (
            BPF._decode_table_type(json.loads(desc(bpf.module, name).decode()))
            for desc in (lib.bpf_table_key_desc, lib.bpf_table_leaf_desc)
        )
        info = _libbpf.map_info(fd)
        out[spec.name] = layout.MapLayout(
            info.type, info.max_entries, layout.StructLayout.of(key), layout.StructLayout.of(value)
        )
    return out


def compile_and_pin(
    target: Path, config: Any, bpf_dir: Path, expect: layout.Layout | None
) -> layout.Layout | None:
    """Compile and pin under target. expect: the layout of the maps pinned there (None if
    there are none); bcc adopts them whatever they hold, so if the compiled layout differs
    this gives up before loading a program and returns None (the caller then compiles into
    an empty directory and migrates, see migrate.py)."""
    from bcc import BPF

    from ebpflb.datapath.loader import render_source

    source = render_source(bpf_dir / "lb_kern.c")
    bpf = BPF(text=source.encode(), cflags=config.cflags(target))
    try:
        compiled = compiled_layout(bpf)
        if expect is not None and compiled != expect:
            for name in compiled.keys() - expect.keys():  # pinned just now by bcc
                (target / name).unlink(missing_ok=True)
            return None
        facts = kbtf.skb_facts() if config.read_ip_summed else None
        for name, prog_type in PROGRAM_TYPES.items():
            attach_type = SOCK_ATTACH_TYPES.get(name, -1)
            if facts is not None:
                patch_kfunc_calls(bpf, name.encode(), facts.kern_ctx_kfunc)
            fn = bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
            _libbpf.pin_replace(fn.fd, target / name)
        for name in RETIRED_SOCK_PROGRAMS:  # an older datapath's, adopted here
            (target / name).unlink(missing_ok=True)
        if expect is None or not (target / layout.LAYOUT_PIN).exists():
            layout.pin_layout(target / layout.LAYOUT_PIN, compiled)
        return compiled
    finally:
        bpf.cleanup()


def main() -> int:
    from ebpflb.datapath.loader import DatapathConfig

    req = json.load(sys.stdin)
    expect = layout.decode(bytes.fromhex(req["expect"])) if req["expect"] else None
    result = compile_and_pin(
        Path(req["target"]), DatapathConfig(**req["config"]), Path(req["bpf_dir"]), expect
    )
    if result is None:
        return MISMATCH
    sys.stdout.write(layout.encode(result).hex())
    return 0


def request(target: Path, config: Any, bpf_dir: Path, expect: layout.Layout | None) -> str:
    """The JSON request main() reads."""
    return json.dumps(
        {
            "target": os.fspath(target),
            "config": asdict(config),
            "bpf_dir": os.fspath(bpf_dir),
            "expect": layout.encode(expect).hex() if expect else "",
        }
    )


if __name__ == "__main__":
    sys.exit(main())
