"""The heartbeat wire format: authentication, strict parsing, replay classification."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hakit.net.wire import (
    HEADER,
    MAC_SIZE,
    MAX_DATAGRAM,
    REPLAY_WINDOW,
    Envelope,
    ReplayGuard,
    WireError,
    decode,
    encode,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def env(seq: int = 1, incarnation: int = 7, sender: str = "n1", **payload: Any) -> Envelope:
    return Envelope(
        cluster="c1",
        sender=sender,
        incarnation=incarnation,
        seq=seq,
        payload=payload or {"app": {"state": "PRIM", "generation": 3}},
    )


def signed(body: bytes, key: bytes = KEY, header: bytes = HEADER) -> bytes:
    """A datagram with a VALID MAC around an arbitrary body: exercises the parser."""
    return header + body + hmac.digest(key, header + body, hashlib.sha256)


def reason_of(data: bytes, key: bytes = KEY, cluster: str = "c1") -> str:
    with pytest.raises(WireError) as info:
        decode(key, data, cluster=cluster)
    return info.value.reason


# --- encode / decode ----------------------------------------------------------------------


def test_round_trip_gives_back_the_same_envelope() -> None:
    original = env(payload_text="héllo ✓", nested=[1, 2.5, None, True, {"a": "b"}])
    assert decode(KEY, encode(KEY, original), cluster="c1") == original


def test_encoding_is_canonical_magic_json_mac() -> None:
    data = encode(KEY, env())
    assert data.startswith(HEADER)
    body = data[len(HEADER) : -MAC_SIZE]
    fields = json.loads(body)
    assert list(fields) == sorted(fields)
    assert b" " not in body
    assert data[-MAC_SIZE:] == hmac.digest(KEY, data[:-MAC_SIZE], hashlib.sha256)
    assert encode(KEY, env()) == data


def test_every_single_bit_flip_is_refused() -> None:
    data = encode(KEY, env())
    for i in range(len(data)):
        for bit in range(8):
            corrupted = bytearray(data)
            corrupted[i] ^= 1 << bit
            assert reason_of(bytes(corrupted)) in ("garbage", "bad_mac")


def test_altered_json_with_intact_header_is_bad_mac() -> None:
    data = encode(KEY, env(seq=1))
    forged = data.replace(b'"seq":1', b'"seq":9')
    assert forged != data
    assert reason_of(forged) == "bad_mac"


def test_wrong_key_is_bad_mac() -> None:
    assert reason_of(encode(OTHER_KEY, env())) == "bad_mac"


def test_truncated_datagrams_are_refused() -> None:
    data = encode(KEY, env())
    for length in range(len(data)):
        assert reason_of(data[:length]) in ("garbage", "bad_mac")


def test_oversize_envelope_cannot_be_encoded() -> None:
    with pytest.raises(WireError) as info:
        encode(KEY, env(blob="x" * MAX_DATAGRAM))
    assert info.value.reason == "too_big"


def test_envelope_of_exactly_max_size_passes() -> None:
    small = encode(KEY, env(blob=""))
    fitting = env(blob="x" * (MAX_DATAGRAM - len(small)))
    data = encode(KEY, fitting)
    assert len(data) == MAX_DATAGRAM
    assert decode(KEY, data, cluster="c1") == fitting


def test_oversize_datagram_is_refused_before_anything_else() -> None:
    assert reason_of(b"\x00" * (MAX_DATAGRAM + 1)) == "too_big"


def test_envelope_of_another_cluster_is_refused() -> None:
    assert reason_of(encode(KEY, env()), cluster="c2") == "wrong_cluster"


def test_bad_magic_and_unknown_version_are_garbage() -> None:
    data = encode(KEY, env())
    assert reason_of(b"XXXX" + data[4:]) == "garbage"
    assert reason_of(signed(data[len(HEADER) : -MAC_SIZE], header=b"HKHB\x02")) == "garbage"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'"text"',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1,"payload":{},"extra":1}',
        b'{"cluster":"c1","sender":"n1","incarnation":true,"seq":1,"payload":{}}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1.0,"payload":{}}',
        b'{"cluster":"c1","sender":"n1","incarnation":-1,"seq":1,"payload":{}}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":9223372036854775808,"payload":{}}',
        b'{"cluster":"c1","sender":"","incarnation":1,"seq":1,"payload":{}}',
        b'{"cluster":"c1","sender":2,"incarnation":1,"seq":1,"payload":{}}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1,"payload":[]}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1,"payload":{"x":NaN}}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1,"seq":2,"payload":{}}',
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":1,"payload":{"a":1,"a":2}}',
        b'{"cluster":"c1","sender":"n\xff","incarnation":1,"seq":1,"payload":{}}',
        b"[" * 4000 + b"]" * 4000,
        b'{"cluster":"c1","sender":"n1","incarnation":1,"seq":' + b"9" * 5000 + b',"payload":{}}',
    ],
)
def test_authenticated_but_malformed_json_is_garbage(body: bytes) -> None:
    assert reason_of(signed(body)) == "garbage"


@pytest.mark.parametrize(
    "bad",
    [
        Envelope("c1", "n1", True, 1, {}),
        Envelope("c1", "n1", 1, -1, {}),
        Envelope("", "n1", 1, 1, {}),
        Envelope("c1", "n1", 1, 1, {1: "int key"}),  # type: ignore[dict-item]
        Envelope("c1", "n1", 1, 1, {"x": float("nan")}),
    ],
)
def test_encode_refuses_envelopes_decode_would_refuse(bad: Envelope) -> None:
    with pytest.raises(ValueError):
        encode(KEY, bad)


def test_short_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        encode(b"short", env())


@settings(max_examples=500)
@given(st.binary(max_size=MAX_DATAGRAM + 64))
def test_decode_of_arbitrary_bytes_raises_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(KEY, data, cluster="c1")


@settings(max_examples=500)
@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_decode_of_arbitrary_authenticated_bodies_raises_only_wire_error(body: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(KEY, signed(body), cluster="c1")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=20),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    st.dictionaries(st.text(max_size=10), JSON, max_size=5),
)
def test_any_valid_envelope_round_trips(
    sender: str, incarnation: int, seq: int, payload: dict[str, Any]
) -> None:
    original = Envelope("c1", sender, incarnation, seq, payload)
    try:
        data = encode(KEY, original)
    except (WireError, ValueError):  # too big, or a lone surrogate that UTF-8 cannot carry
        return
    assert decode(KEY, data, cluster="c1") == original


# --- replay guard -------------------------------------------------------------------------


def test_increasing_seq_is_new() -> None:
    guard = ReplayGuard()
    assert [guard.check(env(seq=s)) for s in (1, 2, 5)] == ["new", "new", "new"]
    assert guard.last_accepted("n1") == (7, 5)


def test_same_seq_again_is_a_duplicate_from_another_network() -> None:
    guard = ReplayGuard()
    assert guard.check(env(seq=3)) == "new"
    assert guard.check(env(seq=3)) == "duplicate"
    assert guard.check(env(seq=4)) == "new"


def test_lower_seq_of_the_same_incarnation_is_a_replay() -> None:
    guard = ReplayGuard()
    guard.check(env(seq=3))
    guard.check(env(seq=4))
    assert guard.check(env(seq=3)) == "replay"
    assert guard.last_accepted("n1") == (7, 4)


def test_restarted_sender_with_higher_incarnation_starts_over_at_low_seq() -> None:
    guard = ReplayGuard()
    guard.check(env(incarnation=7, seq=1000))
    assert guard.check(env(incarnation=8, seq=0)) == "new"
    assert guard.check(env(incarnation=7, seq=1001)) == "old_incarnation"


def test_copies_of_a_burst_arriving_later_on_a_second_network_are_duplicates() -> None:
    guard = ReplayGuard()
    assert [guard.check(env(seq=s), "hb1") for s in (1, 2, 3)] == ["new"] * 3
    assert [guard.check(env(seq=s), "hb2") for s in (1, 2, 3)] == ["duplicate"] * 3


def test_a_second_copy_on_the_same_network_is_a_replay() -> None:
    guard = ReplayGuard()
    guard.check(env(seq=1), "hb1")
    guard.check(env(seq=2), "hb1")
    assert guard.check(env(seq=1), "hb2") == "duplicate"
    assert guard.check(env(seq=1), "hb1") == "replay"
    assert guard.check(env(seq=1), "hb2") == "replay"
    assert guard.check(env(seq=2), "hb1") == "replay"


def test_copies_older_than_the_window_are_replays() -> None:
    guard = ReplayGuard()
    for seq in range(1, REPLAY_WINDOW + 2):
        guard.check(env(seq=seq), "hb1")
    assert guard.check(env(seq=1), "hb2") == "replay"
    assert guard.check(env(seq=2), "hb2") == "duplicate"


def test_a_seq_never_accepted_arriving_late_is_a_replay() -> None:
    guard = ReplayGuard()
    guard.check(env(seq=1), "hb1")
    guard.check(env(seq=3), "hb1")
    assert guard.check(env(seq=2), "hb2") == "replay"


def test_senders_are_tracked_separately() -> None:
    guard = ReplayGuard()
    assert guard.check(env(sender="n1", seq=10)) == "new"
    assert guard.check(env(sender="n2", seq=1)) == "new"
    assert guard.last_accepted("n3") is None
