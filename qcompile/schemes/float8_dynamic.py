"""float8 e4m3 activations (dynamic) x e4m3 weights, per row (default) or per tensor
(torchao Float8DynamicActivationFloat8WeightConfig; torchao defaults to per tensor, we to per row)."""
from .. import ops
from .base import Scheme, per_row_granularity
from .float8_weight_only import quantize_float8_weight


def emit(g, x, w, bias, options, dtype):
    xq, x_scale = g.call(ops.quantize_float8, x, options.granularity)
    acc = g.call(ops.matmul_float8, xq, w["qweight"])
    return g.call(ops.scale_output, acc, x_scale, w["scale"], bias, dtype)


SCHEME = Scheme(
    name="float8_dynamic",
    summary="float8 e4m3 activation x e4m3 weight, row or tensor scales",
    aliases=("Float8DynamicActivationFloat8WeightConfig",),
    quantize_weight=quantize_float8_weight,
    emit=emit,
    activation="float8 e4m3, per row or per tensor",
    activation_in_graph=True,
    granularities=("row", "tensor"),
    rows_independent=per_row_granularity,
)
