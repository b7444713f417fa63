"""float8 e4m3 activations per row (dynamic) x symmetric int4 weights per group
(torchao Float8DynamicActivationInt4WeightConfig, "plain" packing: zero point 0). Group scales in the
weight's dtype apply inside the matmul, the row scale after."""
import torch

from .. import ops
from ..quant import affine, packing
from ..quant.grids import AffineGrid
from .base import Scheme, always
from .rounding import GRID_ALGORITHMS, round_onto_grid


def quantize(w, options, hessian=None):
    g = options.group_size
    if options.algorithm == "rtn":
        scale = affine.choose_qparams_symmetric(w, g, bits=4).to(w.dtype)
        q = affine.quantize_symmetric(w, scale.float(), g, bits=4)
    else:
        q, scale, _ = round_onto_grid(w, AffineGrid(bits=4, zero_domain="none", qparam_dtype=w.dtype), options,
                                      hessian)
        scale = scale.to(w.dtype)
    return {"qweight": packing.pack_along_k(q.to(torch.int32) + 8, 4), "scale": scale}


def emit(g, x, w, bias, options, dtype):
    xq, x_scale = g.call(ops.quantize_float8, x, "row")
    acc = g.call(ops.matmul_intx, xq, None, w["qweight"], w["scale"], None, 4, options.group_size)
    return g.call(ops.scale_output, acc, x_scale, None, bias, dtype)


SCHEME = Scheme(
    name="float8_dynamic_int4",
    summary="float8 activation per row x int4 weight per group (symmetric)",
    aliases=("Float8DynamicActivationInt4WeightConfig",),
    quantize_weight=quantize,
    emit=emit,
    activation="float8 e4m3 per row",
    activation_in_graph=True,
    group_sizes=(32, 64, 128, 256),
    default_group_size=128,
    algorithms=GRID_ALGORITHMS,
    rows_independent=always,
)
