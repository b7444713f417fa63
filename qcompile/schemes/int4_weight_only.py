"""int4 weights, asymmetric per group along K in tinygemm's float zero-point domain, packed two per byte;
float activations (torchao Int4WeightOnlyConfig). w' = (q - 8) * scale + zero; scale/zero in the weight dtype."""
from .. import ops
from ..quant import affine, packing
from ..quant.grids import AffineGrid
from .base import Scheme, always
from .rounding import GRID_ALGORITHMS, round_onto_grid


def quantize(w, options, hessian=None):
    g = options.group_size
    if options.algorithm == "rtn":
        scale, zero = affine.choose_qparams_tinygemm(w, g)
        scale, zero = scale.to(w.dtype), zero.to(w.dtype)  # as torchao: qparams in the weight's dtype
        q = affine.quantize_tinygemm(w, scale, zero, g)
    else:
        grid = AffineGrid(bits=4, zero_domain="float", qparam_dtype=w.dtype)
        q, scale, zero = round_onto_grid(w, grid, options, hessian)
        scale, zero = scale.to(w.dtype), grid.value_zero(scale, zero)
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
    algorithms=GRID_ALGORITHMS,
    rows_independent=always,
)
