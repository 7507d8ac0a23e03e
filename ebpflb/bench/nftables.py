"""kube-proxy's nftables mode as an `nft -f` script: the other baseline the benchmark compares with.

The shape follows kube-proxy's pkg/proxy/nftables/proxier.go (Kubernetes 1.31+):
table `ip kube-proxy`, a `services` chain that looks the destination up in the
`service-ips` verdict map (VIP . proto . port -> goto service chain), one
`service-<hash>-ns/name/proto/port` chain per Service port choosing an endpoint
with `numgen random mod N vmap`, one `endpoint-<hash>-...` chain per endpoint
that DNATs. Chain names are kube-proxy's own (hashAndTruncate), checked by a
unit test against its test vectors.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from ebpflb.bench.model import CLUSTER_CIDR, SERVICE_CIDR, ServicePort

TABLE = "kube-proxy"
MASQ_MARK = "0x4000"
CHAIN_NAME_MAX = 240  # kube-proxy's chainNameBaseLengthMax


def hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: "<8 chars of base32(sha256(name))>-<name>"."""
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]
    full = f"{digest}-{name}"
    return full[:CHAIN_NAME_MAX]


def service_chain(svc: ServicePort) -> str:
    proto = svc.protocol.lower()
    return "service-" + hash_and_truncate(f"{svc.namespace}/{svc.name}/{proto}/{svc.port_name}")


def endpoint_chain(svc: ServicePort, ip: str, port: int) -> str:
    proto = svc.protocol.lower()
    base = f"{svc.namespace}/{svc.name}/{proto}/{svc.port_name}__{ip}/{port}"
    return "endpoint-" + hash_and_truncate(base)


def base_rules(
    node_ip: str, cluster_cidr: str = CLUSTER_CIDR, service_cidr: str = SERVICE_CIDR
) -> list[str]:
    """kube-proxy's fixed sets, maps, hooked chains and their rules."""
    t = f"ip {TABLE}"
    v4 = "ipv4_addr . inet_proto . inet_service"
    return [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f'add set {t} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort '
        'traffic" ; }',
        f"add map {t} firewall-ips {{ type {v4} : verdict ; }}",
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {t} no-endpoint-services {{ type {v4} : verdict ; }}",
        f'add map {t} service-ips {{ type {v4} : verdict ; comment "ClusterIP, ExternalIP and '
        'LoadBalancer IP traffic" ; }',
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add chain {t} cluster-ips-check",
        f"add chain {t} filter-prerouting-pre-dnat "
        "{ type filter hook prerouting priority -110 ; }",
        f"add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}",
        f"add chain {t} filter-input {{ type filter hook input priority 0 ; }}",
        f"add chain {t} filter-output {{ type filter hook output priority 0 ; }}",
        f"add chain {t} firewall-check",
        f"add chain {t} mark-for-masquerade",
        f"add chain {t} masquerading",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {t} nodeport-endpoints-check",
        f"add chain {t} reject-chain",
        f"add chain {t} services",
        f"add chain {t} service-endpoints-check",
        f"add rule {t} cluster-ips-check ip daddr @cluster-ips reject",
        f"add rule {t} cluster-ips-check ip daddr {{ {service_cidr} }} drop",
        f"add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-forward ct state new jump service-endpoints-check",
        f"add rule {t} filter-forward ct state new jump cluster-ips-check",
        f"add rule {t} filter-input ct state new jump nodeport-endpoints-check",
        f"add rule {t} filter-input ct state new jump service-endpoints-check",
        f"add rule {t} filter-output ct state new jump service-endpoints-check",
        f"add rule {t} filter-output-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-output ct state new jump cluster-ips-check",
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} nat-output jump services",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add rule {t} nat-prerouting jump services",
        f"add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport "
        "vmap @no-endpoint-nodeports",
        f"add rule {t} reject-chain reject",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport "
        "vmap @service-nodeports",
        f"add element {t} nodeport-ips {{ {node_ip} }}",
        f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport "
        "vmap @no-endpoint-services",
    ]


def service_rules(svc: ServicePort, cluster_cidr: str = CLUSTER_CIDR) -> list[str]:
    """The chains, rules and map elements of one Service port."""
    t = f"ip {TABLE}"
    proto = svc.protocol.lower()
    ready = svc.ready_endpoints
    key = f"{svc.vip} . {proto} . {svc.port}"
    lines = [f"add element {t} cluster-ips {{ {svc.vip} }}"]
    if not ready:
        return [*lines, f"add element {t} no-endpoint-services {{ {key} : goto reject-chain }}"]
    chain = service_chain(svc)
    eps = [(endpoint_chain(svc, e.ip, e.port), e) for e in ready]
    vmap = ", ".join(f"{i} : goto {c}" for i, (c, _) in enumerate(eps))
    lines += [
        f"add chain {t} {chain}",
        f"add rule {t} {chain} ip daddr {svc.vip} {proto} dport {svc.port} "
        f"ip saddr != {cluster_cidr} jump mark-for-masquerade",
        f"add rule {t} {chain} numgen random mod {len(eps)} vmap {{ {vmap} }}",
    ]
    for c, e in eps:
        lines += [
            f"add chain {t} {c}",
            f"add rule {t} {c} ip saddr {e.ip} jump mark-for-masquerade",
            f"add rule {t} {c} meta l4proto {proto} dnat to {e.ip}:{e.port}",
        ]
    lines.append(f"add element {t} service-ips {{ {key} : goto {chain} }}")
    return lines


def ruleset_fragment(services: Sequence[ServicePort], cluster_cidr: str = CLUSTER_CIDR) -> str:
    """The chains, rules and elements of `services`, for a table base_rules() made.

    Every chain is added before any rule: a `goto` to a chain that a later line of
    the same transaction adds fails (ENOENT)."""
    body = [line for svc in services for line in service_rules(svc, cluster_cidr)]
    chains = [line for line in body if line.startswith("add chain ")]
    rest = [line for line in body if not line.startswith("add chain ")]
    return "\n".join(chains + rest) + "\n"


def ruleset(
    services: Sequence[ServicePort],
    node_ip: str,
    cluster_cidr: str = CLUSTER_CIDR,
    service_cidr: str = SERVICE_CIDR,
) -> str:
    """The whole `ip kube-proxy` table for `nft -f` in a fresh namespace (one transaction)."""
    base = "\n".join(base_rules(node_ip, cluster_cidr, service_cidr)) + "\n"
    return base + ruleset_fragment(services, cluster_cidr)
