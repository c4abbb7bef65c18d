"""ARP frames: the gratuitous announcement we send and the parser the farm mode will use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakit.net.arp import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    BROADCAST_MAC,
    ZERO_MAC,
    ArpPacket,
    arp_reply,
    gratuitous_arp,
    mac_from_str,
    mac_to_str,
    parse_arp,
)

MAC = bytes.fromhex("020000000001")


def test_gratuitous_arp_is_a_broadcast_request_announcing_the_ip() -> None:
    frame = gratuitous_arp(MAC, "192.0.2.199")
    assert len(frame) == 60
    assert frame[:6] == BROADCAST_MAC
    assert frame[6:12] == MAC
    assert frame[12:14] == b"\x08\x06"
    assert parse_arp(frame) == ArpPacket(
        eth_dst=BROADCAST_MAC,
        eth_src=MAC,
        op=ARPOP_REQUEST,
        sender_mac=MAC,
        sender_ip="192.0.2.199",
        target_mac=ZERO_MAC,
        target_ip="192.0.2.199",
    )


def test_gratuitous_arp_bytes_match_the_rfc_layout() -> None:
    frame = gratuitous_arp(MAC, "192.0.2.199")
    expected = (
        "ffffffffffff"
        "020000000001"
        "0806"  # Ethernet: broadcast, source, ARP
        "0001"
        "0800"
        "06"
        "04"
        "0001"  # Ethernet/IPv4, request
        "020000000001"
        "c00002c7"  # sender MAC, sender IP
        "000000000000"
        "c00002c7"  # target MAC zero, target IP = sender IP
    )
    assert frame.hex() == expected + "00" * 18


def test_parsed_gratuitous_arp_is_recognised_as_gratuitous() -> None:
    packet = parse_arp(gratuitous_arp(MAC, "192.0.2.199"))
    assert packet is not None
    assert packet.is_gratuitous


def test_arp_reply_round_trips_through_the_parser() -> None:
    virtual = bytes.fromhex("02aa00000001")
    client = bytes.fromhex("020000000009")
    packet = parse_arp(arp_reply(MAC, virtual, "192.0.2.199", client, "192.0.2.10"))
    assert packet == ArpPacket(
        eth_dst=client,
        eth_src=MAC,
        op=ARPOP_REPLY,
        sender_mac=virtual,
        sender_ip="192.0.2.199",
        target_mac=client,
        target_ip="192.0.2.10",
    )
    assert not packet.is_gratuitous


def test_unpadded_42_byte_frame_is_parsed() -> None:
    assert parse_arp(gratuitous_arp(MAC, "192.0.2.1")[:42]) is not None


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        gratuitous_arp(MAC, "192.0.2.1")[:41],
        gratuitous_arp(MAC, "192.0.2.1")[:12] + b"\x08\x00" + b"\x00" * 46,  # IPv4, not ARP
        gratuitous_arp(MAC, "192.0.2.1")[:14] + b"\x00\x06" + b"\x00" * 44,  # not Ethernet
    ],
)
def test_non_arp_frames_are_ignored(frame: bytes) -> None:
    assert parse_arp(frame) is None


@given(st.binary(max_size=128))
def test_parse_arp_never_raises(frame: bytes) -> None:
    parse_arp(frame)


def test_bad_inputs_of_the_builder_are_refused() -> None:
    with pytest.raises(ValueError):
        gratuitous_arp(b"\x00" * 5, "192.0.2.1")
    with pytest.raises(ValueError):
        gratuitous_arp(MAC, "2001:db8::1")


def test_mac_text_conversions() -> None:
    assert mac_to_str(MAC) == "02:00:00:00:00:01"
    assert mac_from_str("02:00:00:00:00:01") == MAC
    with pytest.raises(ValueError):
        mac_from_str("02:00:00:00:01")
