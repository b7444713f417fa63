"""Rounds a weight onto a scheme's group-wise grid with the algorithm the options name: GPTQ (calibrated) or
HQQ (data-free). RTN stays in each scheme's own code, bit-exact with torchao."""
from __future__ import annotations

import torch

from ..quant import gptq, hqq
from ..quant.grids import AffineGrid

# what a group-wise scheme with an AffineGrid accepts for the `algorithm` option
GRID_ALGORITHMS = ("rtn", "gptq", "hqq")


def round_onto_grid(w: torch.Tensor, grid: AffineGrid, options, hessian: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q integer-valued float32 [N, K], scale, zero float32 [N, K // group_size]) on `grid`."""
    if options.algorithm == "hqq":
        return hqq.hqq_quantize(w, grid, options.group_size)
    if options.algorithm == "gptq":
        if hessian is None:
            raise ValueError(f"GPTQ needs calibration statistics for this {tuple(w.shape)} weight, and none were "
                             f"collected (no calibration input reached it)")
        return gptq.gptq_quantize(w, hessian.to(w.device), grid, options.group_size, act_order=options.act_order)
    if options.algorithm == "rtn":
        return grid.round_to_nearest(w, options.group_size)
    raise ValueError(f"unknown rounding algorithm {options.algorithm!r}; valid: {', '.join(GRID_ALGORITHMS)}")
