"""Error measures shared by tests, benchmarks and the debugging report."""
from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in float64. inf when identical."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).mean().item()
    signal = ref.pow(2).mean().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
