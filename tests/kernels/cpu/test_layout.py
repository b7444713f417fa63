"""The CPU kernels' interleaved row layout (qcompile/kernels/cpu/layout.py) against a byte-by-byte statement of it."""
import pytest
import torch

from qcompile.kernels.cpu import layout


def _interleaved_bytes(packed, rows):
    """Block by block (the last holds the rows left), chunk by chunk of 64 bytes, each row of the block in turn."""
    n, row_bytes = packed.shape
    out = []
    for first in range(0, n, rows):
        for c in range(0, row_bytes, 64):
            for r in range(first, min(first + rows, n)):
                out += packed[r, c:c + 64].tolist()
    return out


@pytest.mark.parametrize("n, row_bytes", [(1, 16), (3, 96), (4, 64), (8, 288), (37, 128), (39, 176), (41, 768)])
def test_interleave_rows_and_back(n, row_bytes):
    packed = torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8)
    rows = layout.interleave_rows(packed)
    assert rows.shape == packed.shape and rows.reshape(-1).tolist() == _interleaved_bytes(packed, 4)
    assert torch.equal(layout.rows_in_order(rows, 4), packed)


def test_row_block_is_for_one_plane_widths_only():
    assert [layout.row_block(bits) for bits in range(1, 9)] == [1, 1, 1, 4, 1, 1, 1, 4]


def test_laid_out_once_per_tensor_and_version():
    packed = torch.randint(0, 256, (8, 64), dtype=torch.uint8)
    first = layout.laid_out(packed, 4)
    assert layout.laid_out(packed, 4) is first and layout.laid_out(packed, 1) is packed
    packed[0, 0] ^= 1  # written in place: laid out again
    assert torch.equal(layout.laid_out(packed, 4), layout.interleave_rows(packed))


def test_rows_in_order_are_a_copy_that_lays_out_as_the_original():
    """The weight cache holds the interleaved tensor only: a reader that needs rows in order gets a copy, and the
    linear pass's copy, laid out again by the lowering, is the cached tensor itself (no second interleaved one)."""
    packed = torch.randint(0, 256, (10, 96), dtype=torch.uint8)
    interleaved = layout.laid_out(packed, 4)
    assert layout.rows_of(packed) == 1 and layout.rows_of(interleaved) == 4
    in_order = layout.laid_out(interleaved, 1)
    assert torch.equal(in_order, packed) and in_order is not packed and layout.rows_of(in_order) == 1
    assert layout.laid_out(in_order, 4) is interleaved and layout.laid_out(interleaved, 4) is interleaved


@pytest.mark.parametrize("first, count, view", [(0, 4, True), (4, 6, True), (0, 10, True), (4, 3, False),
                                                (2, 8, False)])
def test_rows_view_of_an_interleaved_tensor(first, count, view):
    """A fused linear's member rows: a view where they start a block and end one (or reach the last row)."""
    packed = torch.randint(0, 256, (10, 96), dtype=torch.uint8)
    rows = layout.rows_view(layout.laid_out(packed, 4), first, count)
    assert (rows is not None) == view
    if view:
        assert layout.rows_of(rows) == 4 and torch.equal(layout.laid_out(rows, 1), packed[first:first + count])
