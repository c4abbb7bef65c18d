"""Virtual IP in a real namespace pair: netlink add/remove and a gratuitous ARP seen by a peer.

Namespaces ``hkt-vip-a`` and ``hkt-vip-b`` joined by a veth pair (``veth0`` on each side,
192.0.2.201/24 and 192.0.2.202/24, IPv6 disabled); the VIP is 192.0.2.199/24. The code
under test runs INSIDE namespace a (``ip netns exec``), because it acts on the namespace of
its caller; b's neighbour table is read with ``ip -n hkt-vip-b neigh``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hakit.net import vip_fence
from hakit.system.run import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="VIP tests need root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed"),
]

NS_A, NS_B = "hkt-vip-a", "hkt-vip-b"
VIP = "192.0.2.199"
WRONG_MAC = "02:00:00:00:00:99"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def remove_namespaces() -> None:
    listed = run(["ip", "netns", "list"]).stdout.split()
    for ns in (NS_A, NS_B):
        if ns in listed:
            run(["ip", "netns", "del", ns])  # takes its end of the veth pair with it


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    remove_namespaces()  # a previous run may have been killed
    try:
        for ns in (NS_A, NS_B):
            run(["ip", "netns", "add", ns])
            for scope in ("all", "default"):
                run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                     f"net.ipv6.conf.{scope}.disable_ipv6=1"])  # fmt: skip
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", NS_A, "link", "add", "veth0", "type", "veth",
             "peer", "name", "veth0", "netns", NS_B])  # fmt: skip
        for ns, address in ((NS_A, "192.0.2.201/24"), (NS_B, "192.0.2.202/24")):
            run(["ip", "-n", ns, "addr", "add", address, "dev", "veth0"])
            run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        yield
    finally:
        remove_namespaces()


def in_ns_a(code: str) -> dict[str, object]:
    """Run ``code`` with Python inside namespace a; it must print one JSON object last."""
    result = run(
        ["ip", "netns", "exec", NS_A, sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=30,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def mac_of_a() -> str:
    links = json.loads(run(["ip", "-n", NS_A, "-j", "link", "show", "veth0"]).stdout)
    return str(links[0]["address"])


def neighbour_in_b() -> str | None:
    entries = json.loads(run(["ip", "-n", NS_B, "-j", "neigh", "show", VIP]).stdout)
    return str(entries[0].get("lladdr")) if entries else None


def addresses_of_a() -> list[str]:
    links = json.loads(run(["ip", "-n", NS_A, "-j", "addr", "show", "dev", "veth0"]).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in links[0]["addr_info"]]


@pytest.mark.usefixtures("namespaces")
def test_added_vip_announced_by_gratuitous_arp_updates_the_peer_neighbour_entry() -> None:
    run(["ip", "-n", NS_B, "neigh", "replace", VIP, "dev", "veth0",
         "lladdr", WRONG_MAC, "nud", "stale"])  # fmt: skip
    assert neighbour_in_b() == WRONG_MAC

    added = in_ns_a(
        f"""
        import json
        from hakit.net import vip
        before = vip.has_vip("veth0", "{VIP}/24")
        first = vip.add_vip("veth0", "{VIP}/24")
        second = vip.add_vip("veth0", "{VIP}/24")
        print(json.dumps({{"before": before, "first": first, "second": second,
                          "after": vip.has_vip("veth0", "{VIP}/24"),
                          "other_prefix": vip.has_vip("veth0", "{VIP}/32")}}))
        """
    )
    assert added == {
        "before": False,
        "first": True,
        "second": False,
        "after": True,
        "other_prefix": False,
    }
    assert f"{VIP}/24" in addresses_of_a()
    time.sleep(0.2)
    assert neighbour_in_b() == WRONG_MAC  # adding the address announced nothing by itself

    announced = in_ns_a(
        f"""
        import asyncio, json
        from hakit.net import vip
        sent = asyncio.run(vip.announce("veth0", "{VIP}", count=3, interval=0.05))
        print(json.dumps({{"sent": sent}}))
        """
    )
    assert announced == {"sent": 3}
    deadline = time.monotonic() + 3
    while neighbour_in_b() != mac_of_a() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert neighbour_in_b() == mac_of_a()


@pytest.mark.usefixtures("namespaces")
def test_async_api_in_the_event_loop_and_removal_is_idempotent() -> None:
    result = in_ns_a(
        f"""
        import asyncio, json
        from hakit.net import vip

        async def main():
            try:
                vip.add_vip("veth0", "{VIP}/32")
                misuse = "no error"
            except RuntimeError as exc:
                misuse = str(exc)
            return {{
                "misuse": misuse,
                "add": await vip.add_vip_async("veth0", "{VIP}/32"),
                "has": await vip.has_vip_async("veth0", "{VIP}/32"),
                "mac": (await vip.interface_mac_async("veth0")).hex(),
                "del": await vip.del_vip_async("veth0", "{VIP}/32"),
                "del_again": await vip.del_vip_async("veth0", "{VIP}/32"),
                "has_after": await vip.has_vip_async("veth0", "{VIP}/32"),
            }}

        print(json.dumps(asyncio.run(main())))
        """
    )
    assert "add_vip_async" in str(result.pop("misuse"))
    assert result.pop("mac") == mac_of_a().replace(":", "")
    assert result == {
        "add": True,
        "has": True,
        "del": True,
        "del_again": False,
        "has_after": False,
    }
    assert f"{VIP}/32" not in addresses_of_a()


@pytest.mark.usefixtures("namespaces")
def test_errors_name_the_interface_and_the_address() -> None:
    result = in_ns_a(
        f"""
        import asyncio, json
        from hakit.net import vip
        from hakit.errors import HakitError
        messages = {{}}
        attempts = {{
            "add_missing": lambda: vip.add_vip("nope0", "{VIP}/24"),
            "del_missing": lambda: vip.del_vip("nope0", "{VIP}/24"),
            "bad_cidr": lambda: vip.add_vip("veth0", "192.0.2.299/24"),
            "ipv6": lambda: asyncio.run(vip.announce("veth0", "2001:db8::1")),
            "not_ethernet": lambda: asyncio.run(vip.announce("lo", "{VIP}")),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                messages[name] = "no error"
            except HakitError as exc:
                messages[name] = type(exc).__name__ + ": " + str(exc)
        print(json.dumps(messages))
        """
    )
    assert result["add_missing"] == (
        f"VipError: interface 'nope0' does not exist: cannot add VIP {VIP}/24"
    )
    assert result["del_missing"] == (
        f"VipError: interface 'nope0' does not exist: cannot remove VIP {VIP}/24"
    )
    assert "192.0.2.299/24" in str(result["bad_cidr"])
    assert "veth0" in str(result["bad_cidr"])
    assert "not implemented" in str(result["ipv6"])
    assert "'lo' is not an Ethernet interface" in str(result["not_ethernet"])


def reachable_from_b() -> bool:
    """The VIP answers a ping from b, b resolving it by ARP afresh."""
    run(["ip", "-n", NS_B, "neigh", "flush", "dev", "veth0"])
    done = run(["ip", "netns", "exec", NS_B, "ping", "-c", "1", "-W", "1", VIP], check=False)
    return done.ok


def nft_in_a(script: str) -> None:
    run(["ip", "netns", "exec", NS_A, "nft", script])


def test_kernel_lease_passes_vip_traffic_only_until_its_deadline() -> None:
    """hakit.net.vip_fence in a real kernel: the VIP answers (ARP and ping) while its lease
    runs, not after it, again once renewed; removal gives plain traffic back, twice over."""
    if shutil.which("nft") is None:
        pytest.skip("nftables `nft` is not installed")
    cidr = f"{VIP}/24"
    nft_in_a(vip_fence.install_script("m-1", [cidr], 1500))
    run(["ip", "-n", NS_A, "addr", "replace", cidr, "dev", "veth0"])
    try:
        assert reachable_from_b(), "the VIP does not answer while its lease runs"
        time.sleep(1.6)
        assert not reachable_from_b(), "the VIP still answers after its lease ran out"
        neighbour = neighbour_in_b()
        assert neighbour in (None, "None"), f"a's kernel answered ARP for the VIP: {neighbour}"
        nft_in_a(vip_fence.renew_script("m-1", [cidr], 5000))
        assert reachable_from_b(), "the VIP does not answer after a renewal"
        nft_in_a(vip_fence.renew_script("m-1", [cidr], 0))
        assert not reachable_from_b(), "a lease renewed with no time left lets traffic pass"
        nft_in_a(vip_fence.remove_script("m-1"))
        nft_in_a(vip_fence.remove_script("m-1"))  # absent tables: no error
        assert reachable_from_b(), "the VIP does not answer once the lease tables are gone"
        listed = run(["ip", "netns", "exec", NS_A, "nft", "list", "tables"]).stdout
        assert vip_fence.table_name("m-1") not in listed
    finally:
        run(["ip", "-n", NS_A, "addr", "del", cidr, "dev", "veth0"], check=False)
        nft_in_a(vip_fence.remove_script("m-1"))


def test_kernel_lease_refused_script_names_nft_error() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nftables `nft` is not installed")
    result = in_ns_a(
        """
        import asyncio, json
        from hakit.errors import CommandError
        from hakit.net import vip_fence
        try:
            asyncio.run(vip_fence.apply(vip_fence.renew_script("absent", ["192.0.2.9"], 100)))
            print(json.dumps({"error": None}))
        except CommandError as exc:
            print(json.dumps({"error": str(exc)}))
        """
    )
    assert "No such file or directory" in str(result["error"]), result
