"""Codebook weights: 4-bit indices into one 16-entry k-means codebook, one float32 scale per row; float
activations (torchao CodebookWeightOnlyConfig, uint4, block (1, 1))."""
from .. import ops
from ..quant import codebook
from .base import Scheme


def quantize(w, options):
    packed, book, scale = codebook.quantize_codebook(w)
    return {"qweight": packed, "codebook": book, "scale": scale}


def emit(g, x, w, bias, options, dtype):
    return g.linear(x, g.call(ops.dequantize_codebook, w["qweight"], w["codebook"], w["scale"], dtype), bias)


SCHEME = Scheme(
    name="codebook",
    summary="4-bit codebook indices (16-entry k-means codebook) with row scales",
    aliases=("CodebookWeightOnlyConfig",),
    quantize_weight=quantize,
    emit=emit,
    k_multiple=8,
)
