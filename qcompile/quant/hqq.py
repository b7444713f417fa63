"""HQQ (Badri & Shaji 2023, mobiusml/hqq `optimize_weights_proximal`): data-free refinement of a group-wise
grid's parameters by half-quadratic splitting of  min ||W - dequant(quant(W))||_p^p  with p < 1.

Starting from the min/max (RTN) parameters, each iteration
  q = quant(W);  W_e = shrink_p(W - dequant(q), beta)            (the sparse outlier part of the error)
  asymmetric grids: zero = mean_g(q - (W - W_e) / scale)           (HQQ's closed-form zero step; rounded
                    for integer zero points)
  every grid      : scale = <q - zero, W - W_e>_g / <q - zero, q - zero>_g   (least-squares scale step)
  beta *= kappa
with shrink_p(x, beta) = sign(x) * relu(|x| - |x|^(p-1) / beta). All parameters are kept representable
(`AffineGrid.representable`). Each group keeps the parameters with the lowest mean |W - W'| seen (HQQ keeps
the best per tensor and stops at the first step without improvement).
HQQ itself moves only the zero; the scale step is ours: symmetric grids have no zero to move, a rounded
integer zero rarely moves, and on tinygemm's grid it lowers the output error further (0.95x -> 0.87x of RTN's
on a correlated test layer).
"""
from __future__ import annotations

import torch

from .grids import AffineGrid

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The generalised soft-threshold of HQQ for the l_p (p <= 1) penalty."""
    ax = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    return torch.sign(x) * torch.relu(ax - ax.clamp(min=1e-12).pow(p - 1) / beta)


def hqq_quantize(w: torch.Tensor, grid: AffineGrid, group_size: int, iters: int = ITERS, lp_norm: float = LP_NORM,
                 beta: float = BETA, kappa: float = KAPPA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float32 integer-valued [N, K], scale, zero float32 [N, K // group_size])."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"HQQ: K={K} is not divisible by group_size {group_size}")
    W = w.detach().float().reshape(N, K // group_size, group_size)
    scale, zero = grid.choose_qparams(w, group_size)
    best_scale, best_zero = scale.clone(), zero.clone()
    best_err = torch.full_like(scale, float("inf"))
    for _ in range(iters):
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = grid.quantize_values(W, s, z)
        residual = W - grid.dequantize_values(q, s, z)
        err = residual.abs().mean(-1)
        improved = err < best_err
        if not improved.any():
            break
        best_err = torch.where(improved, err, best_err)
        best_scale = torch.where(improved, scale, best_scale)
        best_zero = torch.where(improved, zero, best_zero)
        target = W - shrink_lp(residual, beta, lp_norm)  # what the grid should reproduce
        if grid.zero_domain != "none":
            zero = (q - target / s).mean(-1)
            scale, zero = grid.representable(scale, zero)
        scale = _least_squares_scale(q - zero.unsqueeze(-1), target, scale)
        scale, zero = grid.representable(scale, zero)
        beta *= kappa
    q = grid.quantize(w, best_scale, best_zero, group_size)
    return q, best_scale, best_zero


def _least_squares_scale(levels: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """argmin_s ||levels * s - target||^2 per group; groups whose levels are all 0 keep their scale."""
    denom = (levels * levels).sum(-1)
    return torch.where(denom > 0, (levels * target).sum(-1) / denom.clamp(min=1e-12), scale)
