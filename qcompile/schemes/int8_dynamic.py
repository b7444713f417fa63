"""int8 activations per token (dynamic, symmetric) x int8 weights per row: an int32 GEMM, then both scales
(torchao Int8DynamicActivationInt8WeightConfig)."""
from .. import ops
from .base import Scheme, always
from .int8_weight_only import quantize_int8_rowwise


def emit(g, x, w, bias, options, dtype):
    xq, x_scale = g.call(ops.quantize_int8_per_token, x)
    acc = g.call(ops.matmul_int8, xq, w["qweight"])
    return g.call(ops.scale_output, acc, x_scale, w["scale"], bias, dtype)


SCHEME = Scheme(
    name="int8_dynamic",
    summary="int8 activation per token x int8 weight per row, int32 accumulate",
    aliases=("Int8DynamicActivationInt8WeightConfig",),
    quantize_weight=quantize_int8_rowwise,
    emit=emit,
    activation="int8 per token, symmetric",
    activation_in_graph=True,
    rows_independent=always,
)
