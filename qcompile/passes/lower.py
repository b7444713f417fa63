"""Device lowering: replace patterns of `qcompile::` reference nodes with fused kernels for the device.

Each device's lowering lives in its own module and registers itself here; a pattern no lowering claims keeps
the reference ops, which decompose into aten and compile everywhere (slow, but correct).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..options import QuantOptions

# device type ("cuda", "cpu") -> lowerings applied in order; each rewrites the graph in place (options: the
# compile's, for lowering choices they make; None where a caller has none)
LOWERINGS: dict[str, list[Callable[[torch.fx.GraphModule, torch.device, QuantOptions | None], None]]] = {}


def register_lowering(device_type: str):
    def register(fn):
        LOWERINGS.setdefault(device_type, []).append(fn)
        return fn
    return register


def lower_for_device(gm: torch.fx.GraphModule, device: torch.device, options: QuantOptions | None = None) -> None:
    for lowering in LOWERINGS.get(device.type, []):
        lowering(gm, device, options)
    gm.graph.lint()
    gm.recompile()


# Device lowerings register themselves on import. lower_cuda needs only torch until it runs (it imports
# Triton then, and keeps the reference path where Triton is missing), so CPU-only installs import it too.
from . import lower_cuda  # noqa: E402,F401
from . import lower_cpu  # noqa: E402,F401
