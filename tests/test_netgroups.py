"""agent.netgroups: the one network-grouping rule every per-network limit uses."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from agent.netgroups import address_unit, in_networks, network_of, parse_networks


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_fast_path_agrees_with_ipaddress(n: int) -> None:
    ip = str(ipaddress.IPv4Address(n))
    assert network_of(ip) == str(ipaddress.ip_network(f"{ip}/24", strict=False))
    assert address_unit(ip) == ip


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_ipv6_groups_by_64(n: int) -> None:
    addr = ipaddress.IPv6Address(n)
    if addr.ipv4_mapped is not None:
        return
    want = str(ipaddress.IPv6Network((n >> 64 << 64, 64)))
    assert network_of(str(addr)) == want
    assert address_unit(str(addr)) == want


def test_ipv4_mapped_ipv6_counts_as_its_ipv4_address() -> None:
    assert network_of("::ffff:203.0.113.9") == "203.0.113.0/24"
    assert address_unit("::ffff:203.0.113.9") == "203.0.113.9"
    assert network_of("[2001:db8::1%eth0]") == "2001:db8::/64"


def test_what_is_no_address_is_its_own_group() -> None:
    for junk in ("", "host.example", "1.2.3.999", "1.2.3", "01.2.3.4x"):
        assert network_of(junk) == junk


def test_config_networks_skip_names_and_match_by_version() -> None:
    nets = parse_networks(("127.0.0.1", "10.0.0.1/8", "fd00::/8", "gpu.lan"))
    assert [str(n) for n in nets] == ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
    assert in_networks(ipaddress.ip_address("10.9.8.7"), nets)
    assert in_networks(ipaddress.ip_address("fd12::1"), nets)
    assert not in_networks(ipaddress.ip_address("11.0.0.1"), nets)
    assert not in_networks(ipaddress.ip_address("::1"), nets)
