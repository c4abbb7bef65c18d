"""The data rules of docs/replication.md ("Who has the latest data"), one function at a time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hakit.core.freshness import (
    DataRecord,
    DataState,
    alone_refusal,
    compare,
    force_hint,
    lead_refusal,
    neither_provable,
    waiting_hint,
)

U, OUT, R, K = DataState.UPTODATE, DataState.OUTDATED, DataState.RESYNCING, DataState.UNKNOWN
records = st.builds(DataRecord, st.sampled_from(list(DataState)), st.integers(0, 5), st.booleans())


@given(records, records)
def test_compare_is_antisymmetric_so_both_nodes_agree(a: DataRecord, b: DataRecord) -> None:
    assert compare(a, b) == -compare(b, a)
    assert (neither_provable(a, b, "p") is None) == (neither_provable(b, a, "p") is None)


def test_an_up_to_date_copy_beats_any_other() -> None:
    for other in (OUT, R, K):
        assert compare(DataRecord(U, 1), DataRecord(other, 9, ran_alone=True)) == 1


def test_a_node_that_ran_alone_beats_one_that_did_not_whatever_the_generation() -> None:
    assert compare(DataRecord(U, 3, ran_alone=True), DataRecord(U, 7)) == 1


def test_otherwise_the_higher_generation_wins() -> None:
    assert compare(DataRecord(U, 3), DataRecord(U, 4)) == -1


def test_both_unknown_and_both_ran_alone_are_equal_here() -> None:
    assert compare(DataRecord(), DataRecord()) == 0
    assert compare(DataRecord(U, 3, ran_alone=True), DataRecord(U, 5, ran_alone=True)) == 0


def test_lead_needs_a_copy_not_older_and_provably_up_to_date() -> None:
    assert lead_refusal(DataRecord(U, 2), DataRecord(U, 2), 0, "n2") is None
    assert lead_refusal(DataRecord(), DataRecord(), 0, "n2") is None  # fresh cluster
    older = lead_refusal(DataRecord(U, 2), DataRecord(U, 3, ran_alone=True), -1, "n2")
    assert older is not None
    assert older.startswith("data is older than n2's (n2: up to date, generation 3, ran alone")
    neither = lead_refusal(DataRecord(OUT, 4), DataRecord(K), 1, "n2")
    assert neither is not None
    assert neither.startswith("neither copy is provably up to date")


def test_alone_needs_up_to_date_newest_generation_and_ran_alone_or_in_sync() -> None:
    ok = DataRecord(U, 7, ran_alone=True)
    assert alone_refusal(ok, 7, "n2") is None
    assert alone_refusal(DataRecord(U, 7), 7, "n2", in_sync_secondary=True) is None
    assert alone_refusal(DataRecord(U, 7), 7, "n2") == (
        "data may be outdated: n2 may have run without this node since generation 7"
    )
    assert "announced generation 8" in (alone_refusal(ok, 8, "n2") or "")
    assert "never been synchronised" in (alone_refusal(DataRecord(), 0, "n2") or "")
    assert "did not finish" in (alone_refusal(DataRecord(R, 7), 0, "n2") or "")


def test_hints_name_the_override() -> None:
    assert waiting_hint("n2", "web") == "; waiting for n2 (or `hakit prim --force -m web`)"
    assert "add --force to accept losing" in force_hint("n2")
