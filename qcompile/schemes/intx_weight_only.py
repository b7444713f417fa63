"""1-8 bit weights, symmetric per group along K, packed in bit planes; float activations
(torchao IntxWeightOnlyConfig). Stored unsigned: u = q + 2^(bits-1); w' = (u - 2^(bits-1)) * scale."""
import torch

from .. import ops
from ..quant import affine, packing
from ..quant.grids import AffineGrid
from .base import Scheme, always
from .rounding import GRID_ALGORITHMS, round_onto_grid


def quantize_intx_symmetric(w, options, hessian=None):
    bits, g = options.bits, options.group_size
    if options.algorithm == "rtn":
        scale = affine.choose_qparams_symmetric(w, g, bits).to(w.dtype)  # scale in the weight's dtype, as torchao
        q = affine.quantize_symmetric(w, scale.float(), g, bits)
    else:
        q, scale, _ = round_onto_grid(w, AffineGrid(bits=bits, zero_domain="none", qparam_dtype=w.dtype), options,
                                      hessian)
        scale = scale.to(w.dtype)
    u = q.to(torch.int32) + (1 << (bits - 1))
    return {"qweight": packing.pack_along_k(u, bits), "scale": scale}


def emit(g, x, w, bias, options, dtype):
    weight = g.call(ops.dequantize_intx, w["qweight"], w["scale"], None, options.bits, options.group_size, dtype)
    return g.linear(x, weight, bias)


SCHEME = Scheme(
    name="intx_weight_only",
    summary="1-8 bit weight per group (symmetric), float activations",
    aliases=("IntxWeightOnlyConfig",),
    quantize_weight=quantize_intx_symmetric,
    emit=emit,
    group_sizes=(32, 64, 128, 256),
    default_group_size=32,
    bits=tuple(range(1, 9)),
    default_bits=8,
    algorithms=GRID_ALGORITHMS,
    rows_independent=always,
)
