"""Bucket ownership by weighted rendezvous hashing, and the bucket-set codec (core/buckets.py)."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hakit.core import buckets
from hakit.core.buckets import BUCKETS, decode_set, encode_set, owned_by, owners, shares
from hakit.model import NodeId

N = [NodeId(f"n{i}") for i in range(1, 9)]

memberships = st.dictionaries(st.sampled_from(N), st.integers(1, 5), min_size=1, max_size=6)
seeds = st.integers(0, (1 << 32) - 1)


def reference_owner(members: dict[NodeId, int], seed: int, b: int) -> NodeId:
    """The documented formula, written out independently."""

    def score(n: NodeId) -> float:
        digest = hashlib.blake2b(f"{seed}:{b}:{n}".encode(), digest_size=8).digest()
        u = ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52
        return members[n] / -math.log(u)

    return max(sorted(members), key=score)


def test_owners_follow_the_documented_formula_and_do_not_change_across_versions() -> None:
    members = {N[0]: 1, N[1]: 1, N[2]: 1}
    got = owners(members, 7)
    assert got == tuple(reference_owner(members, 7, b) for b in range(BUCKETS))
    # pinned: a change here breaks mixed-version farms (nodes would disagree on owners)
    assert shares(got) == {"n1": 89, "n2": 72, "n3": 95}
    assert got[:6] == ("n1", "n3", "n2", "n2", "n3", "n3")


def test_no_member_owns_nothing_and_weight_zero_owns_nothing() -> None:
    assert owners({}, 1) == (None,) * BUCKETS
    assert set(owners({N[0]: 0, N[1]: 1}, 1)) == {N[1]}
    assert owners({N[0]: 0}, 1) == (None,) * BUCKETS


def test_a_tie_goes_to_the_smaller_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buckets, "_keys", lambda seed, node, n: (1.0,) * n)
    assert set(owners({N[2]: 1, N[1]: 1, N[3]: 1}, 5)) == {N[1]}


@settings(max_examples=60)
@given(members=memberships, seed=seeds)
def test_every_bucket_has_exactly_one_owner_among_the_members(
    members: dict[NodeId, int], seed: int
) -> None:
    got = owners(members, seed)
    assert len(got) == BUCKETS
    assert set(got) <= set(members)
    assert owners(dict(reversed(members.items())), seed) == got  # order of the mapping: none
    assert sum(shares(got).values()) == BUCKETS
    for n in members:
        assert owned_by(got, n) == {b for b, o in enumerate(got) if o == n}


@settings(max_examples=60)
@given(members=memberships, newcomer=st.sampled_from(N), weight=st.integers(1, 5), seed=seeds)
def test_a_newcomer_takes_buckets_only_for_itself_and_a_leaver_gives_only_its_own(
    members: dict[NodeId, int], newcomer: NodeId, weight: int, seed: int
) -> None:
    members.pop(newcomer, None)
    before = owners(members, seed)
    after = owners({**members, newcomer: weight}, seed)
    moved = [b for b in range(BUCKETS) if before[b] != after[b]]
    assert all(after[b] == newcomer for b in moved)  # join: everything moved went to it
    # the same pair read backwards is the newcomer leaving: only its buckets move
    assert all(before[b] == after[b] for b in range(BUCKETS) if after[b] != newcomer)


def test_three_equal_nodes_each_get_a_fair_share_for_many_seeds() -> None:
    for seed in range(200):
        got = shares(owners({N[0]: 1, N[1]: 1, N[2]: 1}, seed))
        assert all(0.20 * BUCKETS <= k <= 0.47 * BUCKETS for k in got.values()), (seed, got)


def test_a_join_moves_about_one_bucket_in_n() -> None:
    total = 0
    for seed in range(100):
        three = owners({N[0]: 1, N[1]: 1, N[2]: 1}, seed)
        four = owners({N[0]: 1, N[1]: 1, N[2]: 1, N[3]: 1}, seed)
        moved = sum(a != b for a, b in zip(three, four, strict=True))
        assert 32 <= moved <= 100, (seed, moved)  # expected 64
        total += moved
    assert 60 <= total / 100 <= 68


def test_weight_two_gets_about_twice_the_share_of_weight_one() -> None:
    heavy = [shares(owners({N[0]: 2, N[1]: 1}, seed)).get(N[0], 0) for seed in range(200)]
    assert all(135 <= k <= 205 for k in heavy)  # expected 170.7 (2/3 of 256)
    assert 165 <= sum(heavy) / len(heavy) <= 177
    mixed = [shares(owners({N[0]: 3, N[1]: 1, N[2]: 1, N[3]: 1}, s)) for s in range(200)]
    avg = {n: sum(m.get(n, 0) for m in mixed) / len(mixed) for n in N[:4]}
    assert 120 <= avg[N[0]] <= 136  # expected 128 (3/6 of 256)
    assert all(38 <= avg[n] <= 48 for n in N[1:4])  # expected 42.7


# ---------------------------------------------------------------------- codec


@given(st.frozensets(st.integers(0, BUCKETS - 1)))
def test_a_bucket_set_survives_encoding(s: frozenset[int]) -> None:
    text = encode_set(s)
    assert len(text) == 64
    assert decode_set(text) == s


def test_encoding_is_a_bitmap_with_bucket_b_at_bit_b() -> None:
    assert encode_set(frozenset()) == "0" * 64
    assert encode_set(frozenset({0})) == "0" * 63 + "1"
    assert encode_set(frozenset({4, 255})) == "8" + "0" * 61 + "10"
    assert decode_set("f" * 64) == frozenset(range(BUCKETS))


@pytest.mark.parametrize("bucket", [-1, BUCKETS, 10**6])
def test_encoding_refuses_a_bucket_out_of_range(bucket: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_set(frozenset({bucket}))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0" * 63,
        "0" * 65,
        "F" * 64,  # uppercase: not the canonical form
        "0x" + "0" * 62,
        "0_" + "0" * 62,
        " " + "0" * 63,
        "0" * 63 + "\n",
        "+" + "0" * 63,
        "g" * 64,
        "٣" * 64,  # a non-ASCII digit, which int() would accept
        b"0" * 64,
        None,
        0,
        ["0" * 64],
    ],
)
def test_decoding_refuses_anything_malformed(text: object) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        decode_set(text)  # type: ignore[arg-type]
