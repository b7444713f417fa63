"""int8 activations per token (dynamic, asymmetric) x asymmetric uint4 weights per group with integer zero
points (torchao Int8DynamicActivationInt4WeightConfig: eps 1e-6, float32 scales)."""
import torch

from .. import ops
from ..quant import affine, packing
from ..quant.grids import AffineGrid
from .base import Scheme, always
from .rounding import GRID_ALGORITHMS, round_onto_grid

EPS = 1e-6  # torchao's for this config


def quantize(w, options, hessian=None):
    g = options.group_size
    if options.algorithm == "rtn":
        scale, zero = affine.choose_qparams_asymmetric(w, g, bits=4, signed=False, eps=EPS)
        u = affine.quantize_asymmetric(w, scale, zero, g, bits=4, signed=False)
    else:
        u, scale, zero = round_onto_grid(w, AffineGrid(bits=4, zero_domain="int", eps=EPS), options, hessian)
    return {"qweight": packing.pack_along_k(u, 4), "scale": scale, "zero": zero.to(torch.uint8)}


def emit(g, x, w, bias, options, dtype):
    xq, x_scale, x_zero = g.call(ops.quantize_int8_per_token_asym, x)
    acc = g.call(ops.matmul_intx, xq, x_zero, w["qweight"], w["scale"], w["zero"], 4, options.group_size)
    return g.call(ops.scale_output, acc, x_scale, None, bias, dtype)


SCHEME = Scheme(
    name="int8_dynamic_int4",
    summary="int8 activation per token (asymmetric) x uint4 weight per group with zero points",
    aliases=("Int8DynamicActivationInt4WeightConfig",),
    quantize_weight=quantize,
    emit=emit,
    activation="int8 per token, asymmetric",
    activation_in_graph=True,
    group_sizes=(32, 64, 128, 256),
    default_group_size=32,
    algorithms=GRID_ALGORITHMS,
    rows_independent=always,
)
