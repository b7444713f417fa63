"""HQQ (Badri & Shaji 2023, mobiusml/hqq `optimize_weights_proximal_legacy`): data-free refinement of a group-wise
grid's parameters by half-quadratic splitting of  min ||W - dequant(quant(W))||_p^p  with p < 1.

Each iteration, per group (HQQ's scale is our 1 / scale):
  q = quant(W);  W_e = shrink_p(W - dequant(q), beta)            (the sparse outlier part of the error)
  asymmetric grids: zero = mean_g(q - (W - W_e) / scale)           (HQQ's closed-form zero step)
  every grid      : scale = <q - zero, W - W_e>_g / <q - zero, q - zero>_g   (least-squares scale step)
  beta *= kappa
with shrink_p(x, beta) = sign(x) * relu(|x| - |x|^(p-1) / beta), zero 0 wherever |x| <= beta^(-1/(2-p)) (0.15 at
beta 10, p 0.7). All parameters are kept representable (`AffineGrid.representable`).

Two additions to HQQ, both data-free:
- The scale step. HQQ moves only the zero; symmetric grids have no zero to move and a rounded integer zero
  rarely moves.
- Several starting ranges. Min/max makes the grid's ends reach the extreme weights; the fit above is local and
  stays near its start. We start from the min/max range shrunk about its centre by each of RANGE_STARTS, run
  ITERS_PER_START iterations from each, and keep per group the parameters with the lowest squared error seen
  (HQQ keeps its last step and stops at the first one that does not lower the tensor's mean |error|).
On four of SmolLM2-135M's linears (int4 g64, tinygemm grid, bf16 qparams) the squared weight error is 0.69x of
min/max's with this search; 0.80x for one start and 20 iterations (this file before the search), 0.86x for HQQ's
zero step alone.
Weights rarely have errors above the shrink threshold, so the lp step is skipped (it is exactly zero) unless
some group's error bound, max(scale / 2, how far the weights reach past the grid's ends), exceeds it.
"""
from __future__ import annotations

import torch

from .grids import AffineGrid
from .threads import one_cpu_thread

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
RANGE_STARTS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
ITERS_PER_START = 5


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The generalised soft-threshold of HQQ for the l_p (p <= 1) penalty."""
    ax = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    return torch.sign(x) * torch.relu(ax - ax.clamp(min=1e-12).pow(p - 1) / beta)


def shrink_threshold(beta: float, p: float = LP_NORM) -> float:
    """The largest |x| that shrink_lp maps to 0."""
    return 1.0 / beta if p == 1 else beta ** (-1.0 / (2.0 - p))


def hqq_quantize(w: torch.Tensor, grid: AffineGrid, group_size: int, range_starts=RANGE_STARTS,
                 iters_per_start: int = ITERS_PER_START, lp_norm: float = LP_NORM, beta: float = BETA,
                 kappa: float = KAPPA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float32 integer-valued [N, K], scale, zero float32 [N, K // group_size])."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"HQQ: K={K} is not divisible by group_size {group_size}")
    with one_cpu_thread(w.device):
        return _hqq(w.detach().float().reshape(N, K // group_size, group_size), grid, range_starts,
                    iters_per_start, lp_norm, beta, kappa)


def _hqq(W, grid, range_starts, iters_per_start, lp_norm, beta, kappa):
    N, _, group_size = W.shape
    w_min, w_max = W.amin(-1), W.amax(-1)
    rtn_scale, rtn_zero = grid.choose_qparams(W.reshape(N, -1), group_size)
    best_scale, best_zero = rtn_scale, rtn_zero
    best_err = torch.full_like(rtn_scale, float("inf"))
    for shrink in range_starts:
        scale, zero = _shrunk_range(grid, rtn_scale, rtn_zero, (w_min + w_max) / 2, shrink)
        step_beta = beta
        for _ in range(iters_per_start):
            s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
            q = grid.quantize_values(W, s, z)
            residual = W - grid.dequantize_values(q, s, z)
            err = residual.square().mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            target = W  # what the grid should reproduce: W without its outlier errors
            if _error_bound(grid, scale, zero, w_min, w_max).max() > shrink_threshold(step_beta, lp_norm):
                target = W - shrink_lp(residual, step_beta, lp_norm)
            if grid.zero_domain != "none":
                zero = (q - target / s).mean(-1)
                scale, zero = grid.representable(scale, zero)
            scale = _least_squares_scale(q - zero.unsqueeze(-1), target, scale)
            scale, zero = grid.representable(scale, zero)
            step_beta *= kappa
    q = grid.quantize_values(W, best_scale.unsqueeze(-1), best_zero.unsqueeze(-1)).reshape(N, -1)
    return q, best_scale, best_zero


def _shrunk_range(grid: AffineGrid, scale: torch.Tensor, zero: torch.Tensor, centre: torch.Tensor,
                  shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid scaled by `shrink` about the group's centre (symmetric grids: about 0)."""
    if shrink == 1.0:
        return scale, zero
    new_scale = scale * shrink
    if grid.zero_domain == "none":
        return grid.representable(new_scale, zero)
    return grid.representable(new_scale, zero + centre / scale - centre / new_scale)


def _error_bound(grid: AffineGrid, scale, zero, w_min, w_max) -> torch.Tensor:
    """max |W - dequant(quant(W))| per group is at most this: half a step inside the grid, the overshoot past
    its ends outside."""
    low, high = (grid.qmin - zero) * scale, (grid.qmax - zero) * scale
    return torch.maximum(scale / 2, torch.maximum(low - w_min, w_max - high))


def _least_squares_scale(levels: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """argmin_s ||levels * s - target||^2 per group; groups whose levels are all 0 keep their scale."""
    denom = (levels * levels).sum(-1)
    return torch.where(denom > 0, (levels * target).sum(-1) / denom.clamp(min=1e-12), scale)
