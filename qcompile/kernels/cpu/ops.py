"""The fused CPU intx linear ops the CPU lowering inserts; Inductor lowers them to the generated C++ kernel.

Their eager (and non-Inductor) implementation is the composition of the `qcompile::` reference ops they
replace, so a graph holding them runs anywhere, and numerics are defined by the reference.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from ... import ops as reference

_lib = torch.library.Library(reference.NAMESPACE, "FRAGMENT")

_ARGS = "(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int bits, int group_size, ScalarType dtype) -> Tensor"
# what registers the ops' Inductor lowerings (the package's __init__ sets it: inductor_template.py builds on this
# module, so this module cannot import it)
_inductor_lowerings: Callable[[], None] | None = None


def on_inductor_trace(register: Callable[[], None]) -> None:
    """Have `register` (idempotent) called whenever a graph holding one of the ops is traced with Inductor loaded."""
    global _inductor_lowerings
    _inductor_lowerings = register


def _define(name: str, doc: str):
    """Define `qcompile::<name>` with the decorated reference as its CompositeExplicitAutograd kernel (so
    Inductor keeps the op whole and lowers it) and a shape-only fake kernel."""
    def register(fn):
        _lib.define(name + _ARGS)
        _lib.impl(name, fn, "CompositeExplicitAutograd")

        def fake(x, packed, scale, bias, bits, group_size, dtype):
            # every Inductor / AOTInductor compile traces the graph with fake tensors before it lowers: register the
            # lowering here, once Inductor is loaded (importing it with qcompile would cost 2.4 s)
            if "torch._inductor.lowering" in sys.modules and _inductor_lowerings is not None:
                _inductor_lowerings()
            return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=dtype)

        torch.library.register_fake(f"{reference.NAMESPACE}::{name}", fake, lib=_lib)
        op = getattr(torch.ops.qcompile, name).default
        fn.__doc__ = doc
        return op
    return register


@_define("intx_linear_dynamic_int8_cpu", "quantize_int8_per_token_asym -> matmul_intx -> scale_output, fused")
def intx_linear_dynamic_int8_cpu(x, packed, scale, bias, bits, group_size, dtype):
    xq, x_scale, x_zero = reference.quantize_int8_per_token_asym(x)
    acc = reference.matmul_intx(xq, x_zero, packed, scale, None, bits, group_size)
    return reference.scale_output(acc, x_scale, None, bias, dtype)


@_define("intx_linear_float_cpu", "linear(x, dequantize_intx(...), bias), fused")
def intx_linear_float_cpu(x, packed, scale, bias, bits, group_size, dtype):
    w = reference.dequantize_intx(packed, scale, None, bits, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(dtype)
