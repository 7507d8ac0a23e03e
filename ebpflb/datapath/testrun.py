"""Runs a loaded tc or XDP program on one packet with BPF_PROG_TEST_RUN (bpf_prog_test_run_opts)."""

from __future__ import annotations

import ctypes

from ebpflb.datapath import _libbpf

# Room for a program that grows the packet (an ICMP error is 28 bytes longer
# than what it quotes); the kernel fails a run whose output does not fit.
OUT_ROOM = 4096

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4


class SkbCtx(ctypes.Structure):
    """The head of struct __sk_buff (linux/bpf.h) up to ifindex: the fields a test run may set
    that we use. The kernel takes a shorter context and zero-fills the rest."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


class XdpCtx(ctypes.Structure):
    """struct xdp_md (linux/bpf.h)."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


def run(
    prog_fd: int, packet: bytes, repeat: int = 1, *, xdp: bool = False, ifindex: int = 0
) -> tuple[int, bytes, int]:
    """Run the program on packet (an Ethernet frame; a tc program sees it as an skb).

    ifindex: the interface the packet comes in on, in the calling thread's network
    namespace (what FIB lookups start from; 0: loopback). Returns (the program's return
    value, the packet as the program left it, average duration per run in ns). With
    repeat > 1 every run sees the packet as the previous run left it. The kernel refuses
    frames shorter than an Ethernet header (EINVAL): a tc program never sees those.
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + OUT_ROOM)
    ctx: ctypes.Structure | None = None
    if xdp:
        ctx = XdpCtx(data_end=len(packet), ingress_ifindex=ifindex)
    elif ifindex:
        ctx = SkbCtx(ifindex=ifindex, ingress_ifindex=ifindex)
    opts = _libbpf.TestRunOpts(
        sz=ctypes.sizeof(_libbpf.TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=len(data_out),
        repeat=repeat,
    )
    if ctx is not None:
        opts.ctx_in = ctypes.addressof(ctx)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    _libbpf.check(
        _libbpf.lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN"
    )
    retval = ctypes.c_int32(opts.retval).value  # TC_ACT_UNSPEC is -1
    return retval, data_out.raw[: opts.data_size_out], opts.duration
