"""nvfp4: activations (dynamic, with a dynamic per-tensor scale) and weights in fp4 e2m1, one e4m3 scale per
16 values along K and one float32 scale per tensor (torchao NVFP4DynamicActivationNVFP4WeightConfig).
Emulated: both sides are dequantized and multiplied in the model's dtype."""
from .. import ops
from ..quant import microscaling
from .base import Scheme


def quantize(w, options):
    packed, block_scale, tensor_scale = microscaling.quantize_nvfp4(w)
    return {"qweight": packed, "block_scale": block_scale, "tensor_scale": tensor_scale}


def emit(g, x, w, bias, options, dtype):
    xq, x_block_scale, x_tensor_scale = g.call(ops.quantize_nvfp4, x)
    x_dq = g.call(ops.dequantize_nvfp4, xq, x_block_scale, x_tensor_scale, dtype)
    weight = g.call(ops.dequantize_nvfp4, w["qweight"], w["block_scale"], w["tensor_scale"], dtype)
    return g.linear(x_dq, weight, bias)


SCHEME = Scheme(
    name="nvfp4",
    summary="nvfp4 activation x nvfp4 weight (e2m1, e4m3 scale per 16, float32 tensor scale)",
    aliases=("NVFP4DynamicActivationNVFP4WeightConfig",),
    quantize_weight=quantize,
    emit=emit,
    activation="nvfp4, dynamic",
    k_multiple=microscaling.NVFP4_BLOCK,
)
