"""int8 activations per token (dynamic, asymmetric) x 1-8 bit symmetric group-wise weights
(torchao Int8DynamicActivationIntxWeightConfig). Group scales apply inside the matmul, the token scale after."""
from .. import ops
from .base import Scheme, always
from .intx_weight_only import quantize_intx_symmetric
from .rounding import GRID_ALGORITHMS


def emit(g, x, w, bias, options, dtype):
    xq, x_scale, x_zero = g.call(ops.quantize_int8_per_token_asym, x)
    acc = g.call(ops.matmul_intx, xq, x_zero, w["qweight"], w["scale"], None, options.bits, options.group_size)
    return g.call(ops.scale_output, acc, x_scale, None, bias, dtype)


SCHEME = Scheme(
    name="int8_dynamic_intx",
    summary="int8 activation per token (asymmetric) x 1-8 bit weight per group",
    aliases=("Int8DynamicActivationIntxWeightConfig",),
    quantize_weight=quantize_intx_symmetric,
    emit=emit,
    activation="int8 per token, asymmetric",
    activation_in_graph=True,
    group_sizes=(32, 64, 128, 256),
    default_group_size=32,
    bits=tuple(range(1, 9)),
    default_bits=8,
    algorithms=GRID_ALGORITHMS,
    rows_independent=always,
)
