"""The compiler child: bcc compiles, loads and pins programs, maps and layout, then exits.

The loader runs `python -m ebpflb.datapath.compile` (a JSON request on stdin, the layout on
stdout) so that bcc and LLVM, most of a process's memory once loaded, never live in the
agent, which opens what is pinned by path.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ebpflb.datapath import _libbpf, layout
from ebpflb.datapath.maps import MAP_SPECS

MISMATCH = 3  # exit status: the pinned maps' layout is not what was compiled

# Pinned programs: name -> bcc program type (SCHED_CLS 3, XDP 6).
PROGRAM_TYPES = {"from_pod": 3, "to_pod": 3, "nodeport_tc": 3, "nodeport_xdp": 6}


def compiled_layout(bpf: Any) -> layout.Layout:
    """The layout bcc compiled: field names and offsets from the C, type and size from the
    kernel's maps."""
    out: layout.Layout = {}
    for spec in MAP_SPECS:
        table = bpf[spec.name.encode()]
        info = _libbpf.map_info(table.map_fd)
        out[spec.name] = layout.MapLayout(
            info.type,
            info.max_entries,
            layout.StructLayout.of(table.Key),
            layout.StructLayout.of(getattr(table, "sLeaf", table.Leaf)),  # per-CPU: one CPU's
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
        for name, prog_type in PROGRAM_TYPES.items():
            fn = bpf.load_func(name.encode(), prog_type)
            _libbpf.pin_replace(fn.fd, target / name)
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
