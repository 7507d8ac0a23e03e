"""Clients that talk from inside a namespace: curl, UDP and TCP requests, a connect probe."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from ebpflb.cluster.netns import Netns


class ClientError(RuntimeError):
    """A client request failed (curl's exit code, or the socket error)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def curl(
    ns: Netns, url: str, *, max_time: float = 5.0, args: Sequence[str] = (), timeout: float = 60.0
) -> str:
    """`curl --max-time <max_time> <url>` run inside `ns`; returns the body.

    Raises ClientError (code = curl's exit status) unless curl succeeds with a
    2xx. `timeout` bounds the whole process, start-up included (a loaded
    machine can be slow to exec).
    """
    argv = ["curl", "-sS", "--fail", "--max-time", f"{max_time:g}", *args, url]
    done = ns.run(argv, timeout=timeout)
    if done.returncode != 0:
        raise ClientError(
            f"curl {url} in {ns.name}: exit {done.returncode}: {done.stderr.strip()}",
            done.returncode,
        )
    return done.stdout


def udp_request(
    ns: Netns,
    ip: str,
    port: int,
    payload: bytes = b"ping\n",
    *,
    timeout: float = 5.0,
    source: tuple[str, int] | None = None,
) -> str:
    """Send one datagram from `ns` and return the first reply, decoded."""
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        if source is not None:
            s.bind(source)
        try:
            s.sendto(payload, (ip, port))
            data, _ = s.recvfrom(65535)
        except OSError as e:
            raise ClientError(f"udp {ip}:{port} from {ns.name}: {e}", e.errno) from e
    return data.decode(errors="replace")


def tcp_request(
    ns: Netns, ip: str, port: int, payload: bytes = b"\n", *, timeout: float = 5.0
) -> str:
    """Connect from `ns`, send `payload`, half-close, and return everything read until EOF."""
    with ns.socket() as s:
        s.settimeout(timeout)
        chunks = []
        try:
            s.connect((ip, port))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise ClientError(f"tcp {ip}:{port} from {ns.name}: {e}", e.errno) from e
    return b"".join(chunks).decode(errors="replace")


def connect_errno(ns: Netns, ip: str, port: int, *, timeout: float = 5.0) -> int:
    """Try a TCP connect from `ns`: 0 if it succeeds, else the errno (ETIMEDOUT on timeout)."""
    with ns.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
        except TimeoutError:
            return errno.ETIMEDOUT
        except OSError as e:
            return e.errno or -1
    return 0
