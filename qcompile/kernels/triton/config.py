"""One launch configuration of the quantized-linear template (or a library GEMM in its place): what the
launchers (linear.py) run and the tuner (tuning.py) chooses among."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    swap_ab: bool = False  # tensor-core tile computing out^T = W x^T (small M: the weight is the wide operand)
    planes: bool = False  # sub-byte weights decoded into K-planes by packed bf16x2 instructions
    join_planes: bool = False  # ... joined back into K order: one dot per bit width against x's contiguous tile
    library: str = ""  # "dequant_mm" / "scaled_mm" / "int_mm": a library GEMM instead of the template
    fuse_activation: bool = False  # GEMV only: x quantized (e4m3 per row) by the GEMV, not by its own kernel
    reduce_each: bool = False  # elementwise GEMV only: per-row sums every K block (fewer registers, more programs)
    pair_decode: bool = False  # swapped int4 tile: words decoded by byte pairs into wgmma's register operand
    scale_after_dot: bool = False  # ... as 128 + q, the group scale and zero applied to each K block's product
    block_product: bool = False  # ... each K block's product from zero, added after (wgmma not serialized by ptxas,
    # for BLOCK_M / BLOCK_K add instructions per weight)
