"""How the Triton template wants a quantized weight's tensors laid out in memory on CUDA (values unchanged).

Group parameters (scale, zero point, block scale: [N, K / group]) are stored column-major (strides (1, N)). A
tile reads them for BLOCK_N consecutive rows at one group: row-major, that is one 32-byte sector per row (two
bytes used) next to each 64-byte row segment of 4-bit weights — as many memory transactions for the parameters
as for the weights; column-major, the BLOCK_N values are contiguous (tinygemm stores its scales the same way).
The reference ops are pure torch and take any strides; the CPU kernels keep the row-major layout.
"""
from __future__ import annotations

import torch

GROUP_PARAMETERS = ("scale", "zero", "block_scale")  # the names schemes give them in quantize_weight's dict


def for_kernels(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scheme's quantized tensors with their group parameters column-major (same shapes and values)."""
    return {name: column_major(t) if name in GROUP_PARAMETERS and t.dim() == 2 and t.shape[1] > 1 else t
            for name, t in tensors.items()}


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()
