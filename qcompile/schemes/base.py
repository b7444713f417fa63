"""What a scheme is: how it quantizes a weight (numerics) and which `qcompile::` nodes it emits for a linear.

A scheme is data plus two small functions. The linear pass calls `skip_reason`, `quantize_weight` and
`emit` and knows nothing else about it; adding a scheme means one new file in this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch.fx import Node


class SchemeOptions(Protocol):
    """What a scheme reads of the validated options (`options.QuantOptions`, which validates through this
    package's registry: the schemes never import it back)."""
    group_size: int | None
    bits: int | None
    granularity: str | None
    algorithm: str
    act_order: bool


class Emitter(Protocol):
    """Builds nodes in front of the linear being rewritten (implemented by the pass)."""

    def call(self, op, *args) -> "Node | tuple[Node, ...]": ...

    def linear(self, x: "Node", weight: "Node", bias: "Node | None") -> "Node": ...


QuantizedWeight = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    aliases: tuple[str, ...]
    # quantize_weight(weight [N, K], options[, hessian [K, K]]) -> named tensors (each becomes a graph constant);
    # the Hessian of the layer's inputs is passed only for algorithm "gptq"
    quantize_weight: Callable[[torch.Tensor, SchemeOptions], QuantizedWeight]
    # emit(emitter, x, weight nodes by name, bias node or None, options, output dtype) -> output node
    emit: Callable[..., "Node"]
    activation: str | None = None  # None = weight-only; else how activations are quantized per call
    # whether the option activation_quantization='graph' applies: a per-token int8 / e4m3 activation, which the
    # CUDA kernels can take already quantized (its quantize op then stays in the graph for Inductor to fuse)
    activation_in_graph: bool = False
    group_sizes: tuple[int, ...] = ()  # allowed group sizes; () = not group-wise
    default_group_size: int | None = None
    bits: tuple[int, ...] = ()  # allowed bit widths for the `bits` option; () = fixed
    default_bits: int | None = None
    granularities: tuple[str, ...] = ()  # allowed `granularity` values; () = fixed
    # K must be a multiple of this (block formats); group-wise schemes use the group size instead
    k_multiple: int = 1
    algorithms: tuple[str, ...] = ("rtn",)  # rounding algorithms its quantize_weight implements
    extra_skip: Callable[[int, int, SchemeOptions], str | None] | None = field(default=None)
    # whether quantize_weight treats each output row on its own (no per-tensor scale or codebook), so that the
    # backend may quantize a large weight in blocks of rows and bound its float32 temporaries, and sibling linears'
    # tensors concatenate along N into one fused linear (passes/fuse_siblings.py)
    rows_independent: Callable[[SchemeOptions], bool] = field(default=lambda options: False)

    def skip_reason(self, out_features: int, in_features: int, options: SchemeOptions) -> str | None:
        """Why a [N, K] weight cannot take this scheme (the layer then stays in float), or None."""
        K = in_features
        if self.group_sizes:
            g = options.group_size
            if K % g:
                fits = [s for s in self.group_sizes if K % s == 0]
                hint = f"group_size {'/'.join(map(str, fits))} would fit" if fits else "no group size fits"
                return f"in_features={K} is not divisible by group_size={g} ({hint})"
        if K % self.k_multiple:
            return f"in_features={K} is not a multiple of {self.k_multiple}, the {self.name} block size"
        if self.extra_skip is not None:
            return self.extra_skip(out_features, in_features, options)
        return None


def always(options) -> bool:
    return True


def per_row_granularity(options) -> bool:
    return (options.granularity or "row") == "row"
