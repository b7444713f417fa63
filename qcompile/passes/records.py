"""What the linear pass takes and reports: the weights it reads, one record per linear, and the rewritten graph
with its new inputs (the quantized tensors). Plain data, shared by the pass, sibling fusion, the backend and the
debug tools."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule


@dataclass(frozen=True)
class WeightRef:
    name: str  # the parameter's path, e.g. "layers.0.q_proj.weight"
    tensor: torch.Tensor


@dataclass
class LinearRecord:
    module: str
    weight: str
    out_features: int
    in_features: int
    scheme: str | None  # None when skipped
    form: str
    reason: str | None = None  # why it stays in float
    output_node: str | None = None  # name of the node that now produces the linear's output
    fused_into: str | None = None  # the fused linear it is part of (sibling fusion), e.g. "attn.{q,k,v}"
    not_fused: str | None = None  # why it stays a linear of its own although another one reads the same input


@dataclass(frozen=True)
class WeightUse:
    """A weight as a linear reads it: what the pass asks `quantize` for."""
    weight: WeightRef
    cast_dtype: torch.dtype | None  # the dtype the graph casts it to before the matmul, if any
    weight_is_nk: bool


@dataclass(frozen=True)
class ConstantGroup:
    """The quantized tensors one linear reads — of one weight, or of fused siblings' weights concatenated
    along N (several uses, in column order) — as one run of consecutive entries of PassResult.constants."""
    uses: tuple[WeightUse, ...]
    count: int


@dataclass
class PassResult:
    gm: GraphModule
    constants: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    linears: list[LinearRecord] = field(default_factory=list)
    constant_groups: list[ConstantGroup] = field(default_factory=list)  # which weight each constant came from

    @property
    def quantized(self) -> list[LinearRecord]:
        return [r for r in self.linears if r.scheme is not None]

    @property
    def skipped(self) -> list[LinearRecord]:
        return [r for r in self.linears if r.scheme is None]

    @property
    def fused(self) -> dict[str, list[str]]:
        """Sibling linears fused into one: {fused linear: its members' modules, in column order}."""
        groups: dict[str, list[str]] = {}
        for r in self.linears:
            if r.fused_into is not None:
                groups.setdefault(r.fused_into, []).append(r.module)
        return groups
