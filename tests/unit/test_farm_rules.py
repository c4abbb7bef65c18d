"""The farm filter's nft script, virtual MAC and bucket hash, without a network.

The script is also checked by nft itself (``nft -c -f -``) inside a throwaway namespace
``hkfchk`` with an ``eth0``, when the tests run as root with nft installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from hakit.net.farm import (
    FarmRule,
    FarmSpec,
    _jhash,
    buckets_in_conntrack,
    client_bucket,
    count_established,
    ruleset,
    table_name,
    virtual_mac,
)
from hakit.system.run import run

WEB = FarmSpec(
    module="web",
    vip="192.0.2.200",
    interface="eth0",
    rules=(FarmRule("tcp", (443, 80)),),
    seed=0xBEEF,
)
MIXED = FarmSpec(
    module="dns-1",
    vip="192.0.2.200",
    interface="eth0",
    rules=(FarmRule("tcp", (53,), "client-ip-port"), FarmRule("udp", (53,), "client-ip-port")),
    seed=7,
)
CHECK_NS = "hkfchk"


def chain(script: str, name: str) -> list[str]:
    """The rules of chain ``name`` in ``script`` (one per line, stripped)."""
    lines = script.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1 : end] if line.strip()]


def test_virtual_mac_is_locally_administered_unicast_followed_by_the_vip() -> None:
    mac = virtual_mac("192.0.2.200")
    assert mac == bytes([0x02, 0x00, 192, 0, 2, 200])
    assert mac[0] & 0x01 == 0  # unicast
    assert mac[0] & 0x02 == 0x02  # locally administered
    with pytest.raises(ValueError):
        virtual_mac("2001:db8::1")


def test_table_name_is_a_safe_identifier_and_distinct_for_distinct_modules() -> None:
    assert table_name("web") == "hakit_farm_web"
    assert table_name("web-1") != table_name("web_1")
    assert table_name("web-1").startswith("hakit_farm_web_1_")
    assert all(c.isalnum() or c == "_" for c in table_name('a"; flush ruleset; "'))


def test_ingress_takes_in_only_ipv4_frames_for_the_virtual_mac_on_the_interface() -> None:
    script = ruleset(WEB, {0}, set())
    assert chain(script, "ingress") == [
        'type filter hook ingress device "eth0" priority 0; policy accept;',
        "ether daddr != 02:00:c0:00:02:c8 return",
        'ether type ip meta pkttype set host counter name "flooded"',
        "ip daddr 192.0.2.200 tcp dport { 80, 443 } jhash ip saddr mod 256 seed 0x0000beef"
        ' != @keep counter name "early" drop',
    ]


def test_ingress_keeps_owned_loose_and_the_buckets_the_agent_still_tracks() -> None:
    assert "elements = { 0, 5 }" in ruleset(WEB, {0}, {5})
    assert "elements = { 0, 5, 9 }" in ruleset(WEB, {0}, {5}, keep={9})
    assert "elements" not in ruleset(WEB, (), ())  # nothing kept: everything dropped early
    early = [r for r in chain(ruleset(MIXED, (), ()), "ingress") if "early" in r]
    assert [r.split(" jhash ")[1].split(" mod ")[0] for r in early] == [
        "ip saddr . tcp sport",
        "ip saddr . udp sport",
    ]


def test_tracked_buckets_are_those_of_open_tcp_entries_to_the_vip_ports() -> None:
    line = (
        "ipv4     2 tcp      6 {t} {state} src={src} dst={dst} sport={sport} dport={dport}"
        " src={dst} dst={src} sport={dport} dport={sport} [ASSURED] mark=0 use=1"
    )
    text = "\n".join(
        [
            line.format(
                t=9, state="ESTABLISHED", src="192.0.2.210", dst="192.0.2.200", sport=4000, dport=80
            ),
            line.format(
                t=9, state="FIN_WAIT", src="192.0.2.211", dst="192.0.2.200", sport=4001, dport=443
            ),
            line.format(
                t=9, state="TIME_WAIT", src="192.0.2.214", dst="192.0.2.200", sport=4004, dport=80
            ),  # over
            line.format(
                t=9, state="ESTABLISHED", src="192.0.2.212", dst="192.0.2.200", sport=4002, dport=22
            ),  # another port
            line.format(
                t=9, state="ESTABLISHED", src="192.0.2.213", dst="192.0.2.99", sport=4003, dport=80
            ),  # another address
        ]
    )

    got = buckets_in_conntrack(text, WEB)

    assert got == {client_bucket("192.0.2.210", 0xBEEF), client_bucket("192.0.2.211", 0xBEEF)}
    per_port = buckets_in_conntrack(text.replace("dport=80 ", "dport=53 "), MIXED)
    assert per_port == {client_bucket("192.0.2.210", 7, sport=4000)}


def test_prerouting_runs_after_conntrack_and_skips_the_nodes_own_packets() -> None:
    assert chain(ruleset(WEB, (), ()), "prerouting") == [
        "type filter hook prerouting priority -150; policy accept;",
        'iif != "lo" ip daddr 192.0.2.200 jump vip',
    ]


def test_tcp_established_first_then_syn_of_owned_then_any_packet_of_loose_else_drop() -> None:
    hashed = "jhash ip saddr mod 256 seed 0x0000beef"
    assert chain(ruleset(WEB, {1, 2}, {3}), "vip") == [
        "tcp dport { 80, 443 } ct state established tcp flags & (fin | syn | rst | ack) != syn"
        ' counter name "established" accept',
        f"tcp dport {{ 80, 443 }} {hashed} @owned tcp flags & (fin | syn | rst | ack) == syn"
        ' counter name "new" accept',
        f'tcp dport {{ 80, 443 }} {hashed} @loose counter name "loose" accept',
        'ct state related counter name "established" accept',
        f"icmp type echo-request {hashed} @owned counter accept",
        'counter name "dropped" drop',
    ]


def test_client_ip_port_hashes_the_source_port_and_udp_ignores_conntrack_state() -> None:
    rules = chain(ruleset(MIXED, (), ()), "vip")
    assert "tcp dport 53 jhash ip saddr . tcp sport mod 256 seed 0x00000007 @owned" in rules[1]
    udp = [r for r in rules if r.startswith("udp")]
    assert udp == [
        'udp dport 53 jhash ip saddr . udp sport mod 256 seed 0x00000007 @owned counter name "new"'
        " accept",
        "udp dport 53 jhash ip saddr . udp sport mod 256 seed 0x00000007 @loose counter name"
        ' "loose" accept',
    ]


def test_bucket_sets_are_filled_after_being_emptied_in_the_same_script() -> None:
    script = ruleset(WEB, [5, 1, 5], [9])
    lines = script.splitlines()
    assert lines[-4:] == [
        "flush set inet hakit_farm_web owned",
        "flush set inet hakit_farm_web loose",
        "add element inet hakit_farm_web owned { 1, 5 }",
        "add element inet hakit_farm_web loose { 9 }",
    ]
    assert "add element" not in ruleset(WEB, (), ())


def test_apply_keeps_the_inet_counters_while_setup_recreates_the_tables() -> None:
    kept = ruleset(WEB, (), ())
    assert "table inet hakit_farm_web\nflush table inet hakit_farm_web\n" in kept
    assert "delete table inet" not in kept
    fresh = ruleset(WEB, (), (), fresh=True)
    assert "table inet hakit_farm_web\ndelete table inet hakit_farm_web\n" in fresh
    assert "flush" not in fresh
    for script in (kept, fresh):  # create if missing, then delete: never fails
        assert "table netdev hakit_farm_web\ndelete table netdev hakit_farm_web" in script


def test_buckets_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="owned buckets out of 0-255"):
        ruleset(WEB, {256}, ())
    with pytest.raises(ValueError, match="loose"):
        ruleset(WEB, (), {-1})


@pytest.mark.parametrize(
    "change",
    [
        {"vip": "2001:db8::1"},
        {"vip": "not an address"},
        {"interface": 'eth0"; flush ruleset'},
        {"interface": "a-very-long-interface-name"},
        {"rules": ()},
        {"seed": 1 << 32},
        {"buckets": 0},
    ],
)
def test_invalid_specs_are_refused(change: dict[str, object]) -> None:
    fields: dict[str, object] = {**WEB.__dict__, **change}
    with pytest.raises(ValueError):
        FarmSpec(**fields)  # type: ignore[arg-type]


def test_invalid_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="ports"):
        FarmRule("tcp", ())
    with pytest.raises(ValueError, match="ports"):
        FarmRule("tcp", (0,))
    with pytest.raises(ValueError, match="proto"):
        FarmRule("sctp", (80,))  # type: ignore[arg-type]


def test_jhash_matches_the_lookup3_reference_vectors() -> None:
    # Bob Jenkins' lookup3.c driver5(): hashlittle("", 0, 0) and the "Four score" sentence
    assert _jhash(b"", 0) == 0xDEADBEEF
    assert _jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert _jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert _jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_client_bucket_is_in_range_and_spreads_clients() -> None:
    buckets = {client_bucket(f"10.0.{i // 256}.{i % 256}", 0xBEEF) for i in range(4096)}
    assert min(buckets) >= 0
    assert max(buckets) <= 255
    assert len(buckets) > 240
    assert client_bucket("192.0.2.10", 1, sport=1000) != client_bucket("192.0.2.10", 1, sport=1001)


def test_count_established_reads_only_tcp_established_to_the_vip_ports() -> None:
    text = "\n".join(
        [
            "ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.210 dst=192.0.2.200 sport=4000"
            " dport=80 src=192.0.2.200 dst=192.0.2.210 sport=80 dport=4000 [ASSURED] mark=0 use=1",
            "ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.211 dst=192.0.2.200 sport=4001"
            " dport=22 src=192.0.2.200 dst=192.0.2.211 sport=22 dport=4001 [ASSURED] mark=0 use=1",
            "ipv4     2 tcp      6 119 TIME_WAIT src=192.0.2.212 dst=192.0.2.200 sport=4002"
            " dport=80 src=192.0.2.200 dst=192.0.2.212 sport=80 dport=4002 [ASSURED] mark=0 use=1",
            "ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.200 dst=192.0.2.213 sport=80"
            " dport=80 src=192.0.2.213 dst=192.0.2.200 sport=80 dport=80 [ASSURED] mark=0 use=1",
            "ipv4     2 udp      17 29 src=192.0.2.214 dst=192.0.2.200 sport=53 dport=80"
            " src=192.0.2.200 dst=192.0.2.214 sport=80 dport=53 mark=0 use=1",
            "ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.215 dst=192.0.2.200 sport=4005"
            " dport=443 src=192.0.2.200 dst=192.0.2.215 sport=443 dport=4005 [ASSURED] use=1",
        ]
    )
    assert count_established(text, "192.0.2.200", [80, 443]) == 2
    assert count_established("", "192.0.2.200", [80]) == 0


def _why_no_nft_check() -> str | None:
    if os.geteuid() != 0:
        return "checking the script with nft needs root (a throwaway network namespace)"
    if shutil.which("nft") is None or shutil.which("ip") is None:
        return "nft and ip are needed to check the script"
    return None


@pytest.fixture
def check_namespace() -> Iterator[str]:
    reason = _why_no_nft_check()
    if reason:
        pytest.skip(reason)

    def remove() -> None:
        if CHECK_NS in run(["ip", "netns", "list"]).stdout.split():
            run(["ip", "netns", "del", CHECK_NS])

    remove()  # left by a crashed run
    try:
        run(["ip", "netns", "add", CHECK_NS])
        run(["ip", "-n", CHECK_NS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        yield CHECK_NS
    finally:
        remove()


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("spec", [WEB, MIXED], ids=["web", "mixed"])
def test_nft_checks_and_loads_the_script_twice_in_a_row(
    check_namespace: str, spec: FarmSpec, fresh: bool
) -> None:
    script = ruleset(spec, range(0, 256, 3), {1, 4}, fresh=fresh)
    for check in (["-c"], [], []):  # check it, load it, load it again (idempotent)
        done = run(
            ["ip", "netns", "exec", check_namespace, "nft", *check, "-f", "-"],
            input_text=script,
            check=False,
        )
        assert done.ok, done.stderr
    listed = run(["ip", "netns", "exec", check_namespace, "nft", "list", "ruleset"], check=False)
    assert listed.ok, listed.stderr  # listing must not crash (typeof of the sets)
    assert "elements = { 1, 4 }" in listed.stdout


def test_a_changed_interface_replaces_the_old_one_in_the_ingress_chain(
    check_namespace: str,
) -> None:
    moved = FarmSpec(**{**WEB.__dict__, "interface": "eth1"})
    for script in (ruleset(WEB, {1}, (), fresh=True), ruleset(moved, {1}, ())):
        done = run(["ip", "netns", "exec", check_namespace, "nft", "-f", "-"], input_text=script)
        assert done.ok
    listed = run(["ip", "netns", "exec", check_namespace, "nft", "list", "chain", "netdev",
                  "hakit_farm_web", "ingress"]).stdout  # fmt: skip
    assert 'device "eth1"' in listed
    assert "eth0" not in listed
