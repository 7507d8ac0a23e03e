"""TCP "who am I" server for test pods: tells each client "<name> <peer ip>:<peer port>" it sees."""

# Run by path (python3 whoami.py --name NAME --port PORT), so stdlib only.
#
# Protocol: read the client's first line (or EOF). If it is an HTTP request,
# read the headers and answer with an HTTP/1.0 response (so curl works);
# otherwise answer the bare line. Either way the server then closes.

from __future__ import annotations

import argparse
import socket
import socketserver

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ")


def _read_until(conn: socket.socket, buf: bytes, marker: bytes, limit: int = 65536) -> bytes:
    while marker not in buf and len(buf) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10.0)
        ip, port = self.client_address[:2]
        line = f"{self.server.name} {ip}:{port}\n".encode()
        try:
            buf = _read_until(conn, b"", b"\n")
            if buf.startswith(HTTP_METHODS):
                buf = _read_until(conn, buf, b"\r\n\r\n")
                head = (
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(line)}\r\n".encode()
                    + b"Connection: close\r\n\r\n"
                )
                conn.sendall(head if buf.startswith(b"HEAD ") else head + line)
            else:
                conn.sendall(line)
            conn.shutdown(socket.SHUT_WR)
            _read_until(conn, b"", b"\0never\0", limit=1 << 20)  # drain until the client closes
        except OSError:
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        super().__init__((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with Server(args.name, args.host, args.port) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
