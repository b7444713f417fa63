"""CUDA lowering: each quantized linear's reference nodes become one `qcompile::fused_linear` (Triton) node.

Patterns (as the schemes emit them; `Q` is an activation-quantize node, `Q[i]` its getitem outputs):
  weight-only : linear(x, dequantize_<fmt>(w...), bias)
  block-scaled: linear(dequantize_<fmt>(Q[0], Q[1].., dtype), dequantize_<fmt>(w...), bias),  Q = quantize_<fmt>(x)
  dynamic     : scale_output(matmul_<fmt>(Q[0], w...), Q[1], w_scale, bias, dtype),  Q = quantize_*(x)
A dynamic linear becomes fused_linear(x, ...), which quantizes x in its own kernel; with the option
activation_quantization='graph' it becomes fused_linear_quantized(Q[0], Q[1], Q[2], ...) instead, Q kept: the
reference quantize op decomposes into aten ops that Inductor fuses into whatever produces x (a norm, an
activation function), which saves a launch and a pass over x per linear.
A linear the kernels cannot take (float32 activations, K not a multiple of 32, ...) keeps its reference nodes;
COUNTS records what was lowered and why the rest was not (QCOMPILE_DEBUG_LOWERING=1 logs each reason).
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import operator
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from .. import _compat, ops

aten = torch.ops.aten
log = logging.getLogger(__name__)
COUNTS: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class FusedLinearArgs:
    """The arguments of qcompile::fused_linear, as graph nodes (or constants)."""
    x: Node
    activation: str
    weight_format: str
    qweight: Node
    w_scale: Node | None = None
    w_zero: Node | None = None
    w_aux: Node | None = None
    bits: int = 8
    group_size: int = 0
    quantized: tuple[Node, Node, Node | None] | None = None  # dynamic: the quantize node's (q, scale, zero)


# dequantize op -> (weight format, its args -> fused_linear weight fields)
WEIGHT_DEQUANTIZERS: dict[object, tuple[str, Callable[..., dict]]] = {
    ops.dequantize_int8: ("int8", lambda q, scale, dtype: dict(qweight=q, w_scale=scale)),
    ops.dequantize_float8: ("fp8", lambda q, scale, dtype: dict(qweight=q, w_scale=scale)),
    ops.dequantize_int4_tinygemm: ("int4_tinygemm", lambda q, scale, zero, group_size, dtype: dict(
        qweight=q, w_scale=scale, w_zero=zero, bits=4, group_size=group_size)),
    ops.dequantize_intx: ("intx", lambda q, scale, zero, bits, group_size, dtype: dict(
        qweight=q, w_scale=scale, w_zero=zero, bits=bits, group_size=group_size)),
    ops.dequantize_codebook: ("codebook", lambda q, book, scale, dtype: dict(
        qweight=q, w_scale=scale, w_aux=book, bits=4)),
    ops.dequantize_mxfp8: ("mxfp8", lambda q, scale, dtype: dict(qweight=q, w_scale=scale, group_size=32)),
    ops.dequantize_nvfp4: ("nvfp4", lambda q, block_scale, tensor_scale, dtype: dict(
        qweight=q, w_scale=block_scale, w_aux=tensor_scale, bits=4, group_size=16)),
}
# block-scaled activations: the dequantize op on the activation side -> (its quantize op, activation name)
ACTIVATION_ROUND_TRIPS = {
    ops.dequantize_mxfp8: (ops.quantize_mxfp8, "mxfp8"),
    ops.dequantize_nvfp4: (ops.quantize_nvfp4, "nvfp4"),
}
# dynamic activation quantizers -> activation name (float8's depends on its granularity argument)
ACTIVATION_QUANTIZERS: dict[object, Callable[[Node], str]] = {
    ops.quantize_int8_per_token: lambda q: "int8_sym",
    ops.quantize_int8_per_token_asym: lambda q: "int8_asym",
    ops.quantize_float8: lambda q: f"fp8_{q.args[1]}",
}


def _call(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _output_of(node, index: int) -> Node | None:
    """The multi-output node whose `index`-th output `node` is (getitem), else None."""
    if _call(node, operator.getitem) and node.args[1] == index and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def _match_weight_only(linear: Node) -> FusedLinearArgs | str:
    x, weight = linear.args[0], linear.args[1]
    if not (isinstance(weight, Node) and weight.op == "call_function" and weight.target in WEIGHT_DEQUANTIZERS):
        return "weight is not a qcompile dequantize node"
    weight_format, fields = WEIGHT_DEQUANTIZERS[weight.target]
    activation = "float"
    if isinstance(x, Node) and x.op == "call_function" and x.target in ACTIVATION_ROUND_TRIPS:
        quantize_op, activation = ACTIVATION_ROUND_TRIPS[x.target]
        source = _output_of(x.args[0], 0)
        if source is None or not _call(source, quantize_op) or any(
                _output_of(a, i + 1) is not source for i, a in enumerate(x.args[1:-1])):
            return f"activation of {activation} is not {quantize_op} of one tensor"
        x = source.args[0]
    return FusedLinearArgs(x=x, activation=activation, weight_format=weight_format,
                           **fields(*weight.args))


def _match_dynamic(scale_output: Node) -> FusedLinearArgs | str:
    acc, a_scale, w_scale = scale_output.args[0], scale_output.args[1], scale_output.args[2]
    if not isinstance(acc, Node) or acc.op != "call_function":
        return "accumulator is not a qcompile matmul"
    quantized = _output_of(acc.args[0], 0)
    if quantized is None or quantized.target not in ACTIVATION_QUANTIZERS:
        return "matmul activation is not a qcompile quantize node"
    if _output_of(a_scale, 1) is not quantized:
        return "activation scale does not come from the same quantize node"
    activation = ACTIVATION_QUANTIZERS[quantized.target](quantized)
    x = quantized.args[0]
    outputs = (acc.args[0], a_scale, None)
    if acc.target is ops.matmul_int8:
        return FusedLinearArgs(x=x, activation=activation, weight_format="int8", qweight=acc.args[1],
                               w_scale=w_scale, quantized=outputs)
    if acc.target is ops.matmul_float8:
        return FusedLinearArgs(x=x, activation=activation, weight_format="fp8", qweight=acc.args[1],
                               w_scale=w_scale, quantized=outputs)
    if acc.target is ops.matmul_intx:
        _, a_zero, packed, scale, zero, bits, group_size = acc.args
        if (a_zero is None) != (activation != "int8_asym") or (
                a_zero is not None and _output_of(a_zero, 2) is not quantized):
            return "activation zero point does not match the quantize node"
        if w_scale is not None:
            return "matmul_intx followed by a per-row weight scale"
        return FusedLinearArgs(x=x, activation=activation, weight_format="intx", qweight=packed, w_scale=scale,
                               w_zero=zero, bits=bits, group_size=group_size, quantized=(*outputs[:2], a_zero))
    return f"accumulator {acc.target} is not a qcompile matmul"


def _kernel_refusal(args: FusedLinearArgs, anchor: Node) -> str | None:
    from ..kernels.triton import LinearSpec, unsupported_reason

    x_val, out_val = args.x.meta.get("val"), anchor.meta.get("val")
    if x_val is None or out_val is None:
        return "no shape metadata on the activation or output"
    spec = LinearSpec(args.activation, args.weight_format, args.bits, args.group_size)
    return unsupported_reason(spec, x_val.dtype, out_val.dtype, int(x_val.shape[-1]))


def _replace(gm: GraphModule, anchor: Node, args: FusedLinearArgs, bias: Node | None, graph_quantized: bool) -> Node:
    out_dtype = anchor.meta["val"].dtype
    weight_and_rest = (args.qweight, args.w_scale, args.w_zero, args.w_aux, bias, args.activation,
                       args.weight_format, args.bits, args.group_size, out_dtype)
    with gm.graph.inserting_before(anchor):
        if graph_quantized and args.quantized is not None:
            fused = gm.graph.call_function(torch.ops.qcompile.fused_linear_quantized.default,
                                           (*args.quantized, *weight_and_rest))
        else:
            fused = gm.graph.call_function(torch.ops.qcompile.fused_linear.default, (args.x, *weight_and_rest))
    for key in ("val", "qcompile", "nn_module_stack", "stack_trace"):
        if key in anchor.meta:
            fused.meta[key] = anchor.meta[key]
    anchor.replace_all_uses_with(fused)
    return fused


def lower_quantized_linears_to_triton(gm: GraphModule, device: torch.device, options=None) -> None:
    """Replace every matched quantized linear with qcompile::fused_linear (see the module docstring)."""
    if importlib.util.find_spec("triton") is None:
        COUNTS["kept/triton is not installed"] += 1
        return
    import qcompile.kernels.triton  # noqa: F401  (registers qcompile::fused_linear)
    _compat.install_ttir_memo()  # Inductor analyses the template at every call site: once per variant suffices

    debug = os.environ.get("QCOMPILE_DEBUG_LOWERING") == "1"
    graph_quantized = getattr(options, "activation_quantization", "kernel") == "graph"
    changed = False
    for node in list(gm.graph.nodes):
        if _call(node, aten.linear.default):
            match, bias = _match_weight_only(node), (node.args[2] if len(node.args) > 2 else None)
        elif _call(node, ops.scale_output):
            match, bias = _match_dynamic(node), node.args[3]
        else:
            continue
        reason = match if isinstance(match, str) else _kernel_refusal(match, node)
        if reason is not None:
            if isinstance(match, FusedLinearArgs) or node.target is ops.scale_output:
                COUNTS[f"kept/{reason}"] += 1  # a quantized linear kept on the reference path
            if debug:
                log.warning("qcompile lower_cuda: %s (%s) not lowered: %s", node.name,
                            node.meta.get("qcompile", {}).get("module", "?"), reason)
            continue
        _replace(gm, node, match, bias, graph_quantized)
        COUNTS[f"lowered/{match.activation}/{match.weight_format}"] += 1
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
