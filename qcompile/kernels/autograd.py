"""The fused kernel ops' backward: the gradient of the reference they replace, at the saved inputs.

A fused op (kernels/cpu/ops.py, kernels/triton/ops.py) computes forward what a pattern of `qcompile::` reference
ops computed; registered with `register_reference_gradient`, a graph compiled with grad mode on runs the kernel
forward and differentiates as the replaced ops did (without it, autograd drops the input's gradient or refuses to
backward through the op).
"""
from __future__ import annotations

from typing import Callable

import torch


def register_reference_gradient(qualname: str, reference_fn: Callable, lib=None) -> None:
    """Give op `qualname` the gradient of `reference_fn` (pure torch, the op's signature) as its backward."""
    torch.library.register_autograd(qualname, _reference_backward(qualname, reference_fn),
                                    setup_context=_keep_inputs, lib=lib)


def _keep_inputs(ctx, inputs, output):
    ctx.inputs = inputs


def _reference_backward(qualname: str, reference_fn):
    """The op's backward: the gradient of its reference at the saved inputs (a model compiled with grad mode on
    trains through the fused kernels as through the ops they replaced). A reference that cannot be built for the
    op's arguments raises ValueError naming the argument; the error then names the op too."""
    def backward(ctx, grad):
        wanted = [i for i, needs in enumerate(ctx.needs_input_grad) if needs]
        with torch.enable_grad():
            args = [a.detach().requires_grad_() if i in wanted else a for i, a in enumerate(ctx.inputs)]
            try:
                out = reference_fn(*args)
            except ValueError as e:
                raise ValueError(f"backward of {qualname}: {e}") from e
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        found = dict(zip(wanted, grads))
        return tuple(found.get(i) for i in range(len(ctx.inputs)))
    return backward
