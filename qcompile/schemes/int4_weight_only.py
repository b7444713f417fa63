"""int4 weights, asymmetric per group along K in tinygemm's float zero-point domain, packed two per byte;
float activations (torchao Int4WeightOnlyConfig). w' = (q - 8) * scale + zero; scale/zero in the weight dtype."""
from .. import ops
from ..quant import affine, packing
from .base import Scheme


def quantize(w, options):
    g = options.group_size
    scale, zero = affine.choose_qparams_tinygemm(w, g)
    scale, zero = scale.to(w.dtype), zero.to(w.dtype)  # as torchao: qparams in the weight's dtype
    q = affine.quantize_tinygemm(w, scale, zero, g)
    return {"qweight": packing.pack_along_k(q, 4), "scale": scale, "zero": zero}


def emit(g, x, w, bias, options, dtype):
    weight = g.call(ops.dequantize_int4_tinygemm, w["qweight"], w["scale"], w["zero"], options.group_size, dtype)
    return g.linear(x, weight, bias)


SCHEME = Scheme(
    name="int4_weight_only",
    summary="int4 weight per group (asymmetric, tinygemm zero domain), float activations",
    aliases=("Int4WeightOnlyConfig",),
    quantize_weight=quantize,
    emit=emit,
    group_sizes=(32, 64, 128, 256),
    default_group_size=128,
)
