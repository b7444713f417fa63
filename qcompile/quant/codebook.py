"""Codebook (k-means) weight quantization: 4-bit indices into one 16-entry codebook per tensor.

Each row is first divided by its absmax (a float32 scale per row), so one codebook fits every row; the
16 entries are 1-D k-means centroids of the normalised values (torchao CodebookWeightOnlyConfig with
block (1, 1) and one scale per row). Initialised at quantiles, Lloyd iterations on at most 2^20 samples.
  w' = codebook[index] * scale[row];  indices packed two per byte along K (packing.py).
"""
from __future__ import annotations

import torch

from .packing import pack_along_k, unpack_along_k

CODEBOOK_BITS = 4
CODEBOOK_SIZE = 1 << CODEBOOK_BITS
_MAX_SAMPLES = 1 << 20


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Sorted centroids [k] of a 1-D float32 sample (deterministic): Lloyd iterations on the sorted sample, where
    each cluster is a contiguous run found by binary search and its sum comes from a float64 prefix sum, so an
    iteration costs O(k log n) instead of a pass over the sample."""
    v = values.flatten().float()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return torch.zeros(k)
    if v.numel() > _MAX_SAMPLES:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = v[torch.randint(0, v.numel(), (_MAX_SAMPLES,), generator=gen, device="cpu").to(v.device)]
    v, _ = v.sort()
    prefix = torch.cat([v.new_zeros(1, dtype=torch.float64), v.double().cumsum(0)])
    centroids = torch.quantile(v.cpu(), torch.linspace(0, 1, k + 2)[1:-1]).to(v.device)
    for _ in range(iters):
        mids = (centroids[1:] + centroids[:-1]) / 2
        # cluster j holds the values in (mids[j-1], mids[j]] (bucketize's convention): a run of the sorted sample
        ends = torch.cat([torch.searchsorted(v, mids, right=True), v.new_tensor([v.numel()], dtype=torch.int64)])
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        counts = ends - starts
        means = ((prefix[ends] - prefix[starts]) / counts.clamp(min=1)).float()
        updated, _ = torch.where(counts > 0, means, centroids).sort()
        if torch.equal(updated, centroids):  # a fixed point: every further iteration returns it again
            break
        centroids = updated
    return centroids


def quantize_codebook(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed indices uint8 [N, K/2], codebook float32 [16], row scale float32 [N])."""
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=1e-12)
    normalised = wf / scale[:, None]
    codebook = kmeans_1d(normalised, CODEBOOK_SIZE)
    mids = (codebook[1:] + codebook[:-1]) / 2
    idx = torch.bucketize(normalised, mids)
    return pack_along_k(idx, CODEBOOK_BITS), codebook, scale


def dequantize_codebook(packed: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    K = packed.shape[-1] * 8 // CODEBOOK_BITS
    idx = unpack_along_k(packed, CODEBOOK_BITS, K)
    return (codebook.float()[idx.long()] * scale.float()[:, None]).to(dtype)
