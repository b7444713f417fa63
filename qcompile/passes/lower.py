"""Device lowering: replace patterns of `qcompile::` reference nodes with fused kernels for the device.

Each device's lowering lives in its own module and is listed here, the one place that says which run where; a
pattern no lowering claims keeps the reference ops, which decompose into aten and compile everywhere (slow, but
correct). lower_cuda needs only torch until it runs (it imports Triton then, and keeps the reference path where
Triton is missing), so CPU-only installs import it too.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..options import QuantOptions
from . import lower_cpu
from .attention import attend_grouped_kv_heads_cuda
from .lower_cpu import attend_few_rows_cpu, attend_grouped_kv_heads_cpu, lower_intx_linears_cpu
from .lower_cuda import lower_quantized_linears_to_triton

# device type -> lowerings applied in order; each rewrites the graph in place (options: the compile's, for
# lowering choices they make; None where a caller has none)
LOWERINGS: dict[str, list[Callable[[torch.fx.GraphModule, torch.device, QuantOptions | None], None]]] = {
    "cuda": [lower_quantized_linears_to_triton, attend_grouped_kv_heads_cuda],
    "cpu": [lower_intx_linears_cpu, attend_grouped_kv_heads_cpu, attend_few_rows_cpu],
}


def lower_for_device(gm: torch.fx.GraphModule, device: torch.device, options: QuantOptions | None = None) -> None:
    for lowering in LOWERINGS.get(device.type, []):
        lowering(gm, device, options)
    gm.graph.lint()
    gm.recompile()


def constant_layouts(gm: torch.fx.GraphModule) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """What the lowerings asked of the quantized tensors the lowered `gm` reads: by placeholder name, a function its
    caller applies to the tensor it feeds there (once per tensor: the functions cache). Absent names: as quantized."""
    return lower_cpu.constant_layouts(gm)
