"""The linear pass: rewrite every matched linear into the chosen scheme's explicit `qcompile::` nodes.

Input: an aten-level GraphModule whose weights are placeholders, and a `WeightRef` for each such placeholder
(its name and real tensor). Output: the same graph where each quantized linear reads new placeholders —
the quantized weight, scales, zero points — appended after the existing ones, in the order of
`PassResult.constants`; the caller feeds those tensors. The pass asks `quantize(ref, cast_dtype)` for the
quantized tensors (the backend caches them, so a tied or recompiled weight is quantized once) and the
scheme to emit nodes; it does no math of its own.
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .._compat import dynamo_path
from ..options import QuantOptions
from .match_linear import LinearMatch, match_linear

aten = torch.ops.aten


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


@dataclass(frozen=True)
class ConstantGroup:
    """The quantized tensors of one weight, as one run of consecutive entries of PassResult.constants."""
    weight: WeightRef
    cast_dtype: torch.dtype | None  # what `quantize` was asked for
    weight_is_nk: bool
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


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_") or "linear"
    return name if not name[0].isdigit() else f"_{name}"


def _module_of(match: LinearMatch, ref: WeightRef) -> str:
    """The owning module's path: the innermost module on the node's nn_module_stack (right for tied weights,
    e.g. lm_head reading embed_tokens.weight), else the weight's own path minus its attribute name."""
    stack = match.node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return dynamo_path(path)
    return ref.name.rsplit(".", 1)[0] if "." in ref.name else ref.name


class _Emitter:
    """Inserts nodes before the matched linear, named after the module, with fake values for shapes."""

    def __init__(self, graph, anchor: Node, prefix: str, fake_mode, meta: dict):
        self.graph, self.anchor, self.prefix, self.fake_mode, self.meta = graph, anchor, prefix, fake_mode, meta

    def _new(self, target, args, name) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node("call_function", target, args, name=f"{self.prefix}_{name}")
        node.meta["qcompile"] = dict(self.meta)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*map_arg(args, lambda n: n.meta.get("val")))
        return node

    def call(self, op, *args):
        node = self._new(op, args, op._schema.name.split("::")[-1])
        if len(op._schema.returns) == 1:
            return node
        outs = []
        return tuple(self._new(operator.getitem, (node, i), ret.name or f"out{i}")
                     for i, ret in enumerate(op._schema.returns))

    def linear(self, x, weight, bias):
        return self._new(aten.linear.default, (x, weight, bias), "linear")


def quantize_linears(gm: GraphModule, weights: dict[Node, WeightRef], options: QuantOptions,
                     quantize: Callable[[WeightRef, torch.dtype | None, bool], dict[str, torch.Tensor]]
                     ) -> PassResult:
    graph = gm.graph
    scheme = options.scheme_def
    fake_mode = torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    result = PassResult(gm)
    weight_inputs: dict[tuple[Node, torch.dtype | None, bool], dict[str, Node]] = {}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholders_for(match: LinearMatch, ref: WeightRef) -> dict[str, Node]:
        nonlocal last_placeholder
        key = (match.weight, match.cast_dtype, match.weight_is_nk)
        if key not in weight_inputs:  # tied weights: one set of constants for every use
            nodes = {}
            tensors = quantize(ref, match.cast_dtype, match.weight_is_nk)
            result.constant_groups.append(ConstantGroup(ref, match.cast_dtype, match.weight_is_nk, len(tensors)))
            for name, tensor in tensors.items():
                with graph.inserting_after(last_placeholder):
                    ph = graph.placeholder(f"{_identifier(ref.name)}__{name}")
                ph.meta["qcompile"] = {"weight": ref.name, "role": name}
                if fake_mode is not None:
                    ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
                result.constants.append((ph.name, tensor))
                nodes[name] = last_placeholder = ph
            weight_inputs[key] = nodes
        return weight_inputs[key]

    for node in list(graph.nodes):
        match = match_linear(node, lambda n: n in weights)
        if match is None:
            continue
        ref = weights[match.weight]
        shape = tuple(ref.tensor.shape)
        N, K = shape if match.weight_is_nk else shape[::-1]
        module = _module_of(match, ref)
        record = LinearRecord(module=module, weight=ref.name, out_features=N, in_features=K, scheme=None,
                              form=match.form)
        result.linears.append(record)
        if not options.selects(module):
            record.reason = "excluded by the include/exclude options"
            continue
        reason = scheme.skip_reason(N, K, options)
        if reason is None and not ref.tensor.dtype.is_floating_point:
            reason = f"weight dtype {ref.tensor.dtype} is not floating point"
        if reason is not None:
            record.reason = reason
            warnings.warn(f"qcompile: linear {module!r} ({N}x{K}) stays in float for scheme "
                          f"{scheme.name!r}: {reason}", stacklevel=2)
            continue
        w_nodes = placeholders_for(match, ref)
        out_dtype = node.meta["val"].dtype if "val" in node.meta else (match.cast_dtype or ref.tensor.dtype)
        emitter = _Emitter(graph, node, _identifier(module), fake_mode,
                           {"module": module, "scheme": scheme.name, "weight": ref.name})
        out = scheme.emit(emitter, match.x, w_nodes, match.bias, options, out_dtype)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        record.scheme, record.output_node = scheme.name, out.name

    graph.eliminate_dead_code()
    gm.recompile()
    return result
