"""Servers and clients run with the namespaces' python (Node.start / Node.python) by the
real-veth tests. The server answers in one of two shapes: `echo` sends back what it got,
`whoami` a line with the address it came from and then what it got (so a test sees what
source the backend saw); the client is told which shape to expect."""

SERVER = """
import socket, sys, threading, time
whoami = sys.argv[1] == "whoami"
def answer(data, peer):
    return peer.encode() + b"\\n" + data if whoami else data
def serve(c, peer):
    with c:
        if not whoami:  # echo as it comes
            while d := c.recv(65536):
                c.sendall(d)
            return
        data = b""
        while d := c.recv(65536):
            data += d
        c.sendall(answer(data, peer))
def tcp(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a[0]), daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(65536)
        s.sendto(answer(d, a[0]), a)
for spec in sys.argv[2:]:
    kind, port = spec.split(":")
    threading.Thread(target=tcp if kind == "tcp" else udp, args=(int(port),), daemon=True).start()
time.sleep(0.3)
print("ready")
while True:
    time.sleep(3600)
"""

# argv: echo|whoami, then a JSON list of [kind, host, port, size]; prints a JSON list of
# {"result": ok|mismatch N/M|refused|reset|timeout, "peer": the whoami line or None, "seconds"}.
CLIENT = """
import json, socket, sys, time
whoami = sys.argv[1] == "whoami"
def run(kind, host, port, size):
    t = time.monotonic()
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    peer = None
    try:
        if kind == "tcp":
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while d := s.recv(65536):
                    got += d
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((host, port))
                s.send(data)
                got = s.recv(65536)
        if whoami:
            line, _, got = got.partition(b"\\n")
            peer = line.decode()
        r = "ok" if got == data else "mismatch %d/%d" % (len(got), len(data))
    except ConnectionRefusedError:
        r = "refused"
    except ConnectionResetError:
        r = "reset"
    except socket.timeout:
        r = "timeout"
    return {"result": r, "peer": peer, "seconds": time.monotonic() - t}
print(json.dumps([run(*c) for c in json.loads(sys.argv[2])]))
"""
