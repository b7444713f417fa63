"""float8 e4m3 weights per output row, float32 scales; float activations (torchao Float8WeightOnlyConfig)."""
from .. import ops
from ..quant import float8
from .base import Scheme, per_row_granularity


def quantize_float8_weight(w, options):
    granularity = options.granularity or "row"
    scale = float8.choose_scale_float8(w, granularity)
    return {"qweight": float8.quantize_float8(w, scale), "scale": scale.reshape(-1) if granularity == "row"
            else scale.reshape(())}


def emit(g, x, w, bias, options, dtype):
    return g.linear(x, g.call(ops.dequantize_float8, w["qweight"], w["scale"], dtype), bias)


SCHEME = Scheme(
    name="float8_weight_only",
    summary="float8 e4m3 weight per row, float activations",
    aliases=("Float8WeightOnlyConfig",),
    quantize_weight=quantize_float8_weight,
    emit=emit,
    rows_independent=per_row_granularity,
)
