"""1-8 bit weights, symmetric per group along K, packed in bit planes; float activations
(torchao IntxWeightOnlyConfig). Stored unsigned: u = q + 2^(bits-1); w' = (u - 2^(bits-1)) * scale."""
import torch

from .. import ops
from ..quant import affine, packing
from .base import Scheme


def quantize_intx_symmetric(w, options):
    bits, g = options.bits, options.group_size
    scale = affine.choose_qparams_symmetric(w, g, bits).to(w.dtype)  # scale in the weight's dtype, as torchao
    q = affine.quantize_symmetric(w, scale.float(), g, bits)
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
)
