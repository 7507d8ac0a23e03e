"""Health check node ports: for each NodePort Service with externalTrafficPolicy=Local,
an HTTP server that answers 200 when this node has a ready endpoint and 503 when not,
as kube-proxy's does, so an outside load balancer sends traffic only to such nodes."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("ebpflb.agent")


@dataclass(frozen=True)
class HealthCheck:
    """What one health check port reports."""

    namespace: str
    name: str
    local_endpoints: int  # ready endpoints of the Service on this node


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    check: HealthCheck


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        c = self.server.check
        body = json.dumps(
            {
                "service": {"namespace": c.namespace, "name": c.name},
                "localEndpoints": c.local_endpoints,
                "serviceProxyHealthy": True,
            }
        ).encode()
        self.send_response(200 if c.local_endpoints > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Load-Balancing-Endpoint-Weight", str(c.local_endpoints))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class HealthChecks:
    """The running health check servers, one per port, kept equal to what sync() is given."""

    def __init__(self, address: str = "0.0.0.0") -> None:
        self.address = address
        self._servers: dict[int, _Server] = {}

    def sync(self, wanted: dict[int, HealthCheck]) -> None:
        for port in list(self._servers):
            if port not in wanted:
                self._stop(port)
        for port, check in wanted.items():
            server = self._servers.get(port)
            if server is None:
                try:
                    server = _Server((self.address, port), _Handler)
                except OSError as e:
                    log.warning(
                        "health check port %d for %s/%s: %s", port, check.namespace, check.name, e
                    )
                    continue
                server.check = check
                threading.Thread(
                    target=server.serve_forever, name=f"healthz-{port}", daemon=True
                ).start()
                self._servers[port] = server
                log.info("health check for %s/%s on :%d", check.namespace, check.name, port)
            server.check = check

    def _stop(self, port: int) -> None:
        server = self._servers.pop(port)
        server.shutdown()
        server.server_close()

    @property
    def ports(self) -> list[int]:
        return sorted(self._servers)

    def close(self) -> None:
        for port in list(self._servers):
            self._stop(port)
