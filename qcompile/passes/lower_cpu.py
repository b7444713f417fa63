"""CPU lowering: each intx linear's reference nodes become one fused CPU op, which Inductor generates as C++.

Patterns (as the schemes emit them; `Q` is the activation-quantize node, `Q[i]` its getitem outputs):
  int8_dynamic_intx : scale_output(matmul_intx(Q[0], Q[2], packed, scale, None, bits, g), Q[1], None, bias, dtype),
                      Q = quantize_int8_per_token_asym(x)     ->  intx_linear_dynamic_int8_cpu(x, packed, scale, ...)
  intx_weight_only  : linear(x, dequantize_intx(packed, scale, None, bits, g, dtype), bias)
                                                              ->  intx_linear_float_cpu(x, packed, scale, ...)
Weights with zero points (int8_dynamic_int4) keep their reference nodes. COUNTS records what was lowered and why
the rest was not (QCOMPILE_DEBUG_LOWERING=1 logs each reason).

4- and 8-bit packed weights that only lowered ops read are asked for with their rows interleaved in blocks of 4
(kernels/cpu/layout.py: the GEMV then reads one stream; SmolLM2 decode 1.09-1.26x): the ops get row_block=4 and the
placeholder's meta["qcompile"][LAYOUT_KEY] says so; the backend and export feed the tensor laid out so
(`constant_layouts`).

Grouped-query attention: keys/values repeated per query head (transformers' repeat_kv under torch.compile:
unsqueeze(2) -> expand -> clone -> view) feed CPU flash attention their own heads instead, which it maps to query
heads itself (head h reads kv head h // rep, as repeat_kv lays them out): the same numbers without a copy of the
whole KV cache per layer and step.

Decode attention: CPU flash attention with at most FEW_QUERY_ROWS query rows (a decode step, also in its grouped
form) becomes decode_attention_cpu, a generated C++ kernel (~7 us where ATen's op costs ~30 us a call, most of it
setup and dispatch); float32 only, its logsumexp output unused, where Inductor builds with AVX-512 (elsewhere
the kernel would be scalar). A prefill's (more query rows, not causal: transformers' static cache passes its causal
mask as an additive mask) becomes the same op too: its kernel computes only the keys each block of query rows
leaves unmasked, where ATen's computes every masked one (SmolLM2's 512-token prefill: 2.2-2.4x ATen's op).
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import operator
import os
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from .. import ops
from ..kernels.cpu import layout as cpu_layout
from ..kernels.cpu import ops as cpu_ops
from .attention import FEW_QUERY_ROWS, repeated_heads, same as _same, same_shape as _same_shape, shape as _shape

aten = torch.ops.aten
log = logging.getLogger(__name__)
COUNTS: collections.Counter = collections.Counter()
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOWERED_LINEARS = (cpu_ops.intx_linear_dynamic_int8_cpu, cpu_ops.intx_linear_float_cpu)
# a quantized-tensor placeholder's meta["qcompile"] key: the row block its tensor is to be fed in (layout.py)
LAYOUT_KEY = "cpu_row_block"


def _call(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _output_of(node, index: int, target) -> Node | None:
    """The `target` node whose `index`-th output `node` is (through getitem), else None."""
    if _call(node, operator.getitem) and node.args[1] == index and _call(node.args[0], target):
        return node.args[0]
    return None


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _match_dynamic(node: Node) -> tuple | str | None:
    """scale_output <- matmul_intx <- quantize_int8_per_token_asym: the fused op's args, a reason, or None."""
    if not _call(node, ops.scale_output):
        return None
    acc, x_scale, w_scale, bias, dtype = node.args
    if not _call(acc, ops.matmul_intx):
        return None
    xq, x_zero, packed, scale, w_zero, bits, group_size = acc.args
    quant = _output_of(xq, 0, ops.quantize_int8_per_token_asym)
    if quant is None or _output_of(x_scale, 1, ops.quantize_int8_per_token_asym) is not quant \
            or _output_of(x_zero, 2, ops.quantize_int8_per_token_asym) is not quant:
        return "activations are not quantize_int8_per_token_asym's outputs"
    if w_zero is not None or w_scale is not None:
        return "weights carry zero points or an output-channel scale (the kernel takes symmetric intx only)"
    return cpu_ops.intx_linear_dynamic_int8_cpu, (quant.args[0], packed, scale, bias, bits, group_size, dtype)


def _match_weight_only(node: Node) -> tuple | str | None:
    """linear(x, dequantize_intx(...), bias): the fused op's args, a reason, or None."""
    if not _call(node, aten.linear.default) or not _call(node.args[1], ops.dequantize_intx):
        return None
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    packed, scale, w_zero, bits, group_size, _ = weight.args
    if w_zero is not None:
        return "weights carry zero points (the kernel takes symmetric intx only)"
    return cpu_ops.intx_linear_float_cpu, (x, packed, scale, bias, bits, group_size, _dtype(node) or _dtype(x))


def _unsupported(args) -> str | None:
    x, packed, scale, bias, bits, group_size, dtype = args
    if group_size % 32:
        return f"group_size={group_size} is not a multiple of 32"
    if _dtype(x) not in _FLOAT_DTYPES or dtype not in _FLOAT_DTYPES:
        return f"activation dtype {_dtype(x)} / output dtype {dtype} is not float32, bfloat16 or float16"
    return None


# intx_linear.h runs a call with fewer tokens than QC_GEMM_MIN_M (4) as a GEMV
GEMV_MAX_TOKENS = 3
# the largest tensor a decode graph computes outside its linears (SmolLM2-135M: 49152 logits; past ~64K elements
# a second thread starts to pay for its wake-up)
DECODE_MAX_ELEMENTS = 1 << 16


def _computed_elements(node) -> int | None:
    """Elements of the new tensor `node` computes (0 for views, in-place ops and non-aten nodes); None if symbolic."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    schema = node.target._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
        return 0
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    total = 0
    for v in vals:
        if isinstance(v, torch.Tensor):
            if not isinstance(v.numel(), int):
                return None
            total += v.numel()
    return total


def is_decode_graph(gm: GraphModule) -> bool:
    """Whether every lowered CPU linear in `gm` (at least one) is a GEMV (a fixed token count below the GEMM's) and
    nothing else computes more than DECODE_MAX_ELEMENTS: a graph of small kernels (a decode step), which a thread
    team slows down (backend.py)."""
    lowered = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LOWERED_LINEARS]

    def tokens(node) -> int | None:
        val = node.args[0].meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        count = 1
        for size in val.shape[:-1]:
            if not isinstance(size, int):
                return None  # symbolic: prefill shapes share this graph
            count *= size
        return count

    counts = [tokens(n) for n in lowered]
    if not counts or not all(c is not None and c <= GEMV_MAX_TOKENS for c in counts):
        return False
    others = [_computed_elements(n) for n in gm.graph.nodes if n.target not in _LOWERED_LINEARS]
    return all(e is not None and e <= DECODE_MAX_ELEMENTS for e in others)


def lower_intx_linears_cpu(gm: GraphModule, device: torch.device, options=None) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        for name, matcher in (("int8_dynamic_intx", _match_dynamic), ("intx_weight_only", _match_weight_only)):
            found = matcher(node)
            if found is None:
                continue
            reason = found if isinstance(found, str) else _unsupported(found[1])
            if reason is not None:
                COUNTS[f"{name}: kept reference ({reason})"] += 1
                if os.environ.get("QCOMPILE_DEBUG_LOWERING"):
                    log.warning("qcompile cpu lowering: %s stays on the reference ops: %s", node.name, reason)
                break
            op, args = found
            # named after the module as the pass names its nodes: "up_scale_output" -> "up_intx_linear_..._cpu"
            module = node.name.removesuffix("_scale_output").removesuffix("_linear")
            with gm.graph.inserting_before(node):
                fused = gm.graph.create_node("call_function", op, args,
                                             name=f"{module}_{op._schema.name.split('::')[-1]}")
            fused.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            fused.meta["qcompile"] = dict(node.meta.get("qcompile", {}), lowered=f"cpu:{name}")
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            COUNTS[f"{name}: lowered"] += 1
            changed = True
            break
    if changed:
        gm.graph.eliminate_dead_code()
        _interleave_packed_rows(gm)


def _interleave_packed_rows(gm: GraphModule) -> None:
    """Lowered linears read 4- and 8-bit packed weights with their rows interleaved (layout.py), where they are the
    placeholder's only readers (a reference op reading it too would need it row-major)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("qcompile")
        users = list(node.users)
        if meta is None or not users or any(u.op != "call_function" or u.target not in _LOWERED_LINEARS
                                            or u.args[1] is not node for u in users):
            continue
        rows = {cpu_layout.row_block(u.args[4], float_activation=u.target is cpu_ops.intx_linear_float_cpu)
                for u in users}
        if len(rows) != 1 or rows == {1}:
            continue
        meta[LAYOUT_KEY] = row_block = rows.pop()
        for user in users:
            user.args = (*user.args[:7], row_block)
        COUNTS[f"packed weights: rows interleaved in blocks of {row_block}"] += 1


def constant_layouts(gm: GraphModule) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For each quantized-tensor placeholder the lowering asked for in another layout: the function laying a tensor
    out so (what its caller must apply to the tensor it feeds)."""
    return {node.name: functools.partial(cpu_layout.laid_out, rows=node.meta["qcompile"][LAYOUT_KEY])
            for node in gm.graph.find_nodes(op="placeholder") if LAYOUT_KEY in node.meta.get("qcompile", {})}


def attend_grouped_kv_heads_cpu(gm: GraphModule, device: torch.device, options=None) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        if not _call(node, aten._scaled_dot_product_flash_attention_for_cpu.default):
            continue
        key, value = (repeated_heads(n) for n in node.args[1:3])
        query = _shape(node.args[0])
        if key is None or value is None or query is None or not _same(key[1], value[1]) \
                or not _same(query[1], _shape(key[0])[1] * key[1]):
            continue
        node.args = (node.args[0], key[0], value[0], *node.args[3:])
        COUNTS["attention: repeated key/value heads dropped (grouped-query flash attention)"] += 1
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()




def _decode_attention_args(node: Node) -> tuple | None:
    """decode_attention_cpu's args for a CPU flash attention node it can replace, else None."""
    q, k, v = node.args[:3]
    # dropout_p and is_causal as the call passed them, positionally or by name (defaults 0.0, False)
    dropout = node.args[3] if len(node.args) > 3 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[4] if len(node.args) > 4 else node.kwargs.get("is_causal", False)
    mask, scale = node.kwargs.get("attn_mask"), node.kwargs.get("scale")
    shapes = [_shape(t) for t in (q, k, v)]
    if dropout != 0.0 or causal or any(s is None or len(s) != 4 for s in shapes):
        return None
    if any(_dtype(t) != torch.float32 for t in (q, k, v) + ((mask,) if mask is not None else ())):
        return None
    (b, hq, lq, d), (kb, hkv, lk, kd), vshape = shapes
    if not (isinstance(hq, int) and isinstance(hkv, int)
            and hq % hkv == 0 and _same_shape((kb, hkv, lk, kd), vshape) and _same(kb, b) and _same(kd, d)):
        return None
    if mask is not None:
        m = _shape(mask)
        if m is None or len(m) != 4 or not (m[0] == 1 or _same(m[0], b)) or not (m[1] == 1 or _same(m[1], hq)) \
                or not (_same(m[2], lq) and _same(m[3], lk)):
            return None
    users = list(node.users)
    if not all(_call(u, operator.getitem) and u.args[1] == 0 for u in users):
        return None  # the logsumexp is read
    return q, k, v, mask, float(scale) if scale is not None else 1.0 / math.sqrt(d)


def attend_few_rows_cpu(gm: GraphModule, device: torch.device, options=None) -> None:
    from ..kernels.cpu.inductor_template import has_vector_decode_attention

    attention = [n for n in gm.graph.nodes if _call(n, aten._scaled_dot_product_flash_attention_for_cpu.default)]
    if not attention:
        return
    if not has_vector_decode_attention():
        COUNTS["attention: kept CPU flash attention (the decode kernel is vectorized for AVX-512 only)"] += 1
        return
    changed = False
    for node in attention:
        args = _decode_attention_args(node)
        if args is None:
            COUNTS["attention: kept CPU flash attention"] += 1
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.create_node("call_function", cpu_ops.decode_attention_cpu, args,
                                         name=f"{node.name}_decode")
        fused.meta["val"] = cpu_ops._attention_output(*(a.meta["val"] if isinstance(a, Node) else a for a in args))
        fused.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for user in list(node.users):
            user.replace_all_uses_with(fused)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        rows = args[0].meta["val"].shape[2]
        COUNTS["attention: decode kernel (few query rows)" if isinstance(rows, int) and rows <= FEW_QUERY_ROWS
               else "attention: prefill kernel (masked keys skipped)"] += 1
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
