"""Attention in the aten graph, for the device lowerings: transformers' repeat_kv (keys/values copied per query
head) recognized, and on CUDA, grouped-query attention without that copy.

transformers repeats each key/value head `rep` times (unsqueeze(2) -> expand -> clone -> view) before its SDPA call
whenever it passes a mask (every decode step over a static cache): under torch.compile that is a copy of the whole
KV cache per layer and step — at batch 128 over a 288-slot cache, ~19 ms a step of copies on an 8B model. CPU
flash attention maps query heads to KV heads itself (lower_cpu drops the repeat). CUDA's fused kernels do not take
fewer KV heads with a mask, so `attend_grouped_kv_heads_cuda` folds each KV head's query heads into rows of one
head instead: q [B, Hq, Lq, D] -> [B, Hkv, rep * Lq, D] against the unrepeated cache, the mask broadcast the same
way, the output unfolded (qcompile::grouped_query_attention). Every query row is computed as before (softmax is
per row), in transformers' eager-attention numerics (q k^T in the inputs' dtype, float32 softmax: ops.py says why
not the fused kernel); only decode-sized calls (Lq <= FEW_QUERY_ROWS, not causal, no dropout, the logsumexp
unused) are rewritten, where the folded mask stays a view.
"""
from __future__ import annotations

import collections
import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops

aten = torch.ops.aten
COUNTS: collections.Counter = collections.Counter()
FEW_QUERY_ROWS = 16  # query rows per (batch, head) of a decode step (speculative ones included)


def _call(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def same(a, b) -> bool:
    return a is b or statically_known_true(a == b)  # never a guard: symbolic sizes compare by what is known


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def repeated_heads(node) -> tuple[Node, object] | None:
    """(kv, rep) when `node` is kv [b, h, L, d] repeated rep times per head as transformers' repeat_kv does it:
    full slices and unsqueeze(2), expand to [b, h, rep, L, d], clone, view [b, h*rep, L, d]; else None."""
    if not (_call(node, aten._unsafe_view.default) or _call(node, aten.view.default)):
        return None
    clone = node.args[0]
    expand = clone.args[0] if _call(clone, aten.clone.default) else clone
    if not _call(expand, aten.expand.default):
        return None
    src, unsqueezed = expand.args[0], False
    while True:  # walk back through shape-keeping slices and the one unsqueeze at dim 2
        if _call(src, aten.slice.Tensor) and same_shape(shape(src), shape(src.args[0])):
            src = src.args[0]
        elif _call(src, aten.unsqueeze.default) and src.args[1] == 2 and not unsqueezed:
            src, unsqueezed = src.args[0], True
        else:
            break
    kv, expanded, out = shape(src), shape(expand), shape(node)
    if not unsqueezed or kv is None or expanded is None or out is None or len(kv) != 4 or len(expanded) != 5:
        return None
    b, h, length, d = kv
    rep = expanded[2]
    matches = [(expanded[0], b), (expanded[1], h), (expanded[3], length), (expanded[4], d), (out[0], b),
               (out[1], h * rep), (out[2], length), (out[3], d)]
    return (src, rep) if all(same(x, y) for x, y in matches) else None



# CUDA's fused SDPA ops -> (position of the mask argument or None, positions of dropout_p and is_causal)
_FUSED_ATTENTION = {
    aten._scaled_dot_product_efficient_attention.default: (3, 5, 6),
    aten._scaled_dot_product_cudnn_attention.default: (3, 5, 6),
    aten._scaled_dot_product_flash_attention.default: (None, 3, 4),
}


def _argument(node: Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _grouped_attention_args(node: Node) -> tuple | str:
    """qcompile::grouped_query_attention's args for a fused SDPA node over repeated key/value heads, or the reason
    it stays."""
    mask_at, dropout_at, causal_at = _FUSED_ATTENTION[node.target]
    key, value = (repeated_heads(n) for n in node.args[1:3])
    if key is None or value is None:
        return "keys/values not repeated per head"
    q_shape = shape(node.args[0])
    if q_shape is None or len(q_shape) != 4 or not same(key[1], value[1]) \
            or not same(q_shape[1], shape(key[0])[1] * key[1]):
        return "query heads are not the repeated key/value heads"
    if _argument(node, dropout_at, "dropout_p", 0.0) != 0.0 or _argument(node, causal_at, "is_causal", False):
        return "dropout or is_causal"
    if not (isinstance(q_shape[2], int) and q_shape[2] <= FEW_QUERY_ROWS):
        return f"more than {FEW_QUERY_ROWS} query rows"
    if not all(_call(u, operator.getitem) and (u.args[1] == 0 or not u.users) for u in node.users):
        return "an output other than attention's is read"
    mask = _argument(node, mask_at, "attn_bias", None) if mask_at is not None else None
    if mask is not None:
        m = shape(mask)
        # the folded mask [B, Hkv, rep * Lq, Lk] must stay a view of it: one query row, or rows that share it
        if m is None or len(m) != 4 or not (q_shape[2] == 1 or m[2] == 1):
            return "a mask per query row"
    return node.args[0], key[0], value[0], mask, node.kwargs.get("scale")


def attend_grouped_kv_heads_cuda(gm: GraphModule, device: torch.device, options=None) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in _FUSED_ATTENTION):
            continue
        args = _grouped_attention_args(node)
        if isinstance(args, str):
            COUNTS[f"attention: kept ({args})"] += 1
            continue
        with gm.graph.inserting_before(node):
            grouped = gm.graph.create_node("call_function", ops.grouped_query_attention, args,
                                           name=f"{node.name}_grouped")
        query = args[0].meta["val"]
        grouped.meta["val"] = torch.empty_like(query, memory_format=torch.contiguous_format)
        grouped.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for user in list(node.users):  # the attention output's getitem, and unread ones of the other outputs
            if user.args[1] == 0:
                user.replace_all_uses_with(grouped)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        COUNTS["attention: query heads folded onto their key/value head (no repeated cache)"] += 1
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
