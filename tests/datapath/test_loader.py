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
    Direction,
    find_bpf_dir,
    remove_pins,
    render_source,
)
from tests.datapath import netns
from tests.datapath.conftest import TEST_CONFIG, Lab, new_pin_dir, prog_id, tc_programs_in

pytestmark = pytest.mark.datapath

HOOKS: tuple[Direction, ...] = ("ingress", "egress")


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
    """tcx, where the kernel has it (this one): no qdisc, no filter."""
    assert lab.dp.tcx
    with netns.node() as n:
        pod = n.add_pod("a", 5)
        idx = n.ifindex(pod.host_veth)
        with netns.inside(n.ns):
            lab.dp.attach(idx)
            lab.dp.attach(idx)  # again: replaces, no second program
            lab.dp.attach(idx, "egress")
        for hook in HOOKS:
            want = [(PROGRAMS[hook], prog_id(lab.dp.program_fd(hook)))]
            assert tc_programs_in(n, pod.host_veth, hook) == want
            assert filters(n, pod.host_veth, hook) == []
        assert qdiscs(n, pod.host_veth) == ["noqueue"]
        assert lab.dp.attached == {(idx, "ingress"), (idx, "egress")}
        with netns.inside(n.ns):
            lab.dp.detach(idx)
        assert tc_programs_in(n, pod.host_veth, "ingress") == []
        assert tc_programs_in(n, pod.host_veth, "egress") != []
        with netns.inside(n.ns):
            lab.dp.detach(idx, "egress")
            lab.dp.detach(idx, "egress")  # nothing there any more: fine
        assert tc_programs_in(n, pod.host_veth, "egress") == []
        assert not lab.dp.attached


def test_attach_replace_detach_clsact() -> None:
    """A filter under clsact, as on kernels without tcx (asked for here)."""
    pin_dir = new_pin_dir()
    try:
        with netns.node() as n, Datapath(pin_dir, TEST_CONFIG, tc_attach="clsact") as dp:
            assert not dp.tcx
            pod = n.add_pod("a", 5)
            idx = n.ifindex(pod.host_veth)
            with netns.inside(n.ns):
                dp.attach(idx)
                dp.attach(idx)  # again: replaces, no second filter
                dp.attach(idx, "egress")
            for hook, program in (("ingress", "from_pod"), ("egress", "to_pod")):
                (f,) = filters(n, pod.host_veth, hook)
                opts = f["options"]
                assert isinstance(opts, dict)
                assert opts["bpf_name"] == program and opts["direct-action"], opts
                assert tc_programs_in(n, pod.host_veth, hook) == [(program, opts["prog"]["id"])]
            with netns.inside(n.ns):
                dp.detach(idx)
                assert filters(n, pod.host_veth, "ingress") == []
                assert "clsact" in qdiscs(n, pod.host_veth)  # egress still uses it
                dp.detach(idx, "egress")
                dp.detach(idx, "egress")  # nothing there any more: fine
            assert "clsact" not in qdiscs(n, pod.host_veth)
            assert not dp.attached
            dp.close(cleanup=True)
    finally:
        remove_pins(pin_dir)


def test_tcx_and_clsact_take_over_from_each_other_and_leave_others_alone(
    datapath: Datapath,
) -> None:
    """An agent on tcx replaces an older agent's clsact filter (and the qdisc goes); one
    on clsact replaces a tcx program of ours; a program of someone else on the tcx hook
    stays where it is, before ours, through all of it."""
    from bcc import BPF

    other = BPF(text=b"int other(struct __sk_buff *skb) { return -1; }")  # TCX_NEXT
    other_fd = other.load_func(b"other", BPF.SCHED_CLS).fd
    pin_dir = new_pin_dir()
    try:
        with netns.node() as n:
            pod = n.add_pod("a", 5)
            idx = n.ifindex(pod.host_veth)
            with netns.inside(n.ns):
                _libbpf.tcx_attach(idx, other_fd, _libbpf.BPF_TCX_INGRESS)
            theirs = ("other", prog_id(other_fd))

            old = Datapath(pin_dir, TEST_CONFIG, tc_attach="clsact")
            with netns.inside(n.ns):
                old.attach(idx)
            (f,) = filters(n, pod.host_veth, "ingress")
            assert f["options"]["bpf_name"] == "from_pod"
            old.close()

            new = Datapath(pin_dir, TEST_CONFIG)  # the same pins: adopted
            with netns.inside(n.ns):
                new.attach(idx)
            mine = ("from_pod", prog_id(new.program_fd("ingress")))
            assert tc_programs_in(n, pod.host_veth, "ingress") == [theirs, mine]
            assert filters(n, pod.host_veth, "ingress") == []
            assert "clsact" not in qdiscs(n, pod.host_veth)
            new.close()

            back = Datapath(pin_dir, TEST_CONFIG, tc_attach="clsact")
            with netns.inside(n.ns):
                back.attach(idx)
            (f,) = filters(n, pod.host_veth, "ingress")
            mine = ("from_pod", f["options"]["prog"]["id"])
            assert tc_programs_in(n, pod.host_veth, "ingress") == [theirs, mine]
            with netns.inside(n.ns):
                back.detach(idx)
            assert tc_programs_in(n, pod.host_veth, "ingress") == [theirs]
            assert "clsact" not in qdiscs(n, pod.host_veth)
            back.close(cleanup=True)
            with netns.inside(n.ns):
                _libbpf.tcx_detach(idx, other_fd, _libbpf.BPF_TCX_INGRESS)
    finally:
        other.cleanup()
        remove_pins(pin_dir)


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
            (old,) = tc_programs_in(n, pod.host_veth, "ingress")
            assert (pin_dir / "conntrack").exists()

            second = Datapath(pin_dir, TEST_CONFIG)
            with netns.inside(n.ns):
                second.attach(n.ifindex(pod.host_veth))
            (new,) = tc_programs_in(n, pod.host_veth, "ingress")
            assert new[0] == old[0] == "from_pod" and new != old  # the new one replaced it
            with netns.inside(n.ns):
                second.close(cleanup=True)
            assert tc_programs_in(n, pod.host_veth, "ingress") == []
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
