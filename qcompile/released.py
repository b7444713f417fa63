"""What a module keeps after qcompile released its float weights (the default, docs/DESIGN.md "Release the float
weights"): its nn.Linear layers still run eagerly — the scheme's own nodes, the reference ops, on the quantized
tensors the compiled graph reads — and whatever needs the float values raises an error that says how to keep
them (options={"keep_float_weights": True}).

Hooks, not a new `forward` or a tensor subclass in place of the parameter: Dynamo guards a compiled graph on
`forward` not being in the module's __dict__ and on each parameter's Python type (either change recompiles), but
not on hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`). The forward pre-hook tags the input, and the one
op nn.Linear.forward runs, F.linear, on a tagged input runs the quantized linear. Under torch.compile and
torch.export the hooks do nothing, so a later trace sees the float linear, as the first one did.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _compat
from .options import QuantOptions

KEEP_FLOAT_WEIGHTS = "compile with options={'keep_float_weights': True} to keep them"


def float_weights_released(action: str, names: Iterable[str]) -> RuntimeError:
    """The one error for every use of released float weights: what needed them, which, and how to keep them."""
    names = list(dict.fromkeys(names))
    shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return RuntimeError(f"qcompile: {action} needs the float weights of {shown}, which an earlier compile released "
                        f"after quantizing them (only their quantized tensors are kept); {KEEP_FLOAT_WEIGHTS}")


@dataclass(frozen=True)
class ReleasedWeight:
    """A released float weight, as its eager calls see it."""
    name: str  # its path, for messages
    options: QuantOptions  # those of the compile that released it
    quantized: Callable[[torch.dtype | None], Mapping[str, torch.Tensor]]  # cast dtype -> its quantized tensors


Lookup = Callable[[torch.Tensor], "ReleasedWeight | None"]  # a parameter -> how it was released, or None

_ATTACHED: weakref.WeakSet = weakref.WeakSet()


def attach(module: nn.Module, lookup: Lookup) -> None:
    """Install the hooks on a module that holds a released weight as a parameter (once per module)."""
    if module in _ATTACHED:
        return
    _ATTACHED.add(module)
    module.register_forward_pre_hook(functools.partial(_before_forward, lookup=lookup), with_kwargs=True)
    module.register_state_dict_pre_hook(functools.partial(_before_state_dict, lookup=lookup))


def _released_parameters(module: nn.Module, lookup: Lookup) -> dict[str, ReleasedWeight]:
    return {name: found for name, p in module._parameters.items() if p is not None and (found := lookup(p))}


def _before_forward(module: nn.Module, args: tuple, kwargs: dict, lookup: Lookup):
    if torch.compiler.is_compiling():  # torch.compile / torch.export: trace the float module, as the first time
        return None
    released = _released_parameters(module, lookup)
    if not released:  # its weights were replaced since
        return None
    runs_quantized = (type(module).forward is nn.Linear.forward and set(released) == {"weight"}
                      and not _compat.is_dtensor(module.weight))
    if not runs_quantized:
        raise float_weights_released(f"calling {type(module).__name__} eagerly (only torch.nn.Linear runs on its "
                                     f"quantized weight)", [w.name for w in released.values()])
    x = args[0] if args else kwargs.pop("input")
    return (_LinearInput.tag(x, module.weight, released["weight"]),), kwargs


def _before_state_dict(module: nn.Module, prefix: str, keep_vars: bool, lookup: Lookup) -> None:
    """state_dict() would hold tensors without storage: an error instead. keep_vars=True (the live Parameters,
    as named_parameters() gives them; torch.export reads a module that way) is left alone."""
    released = _released_parameters(module, lookup)
    if released and not keep_vars:
        raise float_weights_released("state_dict()", [prefix + name for name in released])


class _LinearInput(torch.Tensor):
    """An nn.Linear's input, tagged by its pre-hook: the F.linear its forward runs becomes the quantized linear;
    any other op sees a plain tensor."""

    @staticmethod
    def tag(x: torch.Tensor, weight: torch.Tensor, released: ReleasedWeight) -> torch.Tensor:
        tagged = x.as_subclass(_LinearInput)
        tagged.qcompile_weight = (weight, released)
        return tagged

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            x = args[0] if args else None
            if func is F.linear and isinstance(x, cls) and len(args) > 1 and args[1] is x.qcompile_weight[0]:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return quantized_linear(x.as_subclass(torch.Tensor), args[1], bias, x.qcompile_weight[1])
            return func(*args, **kwargs)


class _TensorEmitter:
    """The linear pass's Emitter on tensors instead of graph nodes: each node a scheme emits is computed now."""

    def call(self, op, *args):
        return op(*args)

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     released: ReleasedWeight) -> torch.Tensor:
    """F.linear(x, weight, bias) for a released weight, as the compiled graph computes it before device lowering:
    the scheme's nodes on its quantized tensors. The call's temporaries (a dequantized weight for weight-only
    schemes, the quantized activation for dynamic ones) live only during the call."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    if x.dtype != dtype and not autocast:
        raise RuntimeError(f"qcompile: the linear of {released.name!r} got an input of dtype {x.dtype}; its weight "
                           f"is {dtype} (as for F.linear, they must match)")
    options = released.options
    tensors = released.quantized(None if dtype == weight.dtype else dtype)
    out = options.scheme_def.emit(_TensorEmitter(), x.to(dtype), tensors, bias, options, dtype)
    if torch.is_grad_enabled() and weight.requires_grad:
        out = _NoWeightGradient.apply(out, released.name)
    return out


class _NoWeightGradient(torch.autograd.Function):
    """Identity; its backward refuses: the weight has no float values left to train."""

    @staticmethod
    def forward(ctx, out, name):
        ctx.name = name
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise float_weights_released(f"training through the eager call of {ctx.name!r}", [ctx.name])
