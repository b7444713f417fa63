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
import functools
import importlib.util
import logging
import operator
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from .. import _compat, ops
from ..quant import affine, float8

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


# The reference ops each fused_linear argument comes from. One table per side serves both directions: the match
# below reads fused_linear's arguments off the reference nodes, and the Triton ops' backward (the reference_fused_*
# functions below) calls the same reference ops on them, so a lowered graph differentiates as the graph it came
# from.
# dequantize op -> (weight format, the fused_linear field each argument but the last (dtype) fills, fixed fields)
WEIGHT_DEQUANTIZERS: dict[object, tuple[str, tuple[str, ...], dict]] = {
    ops.dequantize_int8: ("int8", ("qweight", "w_scale"), {}),
    ops.dequantize_float8: ("fp8", ("qweight", "w_scale"), {}),
    ops.dequantize_int4_tinygemm: ("int4_tinygemm", ("qweight", "w_scale", "w_zero", "group_size"), dict(bits=4)),
    ops.dequantize_intx: ("intx", ("qweight", "w_scale", "w_zero", "bits", "group_size"), {}),
    ops.dequantize_codebook: ("codebook", ("qweight", "w_aux", "w_scale"), dict(bits=4)),
    ops.dequantize_mxfp8: ("mxfp8", ("qweight", "w_scale"), dict(group_size=32)),
    ops.dequantize_nvfp4: ("nvfp4", ("qweight", "w_scale", "w_aux"), dict(bits=4, group_size=16)),
}
# block-scaled activations: activation name -> (quantize op, dequantize op), as linear(dequantize(*quantize(x),
# dtype), ...)
ACTIVATION_ROUND_TRIPS = {
    "mxfp8": (ops.quantize_mxfp8, ops.dequantize_mxfp8),
    "nvfp4": (ops.quantize_nvfp4, ops.dequantize_nvfp4),
}


def _grid_int8(q, scale, zero, dtype):  # one group per row: q [..., K], scale [..., 1]
    return affine.dequantize_symmetric(q, scale, q.shape[-1], dtype)


def _grid_int8_asym(q, scale, zero, dtype):
    return affine.dequantize_asymmetric(q, scale, zero, q.shape[-1], dtype)


def _grid_float8(q, scale, zero, dtype):  # scale [..., 1] per row or [] per tensor
    return float8.dequantize_float8(q, scale, dtype)


# dynamic activations: activation name -> (quantize op, its arguments after x, the grid of its outputs). The op
# returns (q, scale[, zero]), which a qcompile matmul and scale_output multiply as the grid (q - zero) * scale: the
# reference dequantize of the same format, grid(q, scale, zero or None, dtype)
ACTIVATION_QUANTIZERS: dict[str, tuple[object, tuple, Callable]] = {
    "int8_sym": (ops.quantize_int8_per_token, (), _grid_int8),
    "int8_asym": (ops.quantize_int8_per_token_asym, (), _grid_int8_asym),
    "fp8_row": (ops.quantize_float8, ("row",), _grid_float8),
    "fp8_tensor": (ops.quantize_float8, ("tensor",), _grid_float8),
}


def reference_weight(qweight, w_scale, w_zero, w_aux, weight_format: str, bits: int, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` that fused_linear's weight arguments stand for: the reference dequantize op
    they were matched from, called on them."""
    fields = dict(qweight=qweight, w_scale=w_scale, w_zero=w_zero, w_aux=w_aux, bits=bits, group_size=group_size)
    for op, (name, arguments, _) in WEIGHT_DEQUANTIZERS.items():
        if name == weight_format:
            return op(*(fields[a] for a in arguments), dtype)
    raise ValueError(f"no reference dequantize op for weight_format={weight_format!r}")


def _dynamic(activation: str):
    if activation not in ACTIVATION_QUANTIZERS:
        raise ValueError(f"no reference quantize op for activation={activation!r}")
    return ACTIVATION_QUANTIZERS[activation]


def reference_quantize(x: torch.Tensor, activation: str):
    """A dynamic activation's reference quantize op on x: (q, scale, zero or None)."""
    op, arguments, _ = _dynamic(activation)
    q, scale, *zero = op(x, *arguments)
    return q, scale, zero[0] if zero else None


def reference_grid(q, scale, zero, activation: str, dtype: torch.dtype) -> torch.Tensor:
    """The values a dynamic activation's quantized (q, scale, zero or None) stand for, (q - zero) * scale, in
    `dtype`: its format's reference dequantize."""
    return _dynamic(activation)[2](q, scale, zero, dtype)


def reference_round_trip(x: torch.Tensor, activation: str) -> torch.Tensor:
    """A block-scaled activation's reference quantize -> dequantize of x, in x's dtype ("float": x)."""
    if activation == "float":
        return x
    if activation not in ACTIVATION_ROUND_TRIPS:
        raise ValueError(f"no reference round trip for activation={activation!r}")
    quantize, dequantize = ACTIVATION_ROUND_TRIPS[activation]
    return dequantize(*quantize(x), x.dtype)


# The Triton ops' gradients. The ops replace the reference ops matched here, so their backward is the gradient of
# those ops at the saved inputs: a graph compiled with grad mode on differentiates as the unlowered graph did, the
# activation quantization's own derivative included (through the scale, and e4m3's cast; no straight-through
# estimate). Built from this module's tables of what it matched, so match and gradient cannot disagree; registered
# from here (the passes' floor) on the kernels' ops, which know nothing of the reference ops they stand for.

def reference_fused_linear(x, qweight, w_scale, w_zero, w_aux, bias, activation, weight_format, bits, group_size,
                           out_dtype):
    """fused_linear in pure torch: x through its reference quantize op (a dynamic activation: then
    reference_fused_linear_quantized) or quantize -> dequantize round trip (block-scaled; "float": x), times the
    reference-dequantized weight, plus bias — in x's dtype, as the linear it replaced."""
    if activation in ACTIVATION_QUANTIZERS:
        return reference_fused_linear_quantized(*reference_quantize(x, activation), qweight, w_scale, w_zero, w_aux,
                                                bias, activation, weight_format, bits, group_size, out_dtype)
    w = reference_weight(qweight, w_scale, w_zero, w_aux, weight_format, bits, group_size, x.dtype)
    return torch.nn.functional.linear(reference_round_trip(x, activation), w, bias).to(out_dtype)


def reference_fused_linear_quantized(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, activation,
                                     weight_format, bits, group_size, out_dtype):
    """fused_linear_quantized in pure torch: the activation's grid (xq - zero) * scale (its format's reference
    dequantize) times the reference-dequantized weight, plus bias, in float32 (as the scale_output it replaced),
    cast to out_dtype."""
    x_grid = reference_grid(xq, x_scale, x_zero, activation, torch.float32)
    w = reference_weight(qweight, w_scale, w_zero, w_aux, weight_format, bits, group_size, torch.float32)
    return torch.nn.functional.linear(x_grid, w, None if bias is None else bias.float()).to(out_dtype)


@functools.cache
def register_gradients() -> None:
    """Give qcompile::fused_linear and fused_linear_quantized their reference gradients (once; the Triton ops must
    be defined, i.e. triton installed)."""
    import qcompile.kernels.triton  # noqa: F401  (defines the ops)
    from ..kernels.autograd import register_reference_gradient

    register_reference_gradient("qcompile::fused_linear", reference_fused_linear)
    register_reference_gradient("qcompile::fused_linear_quantized", reference_fused_linear_quantized)


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
    weight_format, arguments, fixed = WEIGHT_DEQUANTIZERS[weight.target]
    activation = "float"
    round_trip = next((name for name, (_, dequantize_op) in ACTIVATION_ROUND_TRIPS.items()
                       if _call(x, dequantize_op)), None)
    if round_trip is not None:
        activation, (quantize_op, _) = round_trip, ACTIVATION_ROUND_TRIPS[round_trip]
        source = _output_of(x.args[0], 0)
        if source is None or not _call(source, quantize_op) or any(
                _output_of(a, i + 1) is not source for i, a in enumerate(x.args[1:-1])):
            return f"activation of {activation} is not {quantize_op} of one tensor"
        x = source.args[0]
    return FusedLinearArgs(x=x, activation=activation, weight_format=weight_format,
                           **dict(zip(arguments, weight.args[:-1])), **fixed)


def _match_dynamic(scale_output: Node) -> FusedLinearArgs | str:
    acc, a_scale, w_scale = scale_output.args[0], scale_output.args[1], scale_output.args[2]
    if not isinstance(acc, Node) or acc.op != "call_function":
        return "accumulator is not a qcompile matmul"
    quantized = _output_of(acc.args[0], 0)
    activation = None if quantized is None else next(
        (name for name, (op, arguments, _) in ACTIVATION_QUANTIZERS.items()
         if quantized.target is op and tuple(quantized.args[1:]) == arguments and not quantized.kwargs), None)
    if activation is None:
        return "matmul activation is not a qcompile quantize node"
    if _output_of(a_scale, 1) is not quantized:
        return "activation scale does not come from the same quantize node"
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
    register_gradients()  # defines qcompile::fused_linear (and its backward)
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
