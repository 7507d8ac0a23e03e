"""Loading, attaching, detaching and cleaning up: nothing is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ebpflb.datapath import _libbpf
from ebpflb.datapath.compile import RETIRED_SOCK_PROGRAMS
from ebpflb.datapath.loader import (
    MAIN_SOURCE,
    PINNED_NAMES,
    PROGRAMS,
    Datapath,
    DatapathError,
    find_bpf_dir,
    remove_pins,
    render_source,
)
from tests.datapath import netns
from tests.datapath.conftest import TEST_CONFIG, Lab, new_pin_dir

pytestmark = pytest.mark.datapath


def test_render_source_inlines_every_local_header() -> None:
    bpf = find_bpf_dir()
    text = render_source(bpf / MAIN_SOURCE)
    assert '#include "' not in text
    headers = {p.name for p in bpf.glob("*.h")}
    inlined = {
        Path(line.split('"')[1]).name for line in text.splitlines() if line.startswith("#line 1 ")
    }
    assert headers <= inlined


def filters(n: netns.Node, ifname: str, hook: str) -> list[dict[str, object]]:
    out = netns.sh("tc", "-n", n.ns, "-j", "filter", "show", "dev", ifname, hook)
    return [f for f in json.loads(out) if "options" in f]


def qdiscs(n: netns.Node, ifname: str) -> list[str]:
    out = netns.sh("tc", "-n", n.ns, "-j", "qdisc", "show", "dev", ifname)
    return [str(q["kind"]) for q in json.loads(out)]


def test_attach_replace_detach(lab: Lab) -> None:
    with netns.node() as n:
        pod = n.add_pod("a", 5)
        idx = n.ifindex(pod.host_veth)
        with netns.inside(n.ns):
            lab.dp.attach(idx)
            lab.dp.attach(idx)  # again: replaces, no second filter
            lab.dp.attach(idx, "egress")
        for hook, program in (("ingress", "from_pod"), ("egress", "to_pod")):
            (f,) = filters(n, pod.host_veth, hook)
            opts = f["options"]
            assert isinstance(opts, dict)
            assert opts["bpf_name"] == program and opts["direct-action"], opts
        assert lab.dp.attached == {(idx, "ingress"), (idx, "egress")}
        with netns.inside(n.ns):
            lab.dp.detach(idx)
            assert filters(n, pod.host_veth, "ingress") == []
            assert "clsact" in qdiscs(n, pod.host_veth)  # egress still uses it
            lab.dp.detach(idx, "egress")
            lab.dp.detach(idx, "egress")  # nothing there any more: fine
        assert "clsact" not in qdiscs(n, pod.host_veth)
        assert not lab.dp.attached


def test_agent_exit_restart_and_cleanup(datapath: Datapath) -> None:
    """An agent exits (program and pins stay), a new one adopts and re-attaches, then exits
    with cleanup: no filter, no qdisc, no pin is left."""
    pin_dir = new_pin_dir()
    try:
        with netns.node() as n:
            pod = n.add_pod("a", 5)
            first = Datapath(pin_dir, TEST_CONFIG)
            assert sorted(p.name for p in pin_dir.iterdir()) == sorted(PINNED_NAMES)
            with netns.inside(n.ns):
                first.attach(n.ifindex(pod.host_veth))
            first.close()
            (old,) = filters(n, pod.host_veth, "ingress")
            assert (pin_dir / "conntrack").exists()

            second = Datapath(pin_dir, TEST_CONFIG)
            with netns.inside(n.ns):
                second.attach(n.ifindex(pod.host_veth))
                (new,) = filters(n, pod.host_veth, "ingress")
                assert new["options"] != old["options"]  # the new program replaced the old
                second.close(cleanup=True)
            assert filters(n, pod.host_veth, "ingress") == []
            assert "clsact" not in qdiscs(n, pod.host_veth)
            assert not pin_dir.exists()
            second.close(cleanup=True)  # twice: no error
    finally:
        remove_pins(pin_dir)


def test_cleanup_removes_an_older_versions_program_pins(datapath: Datapath) -> None:
    """remove_pins (--cleanup) also unpins what an older version pinned and this one no
    longer has (sock_release4), so the directory goes."""
    pin_dir = new_pin_dir()
    try:
        Datapath(pin_dir, TEST_CONFIG).close()
        prog = _libbpf.obj_get(str(pin_dir / "from_pod"))  # any program: only the name counts
        try:
            for name in RETIRED_SOCK_PROGRAMS:
                _libbpf.obj_pin(prog, pin_dir / name)
        finally:
            os.close(prog)
        remove_pins(pin_dir)
        assert not pin_dir.exists()
    finally:
        remove_pins(pin_dir)


def test_pin_dir_must_be_on_bpffs(tmp_path: Path) -> None:
    with pytest.raises(DatapathError, match="bpffs"):
        Datapath(tmp_path / "pins", TEST_CONFIG)


def test_every_program_is_loaded(datapath: Datapath) -> None:
    assert set(PROGRAMS) == {"ingress", "egress"}
    assert datapath.program_fd("ingress") == datapath.prog_fd
    assert datapath.program_fd("egress") != datapath.prog_fd
