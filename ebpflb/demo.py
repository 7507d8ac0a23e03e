"""`ebpflb demo`: nginx pods behind a ClusterIP in a namespace cluster, seen from a client pod."""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from ebpflb.cluster import Pod
from ebpflb.harness import LbCluster, eventually, remove_cluster
from ebpflb.objects import load_documents

REPO = Path(__file__).resolve().parents[1]
REQUESTS = 200


def manifests_dir() -> Path:
    for candidate in (REPO.parent / "shared" / "manifests", REPO / "examples"):
        if (candidate / "nginx-named-port.yaml").exists():
            return candidate
    raise SystemExit("demo: cannot find nginx-named-port.yaml (../shared/manifests or examples/)")


def say(text: str) -> None:
    print(text, flush=True)


def http_get(lb: LbCluster, client: Pod, ip: str, port: int) -> tuple[str, float]:
    """One HTTP/1.0 GET from inside the client pod: (body, seconds)."""
    ns = lb.cluster.ns(client)
    t0 = time.perf_counter()
    with ns.socket() as s:
        s.settimeout(5)
        s.connect((ip, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    elapsed = time.perf_counter() - t0
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer from {ip}:{port}: {head[:60]!r}")
    return body.decode().strip(), elapsed


def cleanup(prefix: str) -> int:
    removed = remove_cluster(prefix)
    for what in removed:
        say(f"removed {what}")
    say(f"cluster {prefix}: nothing left" if removed else f"cluster {prefix}: nothing found")
    return 0


def run(keep: bool = False) -> int:
    docs = load_documents((manifests_dir() / "nginx-named-port.yaml").read_text())
    pod_doc = next(d for d in docs if d["kind"] == "Pod")
    svc_doc = next(d for d in docs if d["kind"] == "Service")
    labels = pod_doc["metadata"]["labels"]
    ports = pod_doc["spec"]["containers"][0]["ports"]  # containerPort 80 named http-web-svc
    port = int(ports[0]["containerPort"])

    say("ebpflb demo: one node, two nginx pods, one client pod, all network namespaces")
    lb = LbCluster(nodes=1)
    ok = False
    try:
        node = lb.cluster.nodes[0]
        say(f"  cluster {lb.prefix}: node {node.name} ({node.netns}), registry at {lb.address}")
        backends = []
        for name in ("nginx-1", "nginx-2"):
            pod = lb.cluster.add_pod(node, name)
            lb.cluster.start_http_server(pod, port=port)
            lb.register_pod(pod, labels, ports)
            backends.append(pod)
            named = ports[0]["name"]
            say(f"  pod {name}: {pod.ip}, nginx on :{port} ({named}), veth {pod.host_veth}")
        client = lb.cluster.add_client_pod(node)
        say(f"  pod {client.name}: {client.ip}")
        lb.apply(svc_doc)
        svc_name = svc_doc["metadata"]["name"]
        vip = lb.cluster_ip(svc_name)
        svc_port = int(svc_doc["spec"]["ports"][0]["port"])
        say(f"  service {svc_name}: ClusterIP {vip}:{svc_port} -> targetPort {ports[0]['name']}")
        lb.wait_attached(client)
        eventually(lambda: http_get(lb, client, vip, svc_port), timeout=60)

        hits: Counter[str] = Counter()
        latency: dict[str, list[float]] = {}
        for _ in range(REQUESTS):
            body, secs = http_get(lb, client, vip, svc_port)
            hits[body] += 1
            latency.setdefault(body, []).append(secs)
        say("")
        say(f"{REQUESTS} HTTP requests from {client.name} to http://{vip}:{svc_port}/ :")
        rows = [("SERVICE", "FRONTEND", "BACKEND", "HITS", "MEDIAN LATENCY")]
        for pod in backends:
            lat = latency.get(pod.name, [])
            med = f"{statistics.median(lat) * 1000:.2f} ms" if lat else "-"
            rows.append(
                (
                    svc_name,
                    f"{vip}:{svc_port}/TCP",
                    f"{pod.name} {pod.ip}:{port}",
                    str(hits[pod.name]),
                    med,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            say("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        ok = all(hits[p.name] > 0 for p in backends) and sum(hits.values()) == REQUESTS
        say("")
        say("both backends answered" if ok else "NOT every backend answered")
        if keep and ok:
            say("")
            say("The cluster stays up (--keep). Try it:")
            say(f"  ip netns exec {client.netns} curl http://{vip}/")
            say(f"  EBPFLB_REGISTRY={lb.address} {sys.argv[0]} get svc")
            say(f"  ip netns exec {node.netns} tc filter show dev {backends[0].host_veth} ingress")
            say(f"  {sys.argv[0]} maps --pin-dir {lb.pin_dir(node)}")
            say(f"  bpftool map dump pinned {lb.pin_dir(node)}/services")
            say(f"Remove it with: {sys.argv[0]} demo --cleanup {lb.prefix}")
            lb.keep()
    except (TimeoutError, OSError, RuntimeError) as e:
        say(f"demo failed: {e}")
        for n in lb.cluster.nodes:
            say(lb.agent_log(n)[-3000:])
    finally:
        if not (keep and ok):
            lb.close()
            say("cleaned up: namespaces, links, pins and processes removed")
    return 0 if ok else 1
