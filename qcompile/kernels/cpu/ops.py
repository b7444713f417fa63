"""The fused CPU intx linear ops the CPU lowering inserts; Inductor lowers them to the generated C++ kernel.

Their eager (and non-Inductor) implementation is the composition of the `qcompile::` reference ops they
replace, so a graph holding them runs anywhere, and numerics are defined by the reference. The intx linears'
`row_block` says how `packed`'s rows are laid out (layout.py: 1 row-major, 4 interleaved in blocks of 4); the
reference reads them back in order first.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from ... import ops as reference
from ..autograd import register_reference_gradient
from . import layout

_lib = torch.library.Library(reference.NAMESPACE, "FRAGMENT")

_ARGS = ("(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int bits, int group_size, ScalarType dtype, "
         "int row_block=1) -> Tensor")
# what registers the ops' Inductor lowerings (the package's __init__ sets it: inductor_template.py builds on this
# module, so this module cannot import it)
_inductor_lowerings: Callable[[], None] | None = None


def on_inductor_trace(register: Callable[[], None]) -> None:
    """Have `register` (idempotent) called whenever a graph holding one of the ops is traced with Inductor loaded."""
    global _inductor_lowerings
    _inductor_lowerings = register


def _define(name: str, doc: str, args: str = _ARGS, fake_output=None):
    """Define `qcompile::<name>` with the decorated reference as its CompositeExplicitAutograd kernel (so
    Inductor keeps the op whole and lowers it) and a fake kernel (`fake_output`: the output's shape and layout
    from the arguments; default, an intx linear's)."""
    def register(fn):
        _lib.define(name + args)
        _lib.impl(name, fn, "CompositeExplicitAutograd")

        def fake(*call_args):
            # every Inductor / AOTInductor compile traces the graph with fake tensors before it lowers: register the
            # lowering here, once Inductor is loaded (importing it with qcompile would cost 2.4 s)
            if "torch._inductor.lowering" in sys.modules and _inductor_lowerings is not None:
                _inductor_lowerings()
            return (fake_output or _linear_output)(*call_args)

        torch.library.register_fake(f"{reference.NAMESPACE}::{name}", fake, lib=_lib)
        register_reference_gradient(f"{reference.NAMESPACE}::{name}", fn, lib=_lib)
        op = getattr(torch.ops.qcompile, name).default
        fn.__doc__ = doc
        return op
    return register


def _linear_output(x, packed, scale, bias, bits, group_size, dtype, row_block=1):
    return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=dtype)


@_define("intx_linear_dynamic_int8_cpu", "quantize_int8_per_token_asym -> matmul_intx -> scale_output, fused")
def intx_linear_dynamic_int8_cpu(x, packed, scale, bias, bits, group_size, dtype, row_block=1):
    xq, x_scale, x_zero = reference.quantize_int8_per_token_asym(x)
    acc = reference.matmul_intx(xq, x_zero, layout.rows_in_order(packed, row_block), scale, None, bits, group_size)
    return reference.scale_output(acc, x_scale, None, bias, dtype)


@_define("intx_linear_float_cpu", "linear(x, dequantize_intx(...), bias), fused")
def intx_linear_float_cpu(x, packed, scale, bias, bits, group_size, dtype, row_block=1):
    w = reference.dequantize_intx(layout.rows_in_order(packed, row_block), scale, None, bits, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(dtype)


def _attention_output(q, k, v, mask, scale):
    """[B, Hq, Lq, D] stored as [B, Lq, Hq, D]: the layout of ATen's CPU flash attention output, which it replaces."""
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d)).transpose(1, 2)


@_define("decode_attention_cpu", "softmax(scale * q k^T + mask) v (query head h reads key/value head h // (Hq / Hkv)), "
         "in float32: a decode step's few query rows, or a prefill's under an additive mask (non-causal)",
         "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor", _attention_output)
def decode_attention_cpu(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.float()
    out = torch.softmax(scores, dim=-1) @ v
    layout = _attention_output(q, k, v, mask, scale)
    return torch.empty_strided(layout.shape, layout.stride(), dtype=q.dtype, device=q.device).copy_(out)
