"""Sub-byte packing along K, written down once for every kernel.

Layout ("bit planes"): a b-bit unsigned value is split into power-of-two planes, widest first
(3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 1, 2, 4, 8 are one plane). A plane of width w stores 8/w values
per byte, value k in byte k // (8/w) at bit offset (k % (8/w)) * w — low bits first (for int4: low nibble =
even k). A plane holds the value's bits [lo, lo+w) where lo is the sum of the narrower planes' widths,
i.e. the widest plane holds the high bits. The planes of one row are concatenated along the last dim, so a
packed [N, K] weight is one uint8 tensor [N, K * b / 8]; plane p starts at column K * (bits before p) / 8.
Why planes: every plane unpacks with one shift and one mask, no value straddles a byte, no byte is wasted.
"""
from __future__ import annotations

import torch


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths, widest first; e.g. planes(7) == (4, 2, 1)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def plane_offsets(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(width, low bit, start column in units of K/8) per plane, widest first; the narrowest plane holds
    the lowest bits."""
    widths = planes(bits)
    lows = [sum(w for w in widths[i + 1:]) for i in range(len(widths))]
    cols = [sum(widths[:i]) for i in range(len(widths))]
    return tuple(zip(widths, lows, cols))


def pack_along_k(u: torch.Tensor, bits: int) -> torch.Tensor:
    """u: unsigned values [..., K] (any int dtype, in [0, 2^bits)) -> uint8 [..., K * bits / 8]."""
    K = u.shape[-1]
    if K % 8:
        raise ValueError(f"K={K} must be a multiple of 8 to pack {bits}-bit values")
    u = u.to(torch.int32)
    out = []
    for w, lo, _ in plane_offsets(bits):
        per_byte = 8 // w
        v = ((u >> lo) & ((1 << w) - 1)).reshape(*u.shape[:-1], K // per_byte, per_byte)
        shifts = torch.arange(per_byte, device=u.device, dtype=torch.int32) * w
        # bitwise_*_shift, not the << / >> operators: the operators' meta fails on a symbolic size (an activation
        # packed under dynamic shapes: nvfp4)
        out.append(torch.bitwise_left_shift(v, shifts).sum(-1).to(torch.uint8))
    return torch.cat(out, dim=-1)


def unpack_along_k(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_along_k: uint8 [..., K * bits / 8] -> int32 [..., K] in [0, 2^bits)."""
    p = packed.to(torch.int32)
    u = torch.zeros(*packed.shape[:-1], K, dtype=torch.int32, device=packed.device)
    for w, lo, col in plane_offsets(bits):
        per_byte = 8 // w
        nbytes = K // per_byte
        plane = p[..., col * K // 8: col * K // 8 + nbytes]
        shifts = torch.arange(per_byte, device=p.device, dtype=torch.int32) * w
        v = torch.bitwise_right_shift(plane.unsqueeze(-1), shifts) & ((1 << w) - 1)
        u = u | (v.reshape(*packed.shape[:-1], K) << lo)
    return u
