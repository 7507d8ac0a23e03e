"""UDP echo server for test pods: answers every datagram with "<name> <client ip>:<client port>"."""

# Run by path (python3 udp_echo.py --name NAME --port PORT), so stdlib only.

from __future__ import annotations

import argparse
import socket


def serve(name: str, host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        while True:
            _data, (ip, cport) = sock.recvfrom(65535)
            sock.sendto(f"{name} {ip}:{cport}\n".encode(), (ip, cport))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.name, args.host, args.port)


if __name__ == "__main__":
    main()
