"""ClusterIP and nodePort ranges: bands, exhaustion, reuse."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ebpflb.registry.alloc import AllocationError, IPRange, Range, parse_port_range

pytestmark = pytest.mark.unit


def test_ip_range_excludes_network_and_broadcast_and_exhausts() -> None:
    r = IPRange("10.96.0.0/29", random.Random(1))
    used: set[str] = set()
    for _ in range(6):
        used.add(r.allocate(used, len(used)))
    assert used == {f"10.96.0.{i}" for i in range(1, 7)}
    with pytest.raises(AllocationError, match="full"):
        r.allocate(used, len(used))
    # Freed addresses are handed out again.
    used.discard("10.96.0.3")
    assert r.allocate(used, len(used)) == "10.96.0.3"


def test_dynamic_allocation_prefers_the_upper_band() -> None:
    r = IPRange("10.96.0.0/12", random.Random(7))
    static_top = ipaddress.ip_address("10.96.0.0") + r.range.static_size
    used: set[str] = set()
    for _ in range(200):
        used.add(r.allocate(used, len(used)))
    assert all(ipaddress.ip_address(ip) > static_top for ip in used)
    assert len(used) == 200
    assert r.contains("10.96.0.10") and r.contains("10.111.255.254")
    assert not r.contains("10.96.0.0") and not r.contains("10.112.0.1")


def test_port_range_exhaustion_falls_back_to_the_lower_band_then_fails() -> None:
    r = Range(30000, 30099, random.Random(3))
    used: set[int] = set()
    for _ in range(100):
        used.add(r.allocate(used, len(used)))
    assert used == set(range(30000, 30100))
    with pytest.raises(AllocationError):
        r.allocate(used, len(used))


@pytest.mark.parametrize("text", ["30000", "a-b", "0-10", "100-10", "1-70000"])
def test_bad_port_ranges(text: str) -> None:
    with pytest.raises(ValueError, match="invalid node port range"):
        parse_port_range(text)


@pytest.mark.parametrize("cidr", ["10.96.0.0/33", "10.96.0.1/12", "banana", "10.0.0.0/31"])
def test_bad_service_cidrs(cidr: str) -> None:
    with pytest.raises(ValueError, match="service CIDR"):
        IPRange(cidr)
