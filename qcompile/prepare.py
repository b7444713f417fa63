"""Quantize a model's linear weights ahead of compiling, one layer at a time, onto the target device.

    model = build_model_on_cpu_or_meta_then_load()            # float weights in host memory
    qcompile.prepare(model, {"scheme": "int4_weight_only"}, device="cuda")
    cm = torch.compile(model, backend="qcompile", options={"scheme": "int4_weight_only"})

Each nn.Linear weight is moved to `device`, quantized there (into the same cache the backend reads), and its
float storage released at once; every other parameter and buffer is moved as usual. The device never holds
more than one float linear weight, so a model whose float weights do not fit can still be quantized onto it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import released
from .backend import _RELEASED, quantized_weight, release_float_weight, released_weight, shared_parameters
from .options import QuantOptions
from .passes.records import WeightRef
from .progress import Progress


def prepare(model: nn.Module, options, device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """Quantize every selected nn.Linear weight of `model` onto `device` (default: where it is) and move the
    rest of the model there. Returns the model. Weights shared with other modules (tied embeddings) and layers
    the scheme cannot take are moved in float; torch.compile with the same options then reuses the quantized
    tensors. After this the float linear weights are gone: the linears run on their quantized weights, compiled
    or eagerly (qcompile/released.py)."""
    opts = QuantOptions.from_dict(options)
    shared = {id(p) for p in shared_parameters(model)}
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and opts.selects(name) and id(m.weight) not in shared
               and m.weight.dtype.is_floating_point
               and opts.scheme_def.skip_reason(m.out_features, m.in_features, opts) is None]
    bar = Progress(len(linears)) if progress and linears else None
    with torch.no_grad():
        for name, module in linears:
            name = name or type(module).__name__  # the model itself is a Linear
            if module.weight in _RELEASED:  # prepared before: its quantized tensors are cached (else this raises)
                quantized_weight(WeightRef(f"{name}.weight", module.weight), opts, None, True)
                continue
            weight = nn.Parameter(module.weight.detach().to(device), requires_grad=module.weight.requires_grad)
            module.weight = weight  # the host copy is freed once nothing else holds it
            quantized_weight(WeightRef(f"{name}.weight", weight), opts, None, True)
            if release_float_weight(weight, f"{name}.weight", opts):
                released.attach(module, released_weight)  # it still runs eagerly, on the quantized weight
            if bar is not None:
                bar.advance(f"qcompile: quantized {name}")
        model.to(device)
    if bar is not None:
        bar.close()
    return model

