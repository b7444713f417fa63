"""Each scheme as the Triton kernels see it: the fused_linear arguments built from the scheme's quantized
weight, and the output the reference `qcompile::` ops give for the same inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qcompile import ops
from qcompile.backend import quantize_graph
from qcompile.options import QuantOptions
from qcompile.passes import lower_cuda
from qcompile.schemes import SCHEMES


@dataclass(frozen=True)
class Case:
    scheme: str
    activation: str
    weight_format: str
    weight_args: Callable[[dict], tuple]  # quantized weight -> (qweight, w_scale, w_zero, w_aux)
    reference: Callable[..., torch.Tensor]  # (x, q, bias, options) -> output through the reference ops
    options: tuple = ()


def _wo(dequantize):
    return lambda x, q, bias, o: F.linear(x, dequantize(q, o, x.dtype), bias)


def _dynamic(quantize, matmul, w_scale):
    def reference(x, q, bias, o):
        xq, x_scale, *x_zero = quantize(x)
        return ops.scale_output(matmul(xq, x_zero, q, o), x_scale, w_scale(q), bias, x.dtype)
    return reference


def _intx_matmul(xq, x_zero, q, o):
    return ops.matmul_intx(xq, x_zero[0] if x_zero else None, q["qweight"], q["scale"], q.get("zero"), o.bits or 4,
                           o.group_size)


def _block_scaled(quantize, dequantize_act, dequantize_weight):
    def reference(x, q, bias, o):
        return F.linear(dequantize_act(*quantize(x), x.dtype), dequantize_weight(q, x.dtype), bias)
    return reference


CASES = [
    Case("int8_weight_only", "float", "int8", lambda q: (q["qweight"], q["scale"], None, None),
         _wo(lambda q, o, dt: ops.dequantize_int8(q["qweight"], q["scale"], dt))),
    Case("float8_weight_only", "float", "fp8", lambda q: (q["qweight"], q["scale"], None, None),
         _wo(lambda q, o, dt: ops.dequantize_float8(q["qweight"], q["scale"], dt))),
    Case("int4_weight_only", "float", "int4_tinygemm", lambda q: (q["qweight"], q["scale"], q["zero"], None),
         _wo(lambda q, o, dt: ops.dequantize_int4_tinygemm(q["qweight"], q["scale"], q["zero"], o.group_size, dt)),
         (("group_size", 64),)),
    *[Case("intx_weight_only", "float", "intx", lambda q: (q["qweight"], q["scale"], None, None),
           _wo(lambda q, o, dt: ops.dequantize_intx(q["qweight"], q["scale"], None, o.bits, o.group_size, dt)),
           (("bits", bits), ("group_size", 32))) for bits in (1, 2, 3, 5, 6, 7, 8)],
    Case("codebook", "float", "codebook", lambda q: (q["qweight"], q["scale"], None, q["codebook"]),
         _wo(lambda q, o, dt: ops.dequantize_codebook(q["qweight"], q["codebook"], q["scale"], dt))),
    Case("mxfp8", "mxfp8", "mxfp8", lambda q: (q["qweight"], q["scale"], None, None),
         _block_scaled(ops.quantize_mxfp8, ops.dequantize_mxfp8,
                       lambda q, dt: ops.dequantize_mxfp8(q["qweight"], q["scale"], dt))),
    Case("nvfp4", "nvfp4", "nvfp4", lambda q: (q["qweight"], q["block_scale"], None, q["tensor_scale"]),
         _block_scaled(ops.quantize_nvfp4, ops.dequantize_nvfp4,
                       lambda q, dt: ops.dequantize_nvfp4(q["qweight"], q["block_scale"], q["tensor_scale"], dt))),
    Case("int8_dynamic", "int8_sym", "int8", lambda q: (q["qweight"], q["scale"], None, None),
         _dynamic(ops.quantize_int8_per_token, lambda xq, z, q, o: ops.matmul_int8(xq, q["qweight"]),
                  lambda q: q["scale"])),
    *[Case("float8_dynamic", f"fp8_{g}", "fp8", lambda q: (q["qweight"], q["scale"], None, None),
           _dynamic(lambda x, g=g: ops.quantize_float8(x, g), lambda xq, z, q, o: ops.matmul_float8(xq, q["qweight"]),
                    lambda q: q["scale"]), (("granularity", g),)) for g in ("row", "tensor")],
    Case("float8_dynamic_int4", "fp8_row", "intx", lambda q: (q["qweight"], q["scale"], None, None),
         _dynamic(lambda x: ops.quantize_float8(x, "row"), _intx_matmul, lambda q: None), (("group_size", 64),)),
    Case("int8_dynamic_int4", "int8_asym", "intx", lambda q: (q["qweight"], q["scale"], q["zero"], None),
         _dynamic(ops.quantize_int8_per_token_asym, _intx_matmul, lambda q: None), (("group_size", 64),)),
    Case("int8_dynamic_intx", "int8_asym", "intx", lambda q: (q["qweight"], q["scale"], None, None),
         _dynamic(ops.quantize_int8_per_token_asym, _intx_matmul, lambda q: None),
         (("bits", 3), ("group_size", 32))),
]


def case_id(case: Case) -> str:
    return case.scheme + "".join(f"-{k[0]}{v}" for k, v in case.options)


def options_of(case: Case) -> QuantOptions:
    return QuantOptions.from_dict({"scheme": case.scheme, **dict(case.options)})


def bits_of(case: Case, options: QuantOptions) -> int:
    if options.bits:
        return options.bits
    return 4 if case.weight_format in ("int4_tinygemm", "intx", "codebook", "nvfp4") else 8


def quantized(case: Case, w: torch.Tensor):
    options = options_of(case)
    return SCHEMES[case.scheme].quantize_weight(w, options), options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lowering_backend(opts: QuantOptions, seen: dict):
    """A torch.compile backend that runs the pass, lowers its graph for CUDA (the kernels run in the interpreter
    on CPU) and at every call also runs the graph as the pass left it, on the same inputs: seen["gm"] is the
    lowered GraphModule, seen["references"] the unlowered graph's outputs, one per call."""
    def backend(gm, example_inputs, **_):
        result, _, kept = quantize_graph(gm, example_inputs, opts)
        reference_graph = torch.fx.Graph()
        reference_graph.output(reference_graph.graph_copy(result.gm.graph, {}))
        reference = torch.fx.GraphModule(result.gm, reference_graph)
        lower_cuda.lower_quantized_linears_to_triton(result.gm, torch.device("cuda"), opts)
        result.gm.recompile()
        seen["gm"] = result.gm
        constants = [t for _, t in result.constants]

        def run(*args):
            inputs = [args[i] for i in kept] + constants
            seen.setdefault("references", []).append(reference(*inputs)[0])
            return result.gm(*inputs)
        return run
    return backend
