"""A copy of bpf/ whose conntrack value has another layout: what a newer agent could ship."""

from __future__ import annotations

import shutil
from pathlib import Path

from ebpflb.datapath.loader import find_bpf_dir

# struct lb_ct_value with lifetime widened to 64 bits (every later field moves), pad2
# gone and a new field at the end: 48 bytes instead of 40.
CT_VALUE_EDITS = (
    ("lb_structs.h", "\t__u32 lifetime;", "\t__u64 lifetime;"),
    ("lb_structs.h", "\t__u16 pad2;\t   /* always 0 */", "\t__u16 packets;\t   /* new */"),
    ("conntrack.h", "v->pad2 = 0;", "v->packets = 0;"),
)


def variant_bpf_dir(dest: Path) -> Path:
    """bpf/ copied to dest with CT_VALUE_EDITS made; dest."""
    shutil.copytree(find_bpf_dir(), dest)
    for name, old, new in CT_VALUE_EDITS:
        text = (dest / name).read_text()
        if old not in text:
            raise AssertionError(f"{name} no longer has {old!r}: update CT_VALUE_EDITS")
        (dest / name).write_text(text.replace(old, new))
    return dest
