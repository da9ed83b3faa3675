"""``gather`` returns the rows of its pieces in order, whichever way it takes them."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from tests.unit.agents.test_assembly_windows import spans

from betrace.agents.assembly import state as st


def _tables(count: int, rows: int) -> list[pa.Table]:
    return [spans(f"trace-{i}", [f"op-{i}-{j}" for j in range(rows)], start=i * rows) for i in range(count)]


def _naive(pieces: list[st.Piece]) -> pa.Table:
    return pa.concat_tables([st.piece_rows(p) for p in pieces]).combine_chunks()


@pytest.mark.parametrize(
    ("tables", "rows", "runs", "run_rows"),
    [
        (4, 50, 10, 3),  # few runs: slices
        (4, 2_000, 60, 300),  # long runs: slices
        (40, 400, 100, 4),  # sparse, up to the slice limit
        (40, 400, 600, 4),  # sparse, many runs: by index from the chunked tables
        (6, 60, 300, 1),  # dense, many runs: by index
    ],
)
def test_gather_equals_the_concatenated_pieces(tables: int, rows: int, runs: int, run_rows: int) -> None:
    rng = random.Random(runs)
    pool = _tables(tables, rows)
    pieces = []
    for _ in range(runs):
        table = rng.choice(pool)
        start = rng.randrange(0, rows - run_rows + 1)
        pieces.append((table, start, run_rows))
    out = st.gather(pieces)
    assert out.equals(_naive(pieces))
    assert all(c.num_chunks == 1 for c in out.columns)


def test_gather_merges_pieces_that_continue_one_another() -> None:
    (table,) = _tables(1, 30)
    pieces = [(table, 0, 10), (table, 10, 5), (table, 20, 10)]
    assert st.gather(pieces).equals(_naive(pieces))
    assert st.gather([]).num_rows == 0
