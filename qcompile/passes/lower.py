"""Device lowering: replace patterns of `qcompile::` reference nodes with fused kernels for the device.

CPU: nothing yet — the reference ops decompose into aten and Inductor's C++ codegen compiles them.
CUDA: the Triton template family (kernels/triton) registers its patterns here.
"""
from __future__ import annotations

import torch


def lower_for_device(gm: torch.fx.GraphModule, device: torch.device) -> None:
    return None
