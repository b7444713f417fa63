"""Gradients through the CUDA lowering: a model compiled with grad mode on, its linears lowered to
qcompile::fused_linear / fused_linear_quantized (Triton, run in the interpreter on CPU), backpropagates as the
same graph without the lowering (the reference ops) does — the input's and the bias's gradients, the reference
activation quantization's own derivative included. Before the ops had a backward, this raised "Trying to
backward through qcompile.fused_linear.default but no autograd formula was registered"."""
import types

import pytest
import torch

from qcompile.backend import quantize_graph
from qcompile.kernels.autograd import _reference_backward
from qcompile.options import QuantOptions
from qcompile.passes import lower_cuda
from qcompile.quant.metrics import sqnr_db

from conftest import MLP, pass_backend
from triton_cases import DEVICE, lowering_backend


def lowered_and_reference(options: dict):
    """(lowered output, reference output, lowered GraphModule, x, the up linear's bias) for MLP (64, 96, 64) on a
    [2, 3, 64] bf16 input, with grad mode on: one Dynamo graph run twice on the same inputs, through lower_cuda and
    as the pass left it."""
    model = MLP((64, 96, 64)).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    opts = QuantOptions.from_dict({**options, "keep_float_weights": True})
    seen = {}
    assert torch.is_grad_enabled()
    lowered = torch.compile(model, backend=lowering_backend(opts, seen))(x)
    return lowered, seen["references"][-1], seen["gm"], x, model.up.bias


CASES = {
    "int4_weight_only": ({"scheme": "int4_weight_only", "group_size": 32}, "fused_linear"),
    "int8_dynamic": ({"scheme": "int8_dynamic"}, "fused_linear"),
    "float8_dynamic": ({"scheme": "float8_dynamic"}, "fused_linear"),
    "mxfp8": ({"scheme": "mxfp8"}, "fused_linear"),
    # the activation quantized in the graph: gradients reach x through fused_linear_quantized's x_scale (int8,
    # with the asymmetric zero point), and through the e4m3 xq too (float8, as the reference's matmul_float8)
    "int8_dynamic_int4/graph": ({"scheme": "int8_dynamic_int4", "group_size": 32,
                                 "activation_quantization": "graph"}, "fused_linear_quantized"),
    "float8_dynamic/graph": ({"scheme": "float8_dynamic", "activation_quantization": "graph"},
                             "fused_linear_quantized"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_graph_backpropagates_as_the_reference(case):
    options, op = CASES[case]
    lowered, reference, gm, x, bias = lowered_and_reference(options)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(f"qcompile.{op}.default") == 2, targets
    upstream = torch.randn_like(lowered)  # fresh and non-zero: a sum's all-ones gradient would hide a transpose
    got = torch.autograd.grad(lowered, (x, bias), upstream)
    expected = torch.autograd.grad(reference, (x, bias), upstream)
    for name, g, e in zip(("x", "bias"), got, expected):
        g, e = g.double(), e.double()
        assert g.shape == e.shape and torch.isfinite(g).all(), name
        assert e.abs().sum() > 0, name  # the reference passes a gradient here (int8: at each row's amax only)
        assert sqnr_db(e, g) > 40 and ((g - e).norm() / e.norm()).item() < 1e-2, (
            case, name, sqnr_db(e, g))


def test_under_no_grad_the_ops_record_no_backward():
    """An inference compile is unchanged: the ops' outputs carry no autograd graph (nothing saved)."""
    model = MLP((64, 96, 64)).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=torch.bfloat16)
    opts = QuantOptions.from_dict({"scheme": "int8_dynamic", "keep_float_weights": True})

    def backend(gm, example_inputs, **_):
        result, _, kept = quantize_graph(gm, example_inputs, opts)
        lower_cuda.lower_quantized_linears_to_triton(result.gm, torch.device("cuda"), opts)
        result.gm.recompile()
        assert "qcompile.fused_linear.default" in [str(n.target) for n in result.gm.graph.nodes]
        constants = [t for _, t in result.constants]
        return lambda *a: result.gm(*[a[i] for i in kept], *constants)

    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    assert out.grad_fn is None


def test_backward_names_the_op_and_argument_it_has_no_reference_for():
    backward = _reference_backward("qcompile::fused_linear", lower_cuda.reference_fused_linear)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    qweight = torch.randint(-128, 127, (8, 64), dtype=torch.int8)
    inputs = (x, qweight, torch.rand(8), None, None, None, "int3_sym", "int8", 8, 0, torch.bfloat16)
    ctx = types.SimpleNamespace(inputs=inputs, needs_input_grad=(True,) + (False,) * (len(inputs) - 1))
    with pytest.raises(ValueError, match=r"qcompile::fused_linear.*activation='int3_sym'"):
        backward(ctx, torch.randn(2, 8, dtype=torch.bfloat16))


# the bound per scheme: float8's reference gradient reaches x through a cast to e4m3 (matmul_float8 reads q as
# float), mostly onto e4m3's subnormal grid at these magnitudes, so an ulp of difference upstream (the Triton
# forward's output, Inductor's summation order) moves values a whole grid step: 12.3 dB was measured on the H100
# (int4 and int8 pass 20)
GPU_SQNR_DB = {"int4_weight_only": 20, "int8_dynamic": 20, "float8_dynamic": 6}


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(GPU_SQNR_DB))
def test_compiled_model_trains_through_the_triton_kernels(scheme):
    """The whole backend on the GPU (AOTAutograd traces the ops' backward, Inductor compiles it): compiled with grad
    mode on, the input's and the bias's gradients are finite and the reference graph's (the pass's graph, run
    eagerly). Kernel-side activation quantization only: with activation_quantization='graph' the reference quantize
    op itself is in Inductor's graph, whose backward of its amax was NaN (the saved amax computed in float32 against
    the bf16-rounded activation) until grad-mode compiles took emulate_precision_casts (tests/test_backend.py,
    CPU); graph mode has not run here on the GPU since."""
    options = {"scheme": scheme, **({"group_size": 128} if scheme == "int4_weight_only" else {})}
    model = MLP((512, 1024, 256), torch.nn.functional.gelu).cuda().bfloat16()
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = torch.compile(model, backend=pass_backend(options))(x)
    upstream = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (x, model.up.bias), upstream)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})
    got = torch.autograd.grad(compiled(x), (x, model.up.bias), upstream)
    for name, g, e in zip(("x", "bias"), got, expected):
        g, e = g.double(), e.double()
        assert torch.isfinite(g).all() and g.abs().sum() > 0 and e.abs().sum() > 0, name
        assert sqnr_db(e, g) > GPU_SQNR_DB[scheme], (name, sqnr_db(e, g))
