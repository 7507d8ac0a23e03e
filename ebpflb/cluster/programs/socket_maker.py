"""Makes sockets on request and hands them over, so they belong to this process's cgroup."""

# Run by path (python3 socket_maker.py FD) inside a namespace and a cgroup,
# stdlib only. The kernel stamps a socket with the network namespace and the
# cgroup of the process that calls socket(); cgroup BPF programs (connect4,
# sendmsg4...) go by that stamp, whoever uses the socket later.
#
# Protocol on FD, a SOCK_SEQPACKET unix socket: each request is struct
# "=iii" (family, type, proto); the answer is b"ok" carrying the new socket's
# descriptor (SCM_RIGHTS), or b"<errno> <message>". EOF on FD ends the program.

from __future__ import annotations

import socket
import struct
import sys

REQUEST = struct.Struct("=iii")


def serve(channel: socket.socket) -> None:
    while request := channel.recv(REQUEST.size):
        family, type_, proto = REQUEST.unpack(request)
        try:
            made = socket.socket(family, type_, proto)
        except OSError as e:
            channel.send(f"{e.errno} {e.strerror}".encode())
            continue
        with made:
            socket.send_fds(channel, [b"ok"], [made.fileno()])


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: socket_maker.py FD")
    with socket.socket(fileno=int(sys.argv[1])) as channel:
        serve(channel)


if __name__ == "__main__":
    main()
