"""GPTQ (Frantar et al. 2022): round a weight column by column onto a scheme's group-wise grid, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

  H = 2 X^T X / n (any positive multiple works: the damping is relative), H += percdamp * mean(diag H) * I
  U = cholesky(H^-1) (upper);  for column j:  q_j = Q(w_j);  e = (w_j - q_j) / U[j, j];  w_k -= e * U[j, k] (k > j)
Columns are processed in blocks of `block_size` whose updates to later columns are applied once per block
(lazy batch updates). Group parameters are chosen on the fly, from the current (already error-corrected)
values of a group's columns, when its first column is reached; with act_order the columns go in order of
decreasing diag(H) but groups stay the scheme's contiguous K-groups, so the stored layout does not change.
On CPU the column loop runs on one thread (`threads.one_cpu_thread`: SmolLM2's gate_proj takes 0.09 s CPU time
on one thread, 3.9 s on two of a loaded 2-core machine).
"""
from __future__ import annotations

import torch

from .grids import AffineGrid
from .threads import one_cpu_thread

PERCDAMP = 0.01
BLOCK_SIZE = 128


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, float64 [K, K]. Dead inputs (diag 0) must already be 1."""
    H = hessian.double().clone()
    damp = percdamp * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"GPTQ: the calibration Hessian ({H.shape[0]}x{H.shape[0]}) is not positive definite "
                         f"even with damping {percdamp} of its mean diagonal; use more calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, grid: AffineGrid, group_size: int,
                  act_order: bool = True, percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K], hessian [K, K] -> (q float32 integer-valued [N, K], scale, zero float32 [N, K // group_size])."""
    N, K = w.shape
    if hessian.shape != (K, K):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match the weight's K={K} "
                         f"(weight {N}x{K})")
    if K % group_size:
        raise ValueError(f"GPTQ: K={K} is not divisible by group_size {group_size}")
    with one_cpu_thread(w.device):
        return _gptq(w, hessian, grid, group_size, act_order, percdamp, block_size)


def _gptq(w, hessian, grid, group_size, act_order, percdamp, block_size):
    N, K = w.shape
    W = w.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # inputs that are always zero: their weights never matter

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    position = torch.empty_like(perm)
    position[perm] = torch.arange(K, device=perm.device)  # original column -> processing position
    U = inverse_hessian_cholesky(H, percdamp).to(W.dtype)

    n_groups = K // group_size
    scale = torch.zeros(N, n_groups, device=W.device)
    zero = torch.zeros(N, n_groups, device=W.device)
    have_params = torch.zeros(n_groups, dtype=torch.bool)
    Q = torch.zeros_like(W)

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            group = int(perm[i1 + i]) // group_size
            if not have_params[group]:
                cols = position[group * group_size:(group + 1) * group_size]
                current = _current_columns(W, W1, Err1[:, :i], U, cols, i1, i2, i)
                scale[:, group:group + 1], zero[:, group:group + 1] = grid.choose_qparams(current, group_size)
                have_params[group] = True
            col = W1[:, i]
            q = grid.quantize_values(col, scale[:, group], zero[:, group])
            Q[:, i1 + i] = q
            err = (col - grid.dequantize_values(q, scale[:, group], zero[:, group])) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q[:, position], scale, zero


def _current_columns(W, W1, Err1, U, positions, i1, i2, i):
    """The present values of the columns at `positions` (processing order): inside the open block they are
    in W1; after it, W still lacks the block's pending updates from its first i columns."""
    inside = positions < i2
    out = torch.empty(W.shape[0], len(positions), device=W.device, dtype=W.dtype)
    out[:, inside] = W1[:, positions[inside] - i1]
    after = positions[~inside]
    out[:, ~inside] = W[:, after] - Err1 @ U[i1:i1 + i, after]
    return out
