"""CPU lowering: each intx linear's reference nodes become one fused CPU op, which Inductor generates as C++.

Patterns (as the schemes emit them; `Q` is the activation-quantize node, `Q[i]` its getitem outputs):
  int8_dynamic_intx : scale_output(matmul_intx(Q[0], Q[2], packed, scale, None, bits, g), Q[1], None, bias, dtype),
                      Q = quantize_int8_per_token_asym(x)     ->  intx_linear_dynamic_int8_cpu(x, packed, scale, ...)
  intx_weight_only  : linear(x, dequantize_intx(packed, scale, None, bits, g, dtype), bias)
                                                              ->  intx_linear_float_cpu(x, packed, scale, ...)
Weights with zero points (int8_dynamic_int4) keep their reference nodes. COUNTS records what was lowered and why
the rest was not (QCOMPILE_DEBUG_LOWERING=1 logs each reason).
"""
from __future__ import annotations

import collections
import logging
import operator
import os

import torch
from torch.fx import GraphModule, Node

from .. import ops
from ..kernels.cpu import ops as cpu_ops

aten = torch.ops.aten
log = logging.getLogger(__name__)
COUNTS: collections.Counter = collections.Counter()
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
