"""The benchmark's kube-proxy baselines: iptables-restore and nft input in kube-proxy's shape."""

from __future__ import annotations

import re

import pytest

from ebpflb.bench import iptables, nftables
from ebpflb.bench.model import (
    Endpoint,
    FakePods,
    ServicePort,
    fake_pod_ip,
    filler_services,
    measured_services,
)

pytestmark = pytest.mark.unit


def svc1(*ips: str) -> ServicePort:
    """kube-proxy's test Service ns1/svc1:p80 (its proxier_test.go), with endpoints on :80."""
    return ServicePort(
        name="svc1",
        namespace="ns1",
        port_name="p80",
        vip="172.30.0.41",
        port=80,
        endpoints=tuple(Endpoint(ip, 80) for ip in ips),
    )


# ------------------------------------------------------------------ names


def test_chain_names_are_kube_proxys() -> None:
    # The values kube-proxy's own tests expect for ns1/svc1:p80 -> 10.180.0.1:80.
    s = svc1("10.180.0.1")
    assert iptables.svc_chain(s) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert iptables.sep_chain(s, "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert nftables.service_chain(s) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert (
        nftables.endpoint_chain(s, "10.180.0.1", 80)
        == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    )


@pytest.mark.parametrize(
    ("i", "n", "want"),
    [
        (0, 2, "0.5000000000"),
        (0, 3, "0.3333333333"),
        (1, 3, "0.5000000000"),
        (0, 1, "1.0000000000"),
    ],
)
def test_probability_is_one_over_the_endpoints_left(i: int, n: int, want: str) -> None:
    assert iptables.probability(i, n) == want


# ------------------------------------------------------------------ iptables


def test_ruleset_has_kube_proxys_rules_for_a_service() -> None:
    text = iptables.ruleset([svc1("10.180.0.1", "10.180.0.2")])
    svc, sep1 = "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ"
    sep2 = iptables.sep_chain(svc1(), "10.180.0.2:80")
    expected = [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        f"-d 172.30.0.41 --dport 80 -j {svc}",
        f'-A {svc} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        f"-m statistic --mode random --probability 0.5000000000 -j {sep1}",
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j {sep2}',
        f"-A {sep1} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
        f"-A {sep1} -m comment --comment ns1/svc1:p80 -m tcp -p tcp "
        "-j DNAT --to-destination 10.180.0.1:80",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ]
    lines = text.splitlines()
    for rule in expected:
        assert rule in lines, rule
    assert lines[0] == "*filter" and text.count("COMMIT") == 2
    # Every chain that is jumped to is declared in its table.
    for table in text.split("COMMIT")[:2]:
        declared = set(re.findall(r"^:(\S+)", table, re.M))
        jumped = set(re.findall(r"-j (KUBE-\S+)", table))
        assert jumped <= declared, jumped - declared


def test_the_measured_service_is_last_in_kube_services() -> None:
    http, iperf = measured_services(["10.244.0.2", "10.244.0.3"], "10.244.0.2")
    fillers = filler_services(5, FakePods(groups=2, per_group=1))
    text = iptables.ruleset([*fillers, iperf, http])
    entries = [x for x in text.splitlines() if x.startswith("-A KUBE-SERVICES ")]
    assert len(entries) == 5 + 2 + 1  # fillers, measured, the NodePorts catch-all
    assert f"-d {http.vip} --dport 80" in entries[-2]
    assert "KUBE-NODEPORTS" in entries[-1]


def test_a_service_without_ready_endpoints_is_rejected_in_filter() -> None:
    s = svc1("10.180.0.1").with_ready("10.180.0.1", False)
    text = iptables.ruleset([s])
    filter_table = text.split("COMMIT")[0]
    assert '"ns1/svc1:p80 has no endpoints"' in filter_table and "-j REJECT" in filter_table
    assert "KUBE-SVC-" not in text


def test_large_clusters_drop_per_endpoint_comments() -> None:
    pods = FakePods(groups=1, per_group=10)
    many = filler_services(101, pods)  # 1,010 endpoints > kube-proxy's 1,000
    text = iptables.ruleset(many)
    sep_rules = [x for x in text.splitlines() if x.startswith("-A KUBE-SEP-")]
    assert sep_rules and not any("--comment" in x for x in sep_rules)
    fixed = 12 + 3 + 1 + 1 + 3  # jumps, KUBE-FORWARD, NodePorts, MARK-MASQ, POSTROUTING
    per_service = 1 + 1 + 10 + 10 * 2  # KUBE-SERVICES, masquerade, pick, two per KUBE-SEP
    assert iptables.rule_count(text) == fixed + 101 * per_service


def test_full_sync_rewrites_every_chain_and_deletes_the_gone_ones() -> None:
    before = [svc1("10.180.0.1", "10.180.0.2")]
    chains = iptables.service_chains(before)
    after = [before[0].with_ready("10.180.0.2", False)]
    text = iptables.sync(after, chains)
    gone = iptables.sep_chain(before[0], "10.180.0.2:80")
    assert f"-X {gone}" in text.splitlines()
    assert f":{gone} - [0:0]" in text  # flushed before it is deleted
    assert "*filter" in text and ":INPUT" not in text  # built-in chains are left alone
    assert f":{iptables.svc_chain(after[0])} - [0:0]" in text


def test_partial_sync_leaves_other_services_chains_alone() -> None:
    pods = FakePods(groups=1, per_group=2)
    services = filler_services(3, pods)
    chains = iptables.service_chains(services)
    services[1] = services[1].with_ready(services[1].endpoints[0].ip, False)
    text = iptables.sync(services, chains, changed={services[1].name})
    assert f":{iptables.svc_chain(services[0])}" not in text
    assert f":{iptables.svc_chain(services[1])} - [0:0]" in text
    assert f"-X {iptables.sep_chain(services[1], services[1].endpoints[0].address)}" in text
    # KUBE-SERVICES is rewritten whole: every Service is still reachable.
    entries = [x for x in text.splitlines() if x.startswith("-A KUBE-SERVICES")]
    assert len(entries) == 3 + 1
    assert not any(x.startswith("-X") and "KUBE-SVC" in x for x in text.splitlines())


# ------------------------------------------------------------------ nftables


def test_nft_service_uses_the_verdict_maps() -> None:
    s = svc1("10.180.0.1", "10.180.0.2")
    lines = nftables.service_rules(s)
    chain = "service-ULMVA6XW-ns1/svc1/tcp/p80"
    ep1 = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    ep2 = nftables.endpoint_chain(s, "10.180.0.2", 80)
    assert f"add chain ip kube-proxy {chain}" in lines
    assert (
        f"add rule ip kube-proxy {chain} numgen random mod 2 vmap "
        f"{{ 0 : goto {ep1}, 1 : goto {ep2} }}"
    ) in lines
    assert f"add rule ip kube-proxy {ep1} meta l4proto tcp dnat to 10.180.0.1:80" in lines
    assert (
        f"add element ip kube-proxy service-ips {{ 172.30.0.41 . tcp . 80 : goto {chain} }}"
    ) in lines


def test_nft_chains_come_before_the_rules_that_jump_to_them() -> None:
    text = nftables.ruleset([svc1("10.180.0.1")], node_ip="192.168.50.10")
    lines = text.splitlines()
    first_rule = min(i for i, x in enumerate(lines) if x.startswith("add rule") and "goto" in x)
    last_chain = max(i for i, x in enumerate(lines) if x.startswith("add chain"))
    assert last_chain < first_rule
    assert lines[0].startswith("add table ip kube-proxy")
    assert "add rule ip kube-proxy nat-prerouting jump services" in lines


def test_nft_service_without_endpoints_goes_to_the_reject_map() -> None:
    s = svc1("10.180.0.1").with_ready("10.180.0.1", False)
    lines = nftables.service_rules(s)
    assert any("no-endpoint-services" in x and "goto reject-chain" in x for x in lines)
    assert not any(x.startswith("add chain") for x in lines)


# ------------------------------------------------------------------ the model


def test_fake_pods_and_fillers_are_distinct_and_in_range() -> None:
    pods = FakePods(groups=3, per_group=2, first=10)
    ips = [ip for _, ip, _ in pods.pods()]
    assert len(set(ips)) == 6
    assert ips[0] == fake_pod_ip(10)
    assert fake_pod_ip(249).endswith(".251") and fake_pod_ip(250).endswith(".2")
    fillers = filler_services(4, pods, start=2)
    assert [f.name for f in fillers] == [f"filler-{i:06d}" for i in range(2, 6)]
    assert fillers[0].vip == "10.97.0.3" and fillers[0].group == 2
    assert fillers[1].endpoints == pods.endpoints(0, 80)
    with pytest.raises(ValueError):
        fake_pod_ip(10**6)
