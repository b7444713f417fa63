"""lower_cuda on graphs the real pass produced: every scheme's linears become one qcompile::fused_linear each
(readable graphs via expecttest), the lowered graph computes what the reference graph computes (kernels run in
the interpreter on CPU), and linears the kernels cannot take keep their reference nodes."""
import expecttest
import pytest
import torch

from qcompile.options import QuantOptions
from qcompile.passes import lower_cuda
from qcompile.quant.metrics import sqnr_db
from qcompile.schemes import SCHEMES

from conftest import MLP, Siblings
from triton_cases import DEVICE, lowering_backend


def lower_and_run(options: dict, dtype=torch.bfloat16, model=None):
    """(reference output, lowered output, lowered GraphModule) for `model` (MLP) on a [2, 3, 64] input."""
    model = (model or MLP((64, 96, 64))).to(DEVICE, dtype)
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=dtype)
    opts = QuantOptions.from_dict({**options, "keep_float_weights": True})
    seen = {}
    with torch.no_grad():
        lowered_out = torch.compile(model, backend=lowering_backend(opts, seen))(x)
    return seen["references"][0], lowered_out, seen["gm"]


def _options(scheme: str) -> dict:
    extra = {"group_size": 32} if SCHEMES[scheme].group_sizes else {}
    return {"scheme": scheme, **extra, **({"bits": 3} if SCHEMES[scheme].bits else {})}


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_lowers_to_fused_linear_and_matches_reference(scheme):
    lower_cuda.COUNTS.clear()
    reference, lowered, gm = lower_and_run(_options(scheme))
    targets = _targets(gm)
    assert targets.count("qcompile.fused_linear.default") == 2
    assert not [t for t in targets if t.startswith("qcompile.") and t != "qcompile.fused_linear.default"]
    assert sum(v for k, v in lower_cuda.COUNTS.items() if k.startswith("lowered/")) == 2
    assert sqnr_db(reference.float(), lowered.float()) > 30


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_dynamic"])
def test_fused_siblings_lower_like_any_linear(scheme):
    """q/k/v and gate/up fused by the pass (N = 128 and 256, q's bias next to zeros) are one fused_linear each."""
    lower_cuda.COUNTS.clear()
    reference, lowered, gm = lower_and_run(_options(scheme), model=Siblings())
    assert _targets(gm).count("qcompile.fused_linear.default") == 3  # {q,k,v}, {gate,up}, down
    assert sum(v for k, v in lower_cuda.COUNTS.items() if k.startswith("lowered/")) == 3
    assert sqnr_db(reference.float(), lowered.float()) > 30


DYNAMIC = [s for s in SCHEMES if SCHEMES[s].activation and s not in ("mxfp8", "nvfp4")]


@pytest.mark.parametrize("scheme, granularity", [(s, None) for s in DYNAMIC] + [("float8_dynamic", "tensor")])
def test_activation_quantization_in_the_graph(scheme, granularity):
    """activation_quantization='graph': the reference quantize op stays (Inductor fuses it into x's producer) and
    fused_linear_quantized takes its outputs; same numerics as the reference graph."""
    lower_cuda.COUNTS.clear()
    options = {**_options(scheme), "activation_quantization": "graph", **({"granularity": granularity}
                                                                         if granularity else {})}
    reference, lowered, gm = lower_and_run(options)
    targets = _targets(gm)
    assert targets.count("qcompile.fused_linear_quantized.default") == 2, targets
    assert "qcompile.fused_linear.default" not in targets
    assert len([t for t in targets if t.startswith("qcompile.quantize_")]) == 2
    assert not [t for t in targets if t.startswith(("qcompile.matmul", "qcompile.scale_output"))]
    assert sqnr_db(reference.float(), lowered.float()) > 30


def test_float32_linears_keep_the_reference_path():
    lower_cuda.COUNTS.clear()
    reference, lowered, gm = lower_and_run({"scheme": "int8_dynamic"}, dtype=torch.float32)
    assert "qcompile.fused_linear.default" not in _targets(gm)
    assert lower_cuda.COUNTS == {"kept/activation dtype torch.float32 (the Triton kernels take bfloat16/float16)": 2}
    assert torch.equal(reference, lowered)


def _graph(gm) -> str:
    def arg(a):
        return a.name if isinstance(a, torch.fx.Node) else str(a)
    return "\n".join(f"{n.name} = {str(n.target).replace('.default', '')}({', '.join(map(arg, n.args))})"
                     for n in gm.graph.nodes if n.op == "call_function")


class TestLoweredGraphs(expecttest.TestCase):
    def test_weight_only_int4(self):
        self.assertExpectedInline(_graph(lower_and_run(_options("int4_weight_only"))[2]), """\
view = aten.view(arg2_1, [6, 64])
fused_linear_default = qcompile.fused_linear(view, up_weight__qweight, up_weight__scale, up_weight__zero, None, arg1_1, float, int4_tinygemm, 4, 32, torch.bfloat16)
view_1 = aten.view(fused_linear_default, [2, 3, 96])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [6, 96])
fused_linear_default_1 = qcompile.fused_linear(view_2, down_weight__qweight, down_weight__scale, down_weight__zero, None, None, float, int4_tinygemm, 4, 32, torch.bfloat16)
_unsafe_view = aten._unsafe_view(fused_linear_default_1, [2, 3, 64])""")

    def test_dynamic_float8_quantized_in_the_graph(self):
        options = {**_options("float8_dynamic"), "activation_quantization": "graph"}
        self.assertExpectedInline(_graph(lower_and_run(options)[2]), """\
view = aten.view(arg2_1, [6, 64])
up_quantize_float8 = qcompile.quantize_float8(view, row)
up_q = <built-in function getitem>(up_quantize_float8, 0)
up_scale = <built-in function getitem>(up_quantize_float8, 1)
fused_linear_quantized_default = qcompile.fused_linear_quantized(up_q, up_scale, None, up_weight__qweight, up_weight__scale, None, None, arg1_1, fp8_row, fp8, 8, 0, torch.bfloat16)
view_1 = aten.view(fused_linear_quantized_default, [2, 3, 96])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [6, 96])
down_quantize_float8 = qcompile.quantize_float8(view_2, row)
down_q = <built-in function getitem>(down_quantize_float8, 0)
down_scale = <built-in function getitem>(down_quantize_float8, 1)
fused_linear_quantized_default_1 = qcompile.fused_linear_quantized(down_q, down_scale, None, down_weight__qweight, down_weight__scale, None, None, None, fp8_row, fp8, 8, 0, torch.bfloat16)
_unsafe_view = aten._unsafe_view(fused_linear_quantized_default_1, [2, 3, 64])""")

    def test_dynamic_int8_int4(self):
        self.assertExpectedInline(_graph(lower_and_run(_options("int8_dynamic_int4"))[2]), """\
view = aten.view(arg2_1, [6, 64])
fused_linear_default = qcompile.fused_linear(view, up_weight__qweight, up_weight__scale, up_weight__zero, None, arg1_1, int8_asym, intx, 4, 32, torch.bfloat16)
view_1 = aten.view(fused_linear_default, [2, 3, 96])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [6, 96])
fused_linear_default_1 = qcompile.fused_linear(view_2, down_weight__qweight, down_weight__scale, down_weight__zero, None, None, int8_asym, intx, 4, 32, torch.bfloat16)
_unsafe_view = aten._unsafe_view(fused_linear_default_1, [2, 3, 64])""")

    def test_nvfp4(self):
        self.assertExpectedInline(_graph(lower_and_run(_options("nvfp4"))[2]), """\
view = aten.view(arg2_1, [6, 64])
fused_linear_default = qcompile.fused_linear(view, up_weight__qweight, up_weight__block_scale, None, up_weight__tensor_scale, arg1_1, nvfp4, nvfp4, 4, 16, torch.bfloat16)
view_1 = aten.view(fused_linear_default, [2, 3, 96])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [6, 96])
fused_linear_default_1 = qcompile.fused_linear(view_2, down_weight__qweight, down_weight__block_scale, None, down_weight__tensor_scale, None, nvfp4, nvfp4, 4, 16, torch.bfloat16)
_unsafe_view = aten._unsafe_view(fused_linear_default_1, [2, 3, 64])""")
