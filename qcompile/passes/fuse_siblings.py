"""Sibling (horizontal) linear fusion: which of the linears the pass quantizes become one linear.

Linears that read the same activation (q/k/v, gate/up) are rewritten by `quantize_linears` as ONE quantized
linear over their quantized weights concatenated along N, its output sliced back to each of them: one launch
instead of three at decode, and one activation quantization for dynamic schemes. Each member's weight is
quantized on its own and the tensors concatenated afterwards, so the result is bit-exact the separate linears.
This module only decides the groups (pure graph inspection); the pass emits them and the backend concatenates.

A group needs: the same activation (the same node, or views of one node with the same arguments: the aten trace
reshapes x once per linear), a weight format whose tensors concatenate along N (`Scheme.rows_independent`: no
per-tensor scale or codebook, which would differ between the members), the same weight and output dtype, a
weight no other linear of the graph reads (its quantized tensors would be stored twice), biases computed before
the first member, and outputs whose views stay valid on a column slice of the fused output. A linear that has
siblings but stays separate gets its reason in `LinearRecord.not_fused`, in COUNTS, and, with
QCOMPILE_DEBUG_FUSION=1, in the log.
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from ..options import QuantOptions
from .match_linear import LinearMatch
from .records import LinearRecord

aten = torch.ops.aten
log = logging.getLogger(__name__)
# "fused groups", "fused linears", and "not fused/<reason>" per linear left separate; tests assert on it
COUNTS: collections.Counter = collections.Counter()

# ops whose result is a function of their arguments only and cheap to repeat: two of them with equal arguments
# are the same activation (the aten trace gives every linear its own view of x)
_SAME_VALUE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
                   aten.unsqueeze.default, aten.expand.default, aten.sym_size.int}


@dataclass(eq=False)
class Sibling:
    """A linear the pass quantizes (it passed the scheme's checks), with what grouping needs."""
    match: LinearMatch
    weight_dtype: torch.dtype  # the dtype the weight is quantized from (after the graph's cast)
    out_features: int
    in_features: int
    record: LinearRecord  # `not_fused` is set on it when it has siblings but stays separate


def activation_key(node, memo: dict) -> object:
    """A key equal for two nodes that hold the same value: the node itself, or for a view-like op the op and
    the keys of its arguments."""
    if not isinstance(node, Node):
        if isinstance(node, (list, tuple)):
            return tuple(activation_key(a, memo) for a in node)
        return node
    if node not in memo:
        if node.op == "call_function" and node.target in _SAME_VALUE_OPS:
            memo[node] = (node.target, activation_key(list(node.args), memo),
                          tuple(sorted((k, activation_key(v, memo)) for k, v in node.kwargs.items())))
        else:
            memo[node] = node
    return memo[node]


def _returns_view(node: Node) -> bool:
    """Whether `node`'s output shares its input's storage, so its validity depends on the input's strides."""
    if node.op != "call_function":
        return False
    if node.target is aten._unsafe_view.default:  # a view whose schema does not say so
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def _slice_refusal(member: Node, column_slice, fake_mode) -> str | None:
    """Why the views downstream of `member`'s output would be invalid on `column_slice` (a fake tensor of the
    member's columns of the fused output: same shape, row stride N_total), else None. Replays each chain of view
    ops on it; a view that merges a row dimension with a column one fails exactly as it would at run time."""
    values = {member: column_slice}
    stack = [member]
    while stack:
        node = stack.pop()
        for user in node.users:
            if not _returns_view(user) or user in values:
                continue
            if any(isinstance(a, Node) and "val" not in a.meta and a not in values for a in user.all_input_nodes):
                return f"{user.name} has no shape metadata"
            try:
                with fake_mode:
                    values[user] = user.target(*map_arg(user.args, lambda a: values.get(a, a.meta.get("val"))),
                                               **map_arg(user.kwargs, lambda a: values.get(a, a.meta.get("val"))))
            except Exception as error:  # noqa: BLE001 - the view op's own refusal, reported as the reason
                return f"its output is reshaped by {user.name} in a way a column slice cannot be viewed " \
                       f"({type(error).__name__})"
            stack.append(user)
    return None


def _column_slice(member: Node, start: int, n_total: int, fake_mode):
    """A fake tensor laid out as columns [start, start + N) of the fused linear's contiguous output."""
    out = member.meta["val"]
    with fake_mode:
        fused = torch.empty((*out.shape[:-1], n_total), dtype=out.dtype, device=out.device)
        return fused[..., start:start + out.shape[-1]]


def _leave_separate(sibling: Sibling, reason: str, debug: bool) -> None:
    sibling.record.not_fused = reason
    COUNTS[f"not fused/{reason.split(':')[0]}"] += 1
    if debug:
        log.warning("qcompile fuse_siblings: %s stays a separate linear: %s", sibling.record.module, reason)


def _kind(s: Sibling) -> tuple:
    """What members of one fused linear must share: the quantized weight's dtype, the output's dtype and device."""
    out = s.match.node.meta.get("val")
    return s.weight_dtype, getattr(out, "dtype", None), getattr(out, "device", None)


def _bias_kind(s: Sibling) -> tuple:
    """(rank, dtype) of the bias: fused biases are concatenated, so each must be a vector of one dtype."""
    bias = s.match.bias.meta.get("val")
    return (bias.dim(), bias.dtype) if bias is not None else (None, None)


def sibling_groups(linears: list[Sibling], options: QuantOptions, fake_mode) -> list[list[Sibling]]:
    """Partition `linears` (in graph order) into the linears the pass emits: each a list of one or more
    members, in the order of their first member."""
    if not options.fuse_siblings:
        return [[s] for s in linears]
    debug = os.environ.get("QCOMPILE_DEBUG_FUSION") == "1"
    scheme = options.scheme_def
    graph_nodes = list(linears[0].match.node.graph.nodes) if linears else []
    position = {n: i for i, n in enumerate(graph_nodes)}
    weight_uses = collections.Counter(s.match.weight for s in linears)
    memo: dict = {}
    by_activation: dict[object, list[Sibling]] = {}
    for s in linears:
        by_activation.setdefault(activation_key(s.match.x, memo), []).append(s)

    groups: list[list[Sibling]] = []
    for readers in by_activation.values():
        if len(readers) == 1:
            groups.append(readers)
            continue
        if not scheme.rows_independent(options):
            granularity = f" granularity={options.granularity}" if options.granularity else ""
            for s in readers:
                _leave_separate(s, f"tensor-wide parameters: {scheme.name}{granularity} has a per-tensor scale or "
                                   f"codebook, which differs between the linears, so their tensors do not "
                                   f"concatenate", debug)
            groups.extend([s] for s in readers)
            continue
        # members must agree on what they quantize and produce; the first reader's kind forms the group
        first = readers[0]
        kind, bias_dtype = _kind(first), None
        checked = []
        for s in readers:
            reason = None
            if weight_uses[s.match.weight] > 1:
                reason = f"shared weight: {s.record.weight} is read by another linear too (fused, its " \
                         f"quantized tensors would be stored twice)"
            elif _kind(s) != kind:
                reason = f"dtype: weight {s.weight_dtype} / output {_kind(s)[1]} differs from {first.record.module}'s"
            elif s.match.bias is not None and position.get(s.match.bias, -1) > position[first.match.node]:
                reason = f"bias: {s.match.bias.name} is computed after {first.record.module}, where the fused " \
                         f"linear goes"
            elif s.match.bias is not None and _bias_kind(s) != (1, bias_dtype or _bias_kind(s)[1]):
                reason = f"bias: {s.match.bias.name} is not a 1-D vector of the other biases' dtype"
            checked.append((s, reason))
            if reason is None and s.match.bias is not None:
                bias_dtype = bias_dtype or _bias_kind(s)[1]
        members = [s for s, reason in checked if reason is None]
        for s, reason in checked:
            if reason is not None:
                _leave_separate(s, reason, debug)
        if len(members) > 1:
            members = _viewable(members, fake_mode, debug)
        if len(members) > 1:
            n_total = sum(s.out_features for s in members)
            reason = scheme.skip_reason(n_total, members[0].in_features, options)
            if reason is not None:
                for s in members:
                    _leave_separate(s, f"fused shape: {n_total}x{members[0].in_features}: {reason}", debug)
                members = []
        fused = members if len(members) > 1 else []
        if fused:
            COUNTS["fused groups"] += 1
            COUNTS["fused linears"] += len(fused)
            groups.append(fused)
        groups.extend([s] for s in readers if s not in fused)
    groups.sort(key=lambda g: position[g[0].match.node])
    return groups


def _viewable(members: list[Sibling], fake_mode, debug: bool) -> list[Sibling]:
    """The members whose outputs' views stay valid as column slices of the fused output; one refused member
    changes the others' slices (the total width), so the check repeats on the rest."""
    if fake_mode is None or any("val" not in s.match.node.meta for s in members):
        for s in members:
            _leave_separate(s, "no shape metadata: the graph has no fake values to check the output views", debug)
        return []
    while len(members) > 1:
        n_total, start, refused = sum(s.out_features for s in members), 0, None
        for s in members:
            reason = _slice_refusal(s.match.node, _column_slice(s.match.node, start, n_total, fake_mode),
                                    fake_mode)
            start += s.out_features
            if reason is not None:
                refused = s
                _leave_separate(s, f"output view: {reason}", debug)
                break
        if refused is None:
            return members
        members = [s for s in members if s is not refused]
    return members
