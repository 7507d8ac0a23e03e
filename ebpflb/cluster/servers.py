"""Real servers in a namespace (nginx, UDP echo, TCP who-am-I), started and probed until ready."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpflb.cluster.clients import ClientError, tcp_request
from ebpflb.cluster.netns import Netns
from ebpflb.cluster.programs import PYTHON, UDP_ECHO, WHOAMI

NGINX = "/usr/sbin/nginx"


class ServerError(RuntimeError):
    """A server did not start or did not become ready in time."""


@dataclass(frozen=True)
class Server:
    """A server process running in a namespace."""

    kind: str
    """"http" (nginx), "udp-echo" or "whoami"."""
    name: str
    """What the server answers with (the pod's name unless told otherwise)."""
    netns: str
    ip: str
    """The address it was probed on (it listens on every address of its namespace)."""
    port: int
    protocol: str
    """"tcp" or "udp"."""
    workdir: Path
    process: subprocess.Popen[Any] = field(compare=False, repr=False)
    ns: Netns = field(compare=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (its whole process group); idempotent."""
        self.ns.stop(self.process, grace)

    def logs(self) -> str:
        """Everything the server wrote to its log files so far."""
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')}")
        return "\n".join(parts)


def _wait_ready(server: Server, probe: Callable[[], bool], timeout: float) -> Server:
    """Poll `probe` (run from inside the server's namespace) until it says yes."""
    deadline = time.monotonic() + timeout
    last: str = "no probe yet"
    while True:
        if not server.running:
            server.stop(0)
            raise ServerError(
                f"{server.kind} server in {server.netns} exited "
                f"({server.process.returncode}):\n{server.logs()}"
            )
        try:
            if probe():
                return server
            last = "unexpected answer"
        except (OSError, ClientError) as e:
            last = str(e)
        if time.monotonic() >= deadline:
            server.stop(0)
            raise ServerError(
                f"{server.kind} server in {server.netns} on {server.ip}:{server.port} "
                f"not ready after {timeout}s ({last}):\n{server.logs()}"
            )
        time.sleep(0.05)


def _nginx_string(text: str) -> str:
    if "$" in text:
        raise ValueError("nginx would expand '$' in the body as a variable")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def nginx_config(workdir: Path, port: int, body: str) -> str:
    """An nginx configuration that answers every request with `body`; all files in `workdir`."""
    d = workdir
    return f"""\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{
    worker_connections 512;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_timeout 5s;
    # Long connections must outlive a test (the default closes one after 1000 requests).
    keepalive_requests 1000000;
    server {{
        listen {port};
        location / {{
            return 200 {_nginx_string(body)};
        }}
    }}
}}
"""


def start_http_server(
    ns: Netns,
    *,
    name: str,
    ip: str,
    port: int,
    workdir: Path,
    body: str | None = None,
    timeout: float = 30.0,
) -> Server:
    """Debian's nginx in `ns`, answering `body` (default "<name>\\n") on every path of `port`."""
    d = Path(tempfile.mkdtemp(prefix=f"http-{port}-", dir=workdir))
    conf = d / "nginx.conf"
    conf.write_text(nginx_config(d, port, f"{name}\n" if body is None else body))
    out = (d / "stdout.log").open("wb")
    with out:
        proc = ns.popen(
            [NGINX, "-e", str(d / "error.log"), "-p", str(d), "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server("http", name, ns.name, ip, port, "tcp", d, proc, ns)
    request = f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode()
    return _wait_ready(
        server,
        lambda: tcp_request(ns, ip, port, request, timeout=2.0).startswith("HTTP/1.1 200"),
        timeout,
    )


def _start_script(
    kind: str,
    protocol: str,
    script: Path,
    ns: Netns,
    name: str,
    ip: str,
    port: int,
    workdir: Path,
) -> Server:
    d = Path(tempfile.mkdtemp(prefix=f"{kind}-{port}-", dir=workdir))
    out = (d / "server.log").open("wb")
    with out:
        proc = ns.popen(
            [PYTHON, "-I", "-u", str(script), "--name", name, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Server(kind, name, ns.name, ip, port, protocol, d, proc, ns)


def start_udp_echo_server(
    ns: Netns, *, name: str, ip: str, port: int, workdir: Path, timeout: float = 30.0
) -> Server:
    """A UDP server in `ns` that answers each datagram with "<name> <client ip>:<client port>"."""
    server = _start_script("udp-echo", "udp", UDP_ECHO, ns, name, ip, port, workdir)

    def probe() -> bool:
        # A connected socket sees the ICMP port unreachable at once while the
        # server is not bound yet, instead of waiting out the timeout.
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            s.connect((ip, port))
            s.send(b"probe\n")
            return s.recv(65535).decode().startswith(f"{name} ")

    return _wait_ready(server, probe, timeout)


def start_whoami_server(
    ns: Netns, *, name: str, ip: str, port: int, workdir: Path, timeout: float = 30.0
) -> Server:
    """A TCP server in `ns` that tells each client "<name> <peer ip>:<peer port>" (HTTP or raw)."""
    server = _start_script("whoami", "tcp", WHOAMI, ns, name, ip, port, workdir)
    return _wait_ready(
        server,
        lambda: tcp_request(ns, ip, port, b"probe\n", timeout=2.0).startswith(f"{name} "),
        timeout,
    )
