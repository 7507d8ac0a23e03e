"""Runs a loaded tc program on one packet with BPF_PROG_TEST_RUN (bpf_prog_test_run_opts)."""

from __future__ import annotations

import ctypes

from ebpflb.datapath import _libbpf

# Room for a program that grows the packet (an ICMP error is 28 bytes longer
# than what it quotes); the kernel fails a run whose output does not fit.
OUT_ROOM = 4096

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


def run(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
    """Run the program on packet (an Ethernet frame, in skb mode).

    Returns (the program's return value, the packet as the program left it,
    average duration per run in ns). With repeat > 1 every run sees the
    packet as the previous run left it. The kernel refuses frames shorter
    than an Ethernet header (EINVAL): a tc program never sees those.
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + OUT_ROOM)
    opts = _libbpf.TestRunOpts(
        sz=ctypes.sizeof(_libbpf.TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=len(data_out),
        repeat=repeat,
    )
    _libbpf.check(
        _libbpf.lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN"
    )
    retval = ctypes.c_int32(opts.retval).value  # TC_ACT_UNSPEC is -1
    return retval, data_out.raw[: opts.data_size_out], opts.duration
