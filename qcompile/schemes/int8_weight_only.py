"""int8 weights, symmetric per output row, float32 scales; activations stay in float (torchao Int8WeightOnlyConfig)."""
from .. import ops
from ..quant import affine
from .base import Scheme, always


def quantize_int8_rowwise(w, options):
    scale = affine.choose_qparams_symmetric(w, w.shape[-1], bits=8)  # [N, 1], eps = float32 eps
    return {"qweight": affine.quantize_symmetric(w, scale, w.shape[-1], bits=8), "scale": scale.squeeze(-1)}


def emit(g, x, w, bias, options, dtype):
    return g.linear(x, g.call(ops.dequantize_int8, w["qweight"], w["scale"], dtype), bias)


SCHEME = Scheme(
    name="int8_weight_only",
    summary="int8 weight per row (symmetric), float activations",
    aliases=("Int8WeightOnlyConfig",),
    quantize_weight=quantize_int8_rowwise,
    emit=emit,
    rows_independent=always,
)
