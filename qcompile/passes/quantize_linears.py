"""The linear pass: rewrite every matched linear into the chosen scheme's explicit `qcompile::` nodes.

Input: an aten-level GraphModule whose weights are placeholders, and a `WeightRef` for each such placeholder
(its name and real tensor). Output: the same graph where each quantized linear reads new placeholders —
the quantized weight, scales, zero points — appended after the existing ones, in the order of
`PassResult.constants`; the caller feeds those tensors. The pass asks `quantize(uses)` for the quantized
tensors (the backend caches them, so a tied or recompiled weight is quantized once) and the scheme to emit
nodes; it does no math of its own. Sibling linears (`fuse_siblings`: same input, e.g. q/k/v) become one
linear: `quantize` gets all their weights and returns their tensors concatenated along N, and the output is
sliced back to each.
"""
from __future__ import annotations

import operator
import re
import warnings
from typing import Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .._compat import dynamo_path
from ..options import QuantOptions
from .fuse_siblings import Sibling, sibling_groups
from .match_linear import LinearMatch, match_linear
from .records import ConstantGroup, LinearRecord, PassResult, WeightRef, WeightUse

aten = torch.ops.aten


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_") or "linear"
    return name if not name[0].isdigit() else f"_{name}"


def fused_name(paths: list[str]) -> str:
    """One name for sibling paths: their common prefix and suffix around the parts that differ, in braces
    ("layers.0.attn.q.weight", "layers.0.attn.k.weight" -> "layers.0.attn.{q,k}.weight")."""
    split = [p.split(".") for p in paths]
    shortest = min(len(p) for p in split)
    head = 0
    while head < shortest - 1 and len({p[head] for p in split}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head - 1 and len({p[-1 - tail] for p in split}) == 1:
        tail += 1
    middles = [".".join(p[head:len(p) - tail]) for p in split]
    return ".".join([*split[0][:head], "{" + ",".join(middles) + "}", *split[0][len(split[0]) - tail:]])


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
        return tuple(self._new(operator.getitem, (node, i), ret.name or f"out{i}")
                     for i, ret in enumerate(op._schema.returns))

    def linear(self, x, weight, bias):
        return self._new(aten.linear.default, (x, weight, bias), "linear")


def quantize_linears(gm: GraphModule, weights: dict[Node, WeightRef], options: QuantOptions,
                     quantize: Callable[[tuple[WeightUse, ...]], dict[str, torch.Tensor]]) -> PassResult:
    graph = gm.graph
    scheme = options.scheme_def
    fake_mode = torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    result = PassResult(gm)
    weight_inputs: dict[tuple, dict[str, Node]] = {}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholders_for(group: list[Sibling], name: str) -> dict[str, Node]:
        nonlocal last_placeholder
        key = tuple((s.match.weight, s.match.cast_dtype, s.match.weight_is_nk) for s in group)
        if key not in weight_inputs:  # tied weights: one set of constants for every use
            nodes = {}
            uses = tuple(WeightUse(weights[s.match.weight], s.match.cast_dtype, s.match.weight_is_nk) for s in group)
            tensors = quantize(uses)
            result.constant_groups.append(ConstantGroup(uses, len(tensors)))
            for role, tensor in tensors.items():
                with graph.inserting_after(last_placeholder):
                    ph = graph.placeholder(f"{_identifier(name)}__{role}")
                ph.meta["qcompile"] = {"weight": name, "role": role}
                if len(group) > 1:  # which rows are whose: {member weight: rows}
                    ph.meta["qcompile"]["members"] = {s.record.weight: s.out_features for s in group}
                if fake_mode is not None:
                    ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
                result.constants.append((ph.name, tensor))
                nodes[role] = last_placeholder = ph
            weight_inputs[key] = nodes
        return weight_inputs[key]

    quantizable = []
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
        quantizable.append(Sibling(match, match.cast_dtype or ref.tensor.dtype, N, K, record))

    replaced: dict[Node, Node] = {}  # a rewritten linear's node -> what now produces its output

    def current(n):  # a match's x or bias may be an earlier linear's output, rewritten since
        return replaced.get(n, n)

    for group in sibling_groups(quantizable, options, fake_mode):
        first = group[0]
        node = first.match.node
        module = first.record.module if len(group) == 1 else fused_name([s.record.module for s in group])
        weight = first.record.weight if len(group) == 1 else fused_name([s.record.weight for s in group])
        w_nodes = placeholders_for(group, weight)
        out_dtype = node.meta["val"].dtype if "val" in node.meta else first.weight_dtype
        meta = {"module": module, "scheme": scheme.name, "weight": weight}
        emitter = _Emitter(graph, node, _identifier(module), fake_mode, meta)
        bias = current(first.match.bias) if len(group) == 1 else _fused_bias(emitter, group, current)
        out = scheme.emit(emitter, current(first.match.x), w_nodes, bias, options, out_dtype)
        parts, start = [out], 0
        if len(group) > 1:  # each member's columns of the fused output
            parts = []
            for s in group:
                member = _Emitter(graph, node, _identifier(s.record.module), fake_mode,
                                  {"module": s.record.module, "scheme": scheme.name, "weight": s.record.weight,
                                   "fused_into": module})
                parts.append(member.call(aten.slice.Tensor, out, -1, start, start + s.out_features))
                start += s.out_features
                s.record.fused_into = module
        for s, part in zip(group, parts):
            s.match.node.replace_all_uses_with(part)
            graph.erase_node(s.match.node)
            replaced[s.match.node] = part
            s.record.scheme, s.record.output_node = scheme.name, part.name

    graph.eliminate_dead_code()
    gm.recompile()
    return result


def _fused_bias(emitter: _Emitter, group: list[Sibling], current) -> Node | None:
    """The members' biases concatenated (zeros for a member without one), or None when none has one."""
    biases = [current(s.match.bias) for s in group]
    like = next((b for b in biases if b is not None), None)
    if like is None:
        return None
    parts = [b if b is not None else emitter.call(aten.new_zeros.default, like, [s.out_features])
             for b, s in zip(biases, group)]
    return emitter.call(aten.cat.default, parts)
