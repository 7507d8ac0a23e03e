"""kube-proxy's iptables mode, as iptables-restore input: the baseline the benchmark compares with.

The shape follows kube-proxy's pkg/proxy/iptables/proxier.go (Kubernetes 1.28+):
the jump rules from the built-in chains, `KUBE-SERVICES` with one rule per
Service port (`-d VIP --dport PORT -j KUBE-SVC-<hash>`), each `KUBE-SVC-<hash>`
masquerading sources from outside the cluster CIDR and picking an endpoint
with `-m statistic --mode random --probability 1/(n-i)`, each
`KUBE-SEP-<hash>` marking hairpin traffic and DNATing. Chain names are
kube-proxy's own hashes (a unit test checks them against its test vectors).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Collection, Iterable, Sequence

from ebpflb.bench.model import CLUSTER_CIDR, ServicePort

MASQ_MARK = "0x4000"
LARGE_CLUSTER_ENDPOINTS = 1000
"""kube-proxy's largeClusterEndpointsThreshold: past it, per-endpoint rules carry no comment."""

# (table, built-in chain, kube chain, comment, extra match), as kube-proxy's
# iptablesJumpChains; it inserts each at the top of the built-in chain.
JUMPS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "filter",
        "INPUT",
        "KUBE-EXTERNAL-SERVICES",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    ("filter", "INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports", ""),
    (
        "filter",
        "INPUT",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "FORWARD",
        "KUBE-SERVICES",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules", ""),
    (
        "filter",
        "FORWARD",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "OUTPUT",
        "KUBE-SERVICES",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "OUTPUT",
        "KUBE-PROXY-FIREWALL",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals", ""),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals", ""),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules", ""),
)
BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
FILTER_CHAINS = (
    "KUBE-NODEPORTS",
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
)
NAT_CHAINS = ("KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING")


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(svc: ServicePort) -> str:
    """KUBE-SVC-<hash>: kube-proxy's servicePortPolicyClusterChain."""
    return "KUBE-SVC-" + _hash16(svc.service_port_name + svc.protocol.lower())


def sep_chain(svc: ServicePort, endpoint: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of svc."""
    return "KUBE-SEP-" + _hash16(svc.service_port_name + svc.protocol.lower() + endpoint)


def probability(i: int, n: int) -> str:
    """The --probability of endpoint i of n: 1/(n-i), printed as kube-proxy does."""
    return f"{1.0 / (n - i):0.10f}"


def _service_rules(
    svc: ServicePort, cluster_cidr: str, large: bool
) -> tuple[str, list[str], list[str]]:
    """(the KUBE-SERVICES rule, chains declared, rules) of one Service port with endpoints."""
    proto = svc.protocol.lower()
    spn = svc.service_port_name
    chain = svc_chain(svc)
    match = f"-m {proto} -p {proto} -d {svc.vip} --dport {svc.port}"
    entry = f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {match} -j {chain}'
    chains = [chain]
    rules = [
        f'-A {chain} -m comment --comment "{spn} cluster IP" {match} ! -s {cluster_cidr} '
        "-j KUBE-MARK-MASQ"
    ]
    ready = svc.ready_endpoints
    seps = []
    for i, ep in enumerate(ready):
        sep = sep_chain(svc, ep.address)
        chains.append(sep)
        comment = "" if large else f'-m comment --comment "{spn} -> {ep.address}" '
        stat = (
            f"-m statistic --mode random --probability {probability(i, len(ready))} "
            if i < len(ready) - 1
            else ""
        )
        rules.append(f"-A {chain} {comment}{stat}-j {sep}")
        sep_comment = "" if large else f"-m comment --comment {spn} "
        seps.append(f"-A {sep} {sep_comment}-s {ep.ip} -j KUBE-MARK-MASQ")
        seps.append(
            f"-A {sep} {sep_comment}-m {proto} -p {proto} -j DNAT --to-destination {ep.address}"
        )
    return entry, chains, rules + seps


def _reject_rule(svc: ServicePort) -> str:
    proto = svc.protocol.lower()
    return (
        f'-A KUBE-SERVICES -m comment --comment "{svc.service_port_name} has no endpoints" '
        f"-m {proto} -p {proto} -d {svc.vip} --dport {svc.port} -j REJECT"
    )


def _tables(
    services: Sequence[ServicePort],
    cluster_cidr: str,
    stale: Iterable[str] = (),
    changed: Collection[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(filter lines, nat lines) between each table's `*name` and COMMIT, kube chains only.

    changed: names of the Services whose own chains are rewritten (None: all of them);
    the fixed chains and KUBE-SERVICES are always rewritten, as kube-proxy does."""
    large = sum(len(s.ready_endpoints) for s in services) > LARGE_CLUSTER_ENDPOINTS
    entries: list[str] = []
    chains: list[str] = []
    rules: list[str] = []
    rejects: list[str] = []
    kept: set[str] = set()
    for svc in services:
        if not svc.ready_endpoints:
            rejects.append(_reject_rule(svc))
            continue
        entry, c, r = _service_rules(svc, cluster_cidr, large)
        entries.append(entry)
        if changed is None or svc.name in changed:
            chains += c
            rules += r
        else:
            kept.update(c)
    filter_lines = [f":{c} - [0:0]" for c in FILTER_CHAINS] + [
        *rejects,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    stale_chains = sorted(set(stale) - set(chains) - kept)
    nat_lines = (
        [f":{c} - [0:0]" for c in (*NAT_CHAINS, *chains, *stale_chains)]
        + entries
        + [
            '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
            'must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
            f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
            'SNAT" -j MASQUERADE --random-fully',
        ]
        + rules
        + [f"-X {c}" for c in stale_chains]
    )
    return filter_lines, nat_lines


def _jumps(table: str) -> list[str]:
    return [
        f'-A {builtin} {extra + " " if extra else ""}-m comment --comment "{comment}" -j {chain}'
        for t, builtin, chain, comment, extra in JUMPS
        if t == table
    ]


def ruleset(services: Sequence[ServicePort], cluster_cidr: str = CLUSTER_CIDR) -> str:
    """The whole filter and nat tables for a fresh namespace (`iptables-restore` without
    --noflush): built-in chains with kube-proxy's jump rules, then its chains."""
    filter_lines, nat_lines = _tables(services, cluster_cidr)
    out = ["*filter"]
    out += [f":{c} ACCEPT [0:0]" for c in BUILTIN["filter"]]
    out += (
        filter_lines[: len(FILTER_CHAINS)] + _jumps("filter") + filter_lines[len(FILTER_CHAINS) :]
    )
    out += ["COMMIT", "*nat"]
    out += [f":{c} ACCEPT [0:0]" for c in BUILTIN["nat"]]
    declared = [x for x in nat_lines if x.startswith(":")]
    out += declared + _jumps("nat") + [x for x in nat_lines if not x.startswith(":")]
    out += ["COMMIT", ""]
    return "\n".join(out)


def sync(
    services: Sequence[ServicePort],
    previous_chains: Iterable[str],
    changed: Collection[str] | None = None,
    cluster_cidr: str = CLUSTER_CIDR,
) -> str:
    """What a kube-proxy sync hands `iptables-restore --noflush`.

    Full (changed None): every kube chain declared (so flushed) and rewritten.
    Partial (changed: the names of the Services that changed, kube-proxy's default since
    1.27, MinimizeIPTablesRestore): only those Services' chains and the fixed ones,
    KUBE-SERVICES included. Both delete the chains no longer used."""
    filter_lines, nat_lines = _tables(
        services, cluster_cidr, stale=previous_chains, changed=changed
    )
    return "\n".join(["*filter", *filter_lines, "COMMIT", "*nat", *nat_lines, "COMMIT", ""])


def service_chains(services: Sequence[ServicePort]) -> set[str]:
    """Every KUBE-SVC-/KUBE-SEP- chain the ruleset of `services` has."""
    out: set[str] = set()
    for svc in services:
        ready = svc.ready_endpoints
        if ready:
            out.add(svc_chain(svc))
            out.update(sep_chain(svc, e.address) for e in ready)
    return out


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))
