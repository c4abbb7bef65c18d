"""The extended-attribute set carried by a resync's META request: round trip, and malformed
input (from the network) refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakit.repl.protocol import ProtocolError, decode_xattrs, encode_xattrs

names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@given(st.dictionaries(names, st.binary(max_size=300), max_size=8))
def test_a_set_comes_back_as_sent(attrs: dict[bytes, bytes]) -> None:
    assert decode_xattrs(encode_xattrs(attrs)) == attrs


def test_the_empty_set_is_not_the_absence_of_a_set() -> None:
    assert encode_xattrs({}) == b"\0\0\0\0"  # four bytes: "remove every attribute"
    assert decode_xattrs(b"\0\0\0\0") == {}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\0\0\0\1",  # one item announced, none there
        struct.pack("!IHI", 1, 3, 2) + b"abc" + b"x",  # value cut short
        struct.pack("!IHI", 1, 0, 0),  # empty name
        struct.pack("!IHI", 1, 3, 0) + b"a\0c",  # NUL in a name
        encode_xattrs({b"user.a": b"1"}) + b"junk",
    ],
)
def test_malformed_sets_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_xattrs(raw)
