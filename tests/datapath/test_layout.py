"""The Python mirrors of the map structs agree with what bcc compiled from bpf/lb_structs.h."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re

import pytest

from ebpflb.datapath import structs
from ebpflb.datapath.layout import StructLayout, read_pinned
from ebpflb.datapath.loader import Datapath, DatapathConfig, find_bpf_dir
from ebpflb.datapath.maps import MAP_SPECS, MapSpec, struct_format

pytestmark = pytest.mark.datapath


@pytest.mark.parametrize("spec", MAP_SPECS, ids=[s.name for s in MAP_SPECS])
def test_struct_layout_matches_compiled_c(datapath: Datapath, spec: MapSpec) -> None:
    """datapath.layout is what the compiling child read from bcc's types of the C structs."""
    compiled = datapath.layout[spec.name]
    assert StructLayout.of(spec.key_type) == compiled.key, f"{spec.name} key"
    assert StructLayout.of(spec.value_type) == compiled.value, f"{spec.name} value"
    assert read_pinned(datapath.pin_dir) == datapath.layout  # and that is what is pinned


@pytest.mark.parametrize("spec", MAP_SPECS, ids=[s.name for s in MAP_SPECS])
def test_map_type_and_size_as_configured(datapath: Datapath, spec: MapSpec) -> None:
    from ebpflb.datapath import _libbpf

    fd = _libbpf.obj_get(str(datapath.pin_dir / spec.name))
    try:
        info = _libbpf.map_info(fd)
    finally:
        os.close(fd)
    assert info.type == spec.map_type
    assert info.max_entries == datapath.config.max_entries(spec.name)


def _defines(header: str) -> dict[str, str]:
    text = (find_bpf_dir() / header).read_text()
    return dict(re.findall(r"^#define (LB_\w+) (\S+)", text, re.MULTILINE))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LB_SVC_F_AFFINITY", structs.SVC_F_AFFINITY),
        ("LB_SVC_F_NODEPORT", structs.SVC_F_NODEPORT),
        ("LB_BE_F_LOCAL", structs.BE_F_LOCAL),
        ("LB_CT_FORWARD", structs.CT_FORWARD),
        ("LB_CT_REVERSE", structs.CT_REVERSE),
        ("LB_CT_F_HAIRPIN", structs.CT_F_HAIRPIN),
        ("LB_CT_F_ESTABLISHED", structs.CT_F_ESTABLISHED),
        ("LB_CT_F_CLOSING", structs.CT_F_CLOSING),
        ("LB_CT_F_SNAT", structs.CT_F_SNAT),
        ("LB_MAX_NODE_IPS", structs.MAX_NODE_IPS),
        ("LB_MAX_EXT_IFACES", structs.MAX_EXT_IFACES),
        ("LB_IF_F_PARTIAL_CSUM", structs.IF_F_PARTIAL_CSUM),
        ("LB_IF_F_NO_XDP_TX", structs.IF_F_NO_XDP_TX),
    ],
)
def test_flag_values_match_the_header(name: str, value: int) -> None:
    assert int(_defines("lb_structs.h")[name], 0) == value


def test_config_defaults_match_the_header() -> None:
    """The loader passes every -D flag; the header's defaults must still say the same."""
    d = _defines("lb_config.h")
    c = DatapathConfig()
    want = {
        "LB_MAX_SERVICES": c.max_services,
        "LB_MAX_BACKENDS": c.max_backends,
        "LB_MAX_SERVICE_BACKENDS": c.max_service_backends,
        "LB_MAX_CONNTRACK": c.max_conntrack,
        "LB_MAX_AFFINITY": c.max_affinity,
        "LB_CT_LIFETIME_TCP": c.ct_lifetime_tcp,
        "LB_CT_LIFETIME_SYN": c.ct_lifetime_syn,
        "LB_CT_LIFETIME_CLOSE": c.ct_lifetime_close,
        "LB_CT_LIFETIME_UDP": c.ct_lifetime_udp,
        "LB_CT_REFRESH_NS": c.ct_refresh_ns,
        "LB_HAIRPIN_ADDR": int(ipaddress.IPv4Address(c.hairpin_ip)),
        "LB_HASH_SEED": c.hash_seed,
    }
    assert {k: int(d[k].removesuffix("ULL"), 0) for k in want} == want
    assert {f"-D{k}={v}".split("=")[0] for k, v in want.items()} <= {
        f.split("=")[0] for f in c.cflags(find_bpf_dir())
    }


def test_struct_formats_cover_every_byte() -> None:
    for spec in MAP_SPECS:
        for t in (spec.key_type, spec.value_type):
            assert struct_format(t).size == ctypes.sizeof(t)
