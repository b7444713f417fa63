"""Find the linears in an aten-level graph: every form `aten.linear` takes after tracing.

    mm(x2d, t(W))                         addmm(b, x2d, t(W))          linear(x, W, b)
    bmm(x3d, view(expand(t(W), [B,K,N])))  mm(x2d, P) with P = W^T stored as [K, N] (GPT-2's Conv1D)

The weight side must trace back, through views, transposes, broadcasts and dtype casts only, to a weight
(a parameter or buffer placeholder the caller names); an activation x activation matmul (attention scores)
never matches. Matching is pure graph inspection: no tensors are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.expand.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.contiguous.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


@dataclass
class LinearMatch:
    node: Node  # the matmul node the pass replaces
    form: str  # "mm", "addmm", "bmm" or "linear"
    x: Node  # activation [..., K]
    weight: Node  # placeholder (or get_attr) holding the weight tensor
    weight_is_nk: bool  # True: stored [N, K] as nn.Linear; False: stored [K, N] (Conv1D)
    cast_dtype: torch.dtype | None  # dtype the graph casts the weight to before the matmul, if any
    bias: Node | None


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _swaps_last_two(n: Node) -> bool:
    rank = len(_val(n).shape) if _val(n) is not None else 2
    if n.target is aten.t.default:
        return True
    if n.target is aten.transpose.int:
        dims = {d % rank for d in n.args[1:3]}
        return dims == {rank - 2, rank - 1}
    perm = [d % rank for d in n.args[1]]
    return perm == list(range(rank - 2)) + [rank - 1, rank - 2]


def trace_weight(operand: Node, is_weight) -> tuple[Node, int, torch.dtype | None] | None:
    """Walk from a matmul operand to a weight. Returns (weight node, number of transposes, cast dtype),
    or None when the operand is computed from anything else."""
    flips, cast, n = 0, None, operand
    while isinstance(n, Node):
        if is_weight(n):
            return n, flips, cast
        if n.op != "call_function":
            return None
        if n.target in _TRANSPOSES:
            if not _swaps_last_two(n):
                return None
            flips += 1
        elif n.target in _CASTS:
            if n.target is aten._to_copy.default and set(n.kwargs) - {"dtype", "layout", "device"}:
                return None
            if cast is None and _val(n) is not None:  # the cast nearest the matmul decides
                cast = _val(n).dtype
        elif n.target not in _VIEWS:
            return None
        n = n.args[0]
    return None


def _operand_fits(operand: Node, weight: Node, weight_is_nk: bool, form: str) -> bool:
    """The operand is the 2-D weight (transposed as counted) with at most leading batch dims added."""
    ov, wv = _val(operand), _val(weight)
    if ov is None or wv is None:
        return True  # hand-built graphs without metadata: the op chain alone decides
    if wv.dim() != 2:
        return False
    n_k = tuple(wv.shape) if weight_is_nk else tuple(wv.shape)[::-1]
    expected = n_k if form == "linear" else n_k[::-1]
    return tuple(ov.shape[-2:]) == expected


def match_linear(node: Node, is_weight) -> LinearMatch | None:
    """A LinearMatch when `node` is a matmul of an activation by a weight, else None."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.mm.default or t is aten.bmm.default:
        x, w_operand, bias, form = node.args[0], node.args[1], None, "mm" if t is aten.mm.default else "bmm"
    elif t is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, w_operand, form = node.args[0], node.args[1], node.args[2], "addmm"
    elif t is aten.linear.default:
        x, w_operand = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        form = "linear"
    else:
        return None
    found = trace_weight(w_operand, is_weight)
    if found is None or trace_weight(x, is_weight) is not None:
        return None
    weight, flips, cast = found
    # mm's right operand is [K, N]: an [N, K] weight is an odd number of transposes away; linear's is [N, K]
    weight_is_nk = flips % 2 == (0 if form == "linear" else 1)
    if not _operand_fits(w_operand, weight, weight_is_nk, form):
        return None
    if bias is not None and _val(bias) is not None and _val(bias).numel() != _val(node).shape[-1]:
        return None  # addmm with a full [M, N] input is not a bias add
    return LinearMatch(node=node, form=form, x=x, weight=weight, weight_is_nk=weight_is_nk, cast_dtype=cast,
                       bias=bias)
