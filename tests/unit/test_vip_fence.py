"""The kernel VIP lease's nft scripts (pure builders) and its errors without nft."""

from __future__ import annotations

import asyncio

import pytest

from hakit.errors import CommandError
from hakit.net import vip_fence


def test_scripts_name_the_module_tables_and_hold_only_the_families_present() -> None:
    script = vip_fence.install_script("web-1", ["192.0.2.100/24"], 1500)
    table = vip_fence.table_name("web-1")
    assert table.startswith("hakit_fence_web_1_") and table != vip_fence.table_name("web_1")
    assert f"table inet {table} {{" in script and f"table arp {table} {{" in script
    assert "ip daddr @vips4 ip daddr != @live4 counter drop" in script
    assert "ip saddr @vips4 ip saddr != @live4 counter drop" in script
    assert "arp daddr ip != @live4" in script
    assert "vips6" not in script and "/24" not in script
    last = script.rstrip().splitlines()[-1]
    assert last == f"add element arp {table} live4 {{ 192.0.2.100 timeout 1500ms }}"


def test_an_ipv6_vip_is_fenced_for_traffic_only() -> None:
    script = vip_fence.install_script("m", ["2001:db8::5/64"], 100)
    assert "ip6 daddr @vips6 ip6 daddr != @live6 counter drop" in script
    assert "table arp hakit_fence_m {" not in script  # no ARP for IPv6
    assert "delete table arp hakit_fence_m" in script  # but one left by an older config goes


def test_renewal_replaces_the_elements_in_one_script() -> None:
    renew = vip_fence.renew_script("m", ["192.0.2.100", "192.0.2.101/32"], 250)
    lines = renew.splitlines()
    assert lines[0] == "flush set inet hakit_fence_m live4"
    assert lines[1] == (
        "add element inet hakit_fence_m live4 { 192.0.2.100 timeout 250ms, "
        "192.0.2.101 timeout 250ms }"
    )
    expired = vip_fence.renew_script("m", ["192.0.2.100"], 0)
    assert "add element" not in expired and "flush set inet hakit_fence_m live4" in expired
    forever = vip_fence.renew_script("m", ["192.0.2.100"], None)
    assert "add element inet hakit_fence_m live4 { 192.0.2.100 }" in forever


def test_without_nft_apply_names_the_package_and_remove_has_nothing_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CommandError, match="install the nftables package"):
        asyncio.run(vip_fence.apply(vip_fence.remove_script("m")))
    asyncio.run(vip_fence.remove("m"))  # no nft: no table can exist
