"""mxfp8: activations (dynamic) and weights in e4m3 with one e8m0 scale per 32 values along K
(torchao MXDynamicActivationMXWeightConfig). No GPU here has block-scaled MMA: both sides are dequantized
(exactly: e4m3 x 2^e fits bf16) and multiplied in the model's dtype."""
from .. import ops
from ..quant import microscaling
from .base import Scheme, always


def quantize(w, options):
    q, scale = microscaling.quantize_mxfp8(w)
    return {"qweight": q, "scale": scale}


def emit(g, x, w, bias, options, dtype):
    xq, x_scale = g.call(ops.quantize_mxfp8, x)
    x_dq = g.call(ops.dequantize_mxfp8, xq, x_scale, dtype)
    return g.linear(x_dq, g.call(ops.dequantize_mxfp8, w["qweight"], w["scale"], dtype), bias)


SCHEME = Scheme(
    name="mxfp8",
    summary="mxfp8 activation x mxfp8 weight (e4m3, e8m0 scale per 32)",
    aliases=("MXDynamicActivationMXWeightConfig", "MXFPInferenceConfig"),
    quantize_weight=quantize,
    emit=emit,
    activation="mxfp8, dynamic",
    k_multiple=microscaling.MX_BLOCK,
    rows_independent=always,
)
