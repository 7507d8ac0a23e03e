"""`ebpflb demo`: nginx pods behind a ClusterIP in a namespace cluster, seen from a client pod."""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

from ebpflb.cluster import Node, Pod, tcp_request
from ebpflb.cluster.netns import Netns
from ebpflb.datapath.loader import PROGRAMS
from ebpflb.datapath.maps import LbMaps
from ebpflb.harness import LbCluster, eventually, remove_cluster
from ebpflb.objects import Key, load_documents

REPO = Path(__file__).resolve().parents[1]
REQUESTS = 200
Row = tuple[str, ...]


def manifests_dir() -> Path:
    for candidate in (REPO.parent / "shared" / "manifests", REPO / "examples"):
        if (candidate / "nginx-named-port.yaml").exists():
            return candidate
    raise SystemExit("demo: cannot find nginx-named-port.yaml (../shared/manifests or examples/)")


def say(text: str) -> None:
    print(text, flush=True)


def http_get(ns: Netns, ip: str, port: int) -> tuple[str, float]:
    """One HTTP/1.0 GET from inside a namespace: (body, seconds)."""
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


def who(ns: Netns, ip: str, port: int) -> tuple[str, str]:
    """Ask a who-am-I server: (its pod, the client address it saw)."""
    name, peer = tcp_request(ns, ip, port, b"").split()[:2]
    return name, peer.rsplit(":", 1)[0]


def print_table(rows: list[Row]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        say("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def measure(ns: Netns, ip: str, port: int) -> tuple[Counter[str], dict[str, list[float]]]:
    hits: Counter[str] = Counter()
    latency: dict[str, list[float]] = {}
    for _ in range(REQUESTS):
        body, secs = http_get(ns, ip, port)
        hits[body] += 1
        latency.setdefault(body, []).append(secs)
    return hits, latency


def hit_rows(
    service: str,
    frontend: str,
    backends: list[Pod],
    port: int,
    hits: Counter[str],
    latency: dict[str, list[float]],
) -> list[Row]:
    rows: list[Row] = []
    for pod in backends:
        lat = latency.get(pod.name, [])
        med = f"{statistics.median(lat) * 1000:.2f} ms" if lat else "-"
        backend = f"{pod.name}@{pod.node} {pod.ip}:{port}"
        rows.append((service, frontend, backend, str(hits[pod.name]), med))
    return rows


def cleanup(prefix: str) -> int:
    removed = remove_cluster(prefix)
    for what in removed:
        say(f"removed {what}")
    say(f"cluster {prefix}: nothing left" if removed else f"cluster {prefix}: nothing found")
    return 0


def run(keep: bool = False, nodes: int = 2, nodeport_mode: str = "") -> int:
    docs = load_documents((manifests_dir() / "nginx-named-port.yaml").read_text())
    pod_doc = next(d for d in docs if d["kind"] == "Pod")
    svc_doc = next(d for d in docs if d["kind"] == "Service")
    np_doc = load_documents((manifests_dir() / "nodeport.yaml").read_text())[0]
    labels = pod_doc["metadata"]["labels"]
    ports = [*pod_doc["spec"]["containers"][0]["ports"], {"name": "whoami", "containerPort": 8080}]
    port = int(ports[0]["containerPort"])  # 80, named http-web-svc
    n_pods = max(2, nodes)

    say(
        f"ebpflb demo: {nodes} node(s), {n_pods} nginx pods, a client pod and an outside "
        "client, all network namespaces"
    )
    extra = ["--external-iface", f"eth0:{nodeport_mode}"] if nodeport_mode else []
    lb = LbCluster(nodes=nodes, agent_args=extra)
    ok = False
    try:
        for node in lb.cluster.nodes:
            say(f"  node {node.name}: {node.ip}, pods {node.pod_cidr} ({node.netns})")
        say(f"  cluster {lb.prefix}, registry at {lb.address}")
        backends = []
        for i in range(n_pods):
            node = lb.cluster.nodes[i % nodes]
            pod = lb.cluster.add_pod(node, f"nginx-{i + 1}")
            lb.cluster.start_http_server(pod, port=port)
            lb.cluster.start_whoami_server(pod, port=8080)
            lb.register_pod(pod, labels, ports)
            backends.append(pod)
            say(f"  pod {pod.name} on {node.name}: {pod.ip}, nginx :{port} ({ports[0]['name']})")
        client = lb.cluster.add_client_pod(lb.cluster.nodes[0])
        say(f"  pod {client.name} on {client.node}: {client.ip}")
        lb.apply(svc_doc, np_doc)
        for policy in ("Cluster", "Local"):
            lb.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": f"whoami-{policy.lower()}"},
                    "spec": {
                        "type": "NodePort",
                        "selector": labels,
                        "externalTrafficPolicy": policy,
                        "ports": [{"port": 8080, "targetPort": "whoami"}],
                    },
                }
            )
        svc_name = svc_doc["metadata"]["name"]
        vip = lb.cluster_ip(svc_name)
        svc_port = int(svc_doc["spec"]["ports"][0]["port"])
        say(f"  service {svc_name}: ClusterIP {vip}:{svc_port} -> targetPort {ports[0]['name']}")
        for b in [*backends, client]:
            lb.wait_attached(b)
        client_ns = lb.cluster.ns(client)
        eventually(lambda: http_get(client_ns, vip, svc_port), timeout=60)

        hits, latency = measure(client_ns, vip, svc_port)
        say("")
        say(f"{REQUESTS} HTTP requests from {client.name} to http://{vip}:{svc_port}/ :")
        rows: list[Row] = [("SERVICE", "FRONTEND", "BACKEND", "HITS", "MEDIAN LATENCY")]
        rows += hit_rows(svc_name, f"{vip}:{svc_port}/TCP", backends, port, hits, latency)
        print_table(rows)
        ok = all(hits[p.name] > 0 for p in backends) and sum(hits.values()) == REQUESTS

        outside = lb.cluster.ns(lb.cluster.external)
        np_name = np_doc["metadata"]["name"]
        node_port = int(np_doc["spec"]["ports"][0]["nodePort"])
        say("")
        say(
            f"{REQUESTS} HTTP requests per node from outside ({lb.cluster.external.ip}) "
            f"to {np_name}'s NodePort :"
        )
        rows = [("SERVICE", "FRONTEND", "BACKEND", "HITS", "MEDIAN LATENCY")]
        for node in lb.cluster.nodes:
            eventually(partial(http_get, outside, node.ip, node_port), timeout=60)
            hits, latency = measure(outside, node.ip, node_port)
            rows += hit_rows(np_name, f"{node.ip}:{node_port}/TCP", backends, port, hits, latency)
            ok = ok and all(hits[p.name] > 0 for p in backends)
        print_table(rows)

        say("")
        say("Who the backends see, asked from outside through each node's NodePort:")
        rows = [("SERVICE", "EXTERNAL POLICY", "FRONTEND", "BACKEND", "SOURCE IP SEEN")]
        for policy in ("Cluster", "Local"):
            name = f"whoami-{policy.lower()}"
            np = lb.api.get(Key("Service", "default", name)).service.spec.ports[0].node_port
            for node in lb.cluster.nodes:
                seen = set()
                eventually(partial(who, outside, node.ip, np), timeout=60)
                for _ in range(20):
                    seen.add(who(outside, node.ip, np))
                for pod_name, src in sorted(seen):
                    rows.append((name, policy, f"{node.ip}:{np}", pod_name, src))
        print_table(rows)

        say("")
        say("Datapath counters (ebpflb maps):")
        rows = [("NODE", "DNAT", "REV-NAT", "NODEPORT-XDP", "NODEPORT-TC", "SNAT", "REV-SNAT")]
        for node in lb.cluster.nodes:
            c = node_counters(lb, node)
            rows.append((node.name, *(str(c.get(k, 0)) for k in COUNTERS)))
        print_table(rows)
        say("")
        say("every backend answered" if ok else "NOT every backend answered")
        if keep and ok:
            node = lb.cluster.nodes[0]
            say("")
            say("The cluster stays up (--keep). Try it:")
            say(f"  ip netns exec {client.netns} curl http://{vip}/")
            say(f"  ip netns exec {lb.cluster.external.netns} curl http://{node.ip}:{node_port}/")
            say(f"  EBPFLB_REGISTRY={lb.address} {sys.argv[0]} get svc")
            say(f"  bpftool prog show name {PROGRAMS['ingress']}")
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


COUNTERS = ("dnat", "rev_nat", "nodeport_xdp", "nodeport_tc", "snat", "rev_snat")


def node_counters(lb: LbCluster, node: Node) -> dict[str, int]:
    maps = LbMaps.open(str(lb.pin_dir(node)))
    try:
        return maps.counter_totals()
    finally:
        maps.close()
