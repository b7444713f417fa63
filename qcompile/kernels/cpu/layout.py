"""How the CPU kernels want a lowered linear's packed weight laid out: its rows interleaved in blocks of 4.

intx_linear.h's GEMV reads 4 rows at a time. Row-major, those are 4 streams through memory; interleaved (each block
of 4 rows stored chunk by chunk: 64 bytes of each row in turn, a row's last shorter chunk likewise; the last block
holds the rows that are left), the GEMV reads one linear stream: SmolLM2-135M's 4-bit decode sweep runs 1.1-1.6x
faster on one AVX-512 VNNI core, its decode 1.09-1.26x (BENCHMARKS.md, issue 24 session 15). Only 4- and 8-bit weights,
whose packed rows are one bit plane (a chunk is consecutive values); other widths stay row-major. Same shape and
bytes, in another order.

The lowering (passes/lower_cpu.py) asks for it where lowered ops are the packed tensor's only readers; the tensors
the graph runs with are laid out once (`laid_out`, the backend and export call it), and the backend's weight cache
then holds the laid-out tensor instead of the row-major one (`rows_of` says which a tensor is; readers that need
rows in order get a copy). The ops' reference reads the rows back in order (`rows_in_order`). Numerics are
untouched: that is qcompile/quant's.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

ROW_BLOCK = 4  # intx_linear.h: QC_VNNI_ROWS, RowLayout<4>
CHUNK_BYTES = 64  # intx_linear.h: QC_CHUNK_BYTES


def row_block(bits: int, float_activation: bool = False) -> int:
    """The rows per interleaved block the kernel reads for `bits`-bit weights (1: row-major). Not for 8-bit weights
    under float activations (intx_weight_only): that GEMV read them 2.4x slower interleaved (SmolLM2 8-bit decode,
    one process, alternating: 19.2 against 45.2 tok/s)."""
    if float_activation and bits == 8:
        return 1
    return ROW_BLOCK if bits in (4, 8) else 1


def _blocks(n_rows: int, rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of each block: full blocks, then the rows left."""
    full = n_rows // rows * rows
    return [(0, full)] * (full > 0) + [(full, n_rows - full)] * (n_rows > full)


def interleave_rows(packed: torch.Tensor, rows: int = ROW_BLOCK) -> torch.Tensor:
    """`packed` [N, row_bytes] (row-major) with each block of `rows` rows interleaved by CHUNK_BYTES chunks."""
    if rows == 1:
        return packed
    n, row_bytes = packed.shape
    whole = row_bytes // CHUNK_BYTES * CHUNK_BYTES
    parts = []
    for first, count in _blocks(n, rows):
        block = min(rows, count)
        x = packed[first:first + count].reshape(count // block, block, row_bytes)
        chunks = x[..., :whole].reshape(count // block, block, -1, CHUNK_BYTES).transpose(1, 2)
        parts += [torch.cat([chunks.reshape(count // block, -1), x[..., whole:].reshape(count // block, -1)], 1)
                  .reshape(-1)]
    return torch.cat(parts).reshape(n, row_bytes)


def rows_in_order(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The row-major tensor that `interleave_rows(·, rows)` made `packed` from."""
    if rows == 1:
        return packed
    n, row_bytes = packed.shape
    whole = row_bytes // CHUNK_BYTES * CHUNK_BYTES
    flat = packed.reshape(-1)
    parts = []
    for first, count in _blocks(n, rows):
        block = min(rows, count)
        x = flat[first * row_bytes:(first + count) * row_bytes].reshape(count // block, block * row_bytes)
        chunks = x[:, :block * whole].reshape(count // block, -1, block, CHUNK_BYTES).transpose(1, 2)
        tail = x[:, block * whole:].reshape(count // block, block, -1)
        parts += [torch.cat([chunks.reshape(count // block, block, whole), tail], 2).reshape(count, row_bytes)]
    return torch.cat(parts)


# tensors laid out here -> their row block (every other tensor is row-major)
_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# a tensor -> {(row block, its version): the same rows laid out so}. One direction only: a row-major tensor remembers
# its interleaved form, a row-major copy of an interleaved tensor remembers where it came from, never both ways
# (each would keep the other alive)
_LAID_OUT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def rows_of(packed: torch.Tensor) -> int:
    """The row block `packed` is laid out in (1: row-major)."""
    return _ROWS.get(packed, 1)


def laid_out(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """`packed`'s rows in blocks of `rows` (1: row-major), whatever layout `packed` has. Interleaving is computed
    once per tensor and version (recompiles and rebound graphs reuse it); putting the rows back in order is a
    copy each time (for a reader that needs them so: the linear pass, an eager call, a reference op), which
    remembers the tensor it came from, so laying the copy out again returns that tensor, not a second one."""
    have = rows_of(packed)
    if have == rows:
        return packed
    remembered = _LAID_OUT.get(packed, {}).get((rows, packed._version))
    if remembered is not None:
        return remembered
    if rows == 1:
        in_order = rows_in_order(packed, have)
        _LAID_OUT[in_order] = {(have, in_order._version): packed}
        return in_order
    interleaved = interleave_rows(laid_out(packed, 1), rows)
    _ROWS[interleaved] = rows
    _LAID_OUT[packed] = {(rows, packed._version): interleaved}
    return interleaved


def rows_view(packed: torch.Tensor, first: int, count: int) -> torch.Tensor | None:
    """Rows first..first+count of `packed` (as `packed.narrow(0, first, count)` of its row-major form) as a view
    in `packed`'s layout, or None where they are not one: interleaved, they are when `first` starts a block and
    `count` ends one or reaches the last row (a fused linear's member, e.g.)."""
    rows = rows_of(packed)
    if rows > 1 and (first % rows or (count % rows and first + count != packed.shape[0])):
        return None
    view = packed.narrow(0, first, count)
    if rows > 1:
        _ROWS[view] = rows
    return view
