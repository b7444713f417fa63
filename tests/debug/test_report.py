"""qcompile.diff: every linear named with errors that match an independent float64 computation, the graph diff,
the exclude suggestion, several graphs, and the model left untouched."""
import copy
import math

import expecttest
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.debug import diff


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 96, bias=False)
        self.odd = nn.Linear(96, 40)  # K=96: no int4 group of 64 fits, so it stays in float there

    def forward(self, x):
        h = self.up(x).relu()
        scores = h @ h.transpose(-1, -2)  # activation x activation: not a linear
        return self.odd(self.down(h)), scores


class TwoGraphs(Net):
    def forward(self, x):
        h = self.up(x).relu()
        torch._dynamo.graph_break()
        return self.odd(self.down(h))


def _int8_rowwise_float64(w: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric int8 per row, written out in float64: scale = amax / 127.5, q in [-128, 127]."""
    w = w.double()
    scale = w.abs().amax(-1, keepdim=True) / 127.5
    return torch.clamp(torch.round(w / scale), -128, 127) * scale


def _sqnr64(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - approx).pow(2).sum().item())


def _forward64(net: Net, x: torch.Tensor, weights: dict[str, torch.Tensor]):
    """Net's forward in float64 with the given weights; also returns each linear's input and output."""
    seen = {}

    def linear(name, inp):
        mod = getattr(net, name)
        out = inp @ weights[name].t() + (mod.bias.double() if mod.bias is not None else 0)
        seen[name] = (inp, out)
        return out

    h = linear("up", x.double()).relu()
    return (linear("odd", linear("down", h)), h @ h.transpose(-1, -2)), seen


def test_every_linear_with_errors_matching_float64():
    net, x = Net(), torch.randn(3, 7, 64)
    report = diff(net, (x,), {"scheme": "int8_weight_only"}, target_sqnr_db=None)

    assert [(la.module, la.scheme, la.out_features, la.in_features) for la in report.layers] == [
        ("up", "int8_weight_only", 128, 64), ("down", "int8_weight_only", 96, 128), ("odd", "int8_weight_only", 40, 96)]
    float_w = {n: getattr(net, n).weight.detach().double() for n in ("up", "down", "odd")}
    quant_w = {n: _int8_rowwise_float64(w) for n, w in float_w.items()}
    (ref_out, ref_scores), ref_seen = _forward64(net, x, float_w)
    for layer in report.layers:
        assert layer.weight_sqnr_db == pytest.approx(_sqnr64(float_w[layer.module], quant_w[layer.module]), abs=0.1)
        inp, out = ref_seen[layer.module]  # the same float input, through the quantized weight
        q_out = inp @ quant_w[layer.module].t() + (getattr(net, layer.module).bias.double()
                                                    if getattr(net, layer.module).bias is not None else 0)
        assert layer.output_sqnr_db == pytest.approx(_sqnr64(out, q_out), abs=0.1)
        # a maximum is sensitive to single roundings (float32 x * (1/scale) vs float64 x / scale near .5)
        assert layer.max_abs_error == pytest.approx((out - q_out).abs().max().item(), rel=0.2)
        # int8 weight + float32 scale per row
        assert layer.weight_bytes == layer.out_features * layer.in_features + 4 * layer.out_features
    assert sum(la.weight_share for la in report.layers) == pytest.approx(1.0)

    (q_out, q_scores), _ = _forward64(net, x, quant_w)
    expected = _sqnr64(torch.cat([ref_out.flatten(), ref_scores.flatten()]),
                       torch.cat([q_out.flatten(), q_scores.flatten()]))
    assert report.output_sqnr_db == pytest.approx(expected, abs=0.3)


def test_skipped_linear_says_why_and_model_is_untouched():
    net, x = Net(), torch.randn(2, 5, 64)
    before = copy.deepcopy(net.state_dict())
    report = diff(net, (x,), {"scheme": "int4_weight_only", "group_size": 64}, target_sqnr_db=None)
    odd = next(la for la in report.layers if la.module == "odd")
    assert odd.scheme is None and "in_features=96 is not divisible by group_size=64" in odd.reason
    assert odd.output_sqnr_db is None and odd.weight_bytes == 40 * 96 * 4
    text = str(report)
    assert "odd: stays in float: in_features=96" in text and "3 linears, 2 quantized, 1 in float" in text
    for name, tensor in net.state_dict().items():  # not released, not changed
        assert torch.equal(tensor, before[name]), name
    assert torch.allclose(net(x)[0], Net.forward(net, x)[0])


class GraphDiffTest(expecttest.TestCase):
    def test_pass_as_unified_diff(self):
        report = diff(Net(), (torch.randn(2, 5, 64),), {"scheme": "int8_dynamic"}, target_sqnr_db=None)
        (graph,) = report.graphs
        changed = [line for line in graph.diff.splitlines()
                   if line[:1] in "+-" and "# File:" not in line and "def forward" not in line]
        self.assertExpectedInline("\n".join(changed), """\
--- before the pass
+++ after the pass
-        t: "f32[64, 128]" = torch.ops.aten.t.default(arg0_1)
-        addmm: "f32[10, 128]" = torch.ops.aten.addmm.default(arg1_1, view, t)
-        view_1: "f32[2, 5, 128]" = torch.ops.aten.view.default(addmm, [2, 5, 128])
+        up_quantize_int8_per_token = torch.ops.qcompile.quantize_int8_per_token.default(view)
+        up_q: "i8[10, 64]" = up_quantize_int8_per_token[0]
+        up_scale: "f32[10, 1]" = up_quantize_int8_per_token[1]
+        up_matmul_int8: "i32[10, 128]" = torch.ops.qcompile.matmul_int8.default(up_q, up_weight__qweight)
+        up_scale_output: "f32[10, 128]" = torch.ops.qcompile.scale_output.default(up_matmul_int8, up_scale, up_weight__scale, arg1_1, torch.float32)
+        view_1: "f32[2, 5, 128]" = torch.ops.aten.view.default(up_scale_output, [2, 5, 128])
-        t_1: "f32[128, 96]" = torch.ops.aten.t.default(arg3_1)
-        mm: "f32[10, 96]" = torch.ops.aten.mm.default(view_5, t_1)
-        _unsafe_view: "f32[2, 5, 96]" = torch.ops.aten._unsafe_view.default(mm, [2, 5, 96])
+        down_quantize_int8_per_token = torch.ops.qcompile.quantize_int8_per_token.default(view_5)
+        down_q: "i8[10, 128]" = down_quantize_int8_per_token[0]
+        down_scale: "f32[10, 1]" = down_quantize_int8_per_token[1]
+        down_matmul_int8: "i32[10, 96]" = torch.ops.qcompile.matmul_int8.default(down_q, down_weight__qweight)
+        down_scale_output: "f32[10, 96]" = torch.ops.qcompile.scale_output.default(down_matmul_int8, down_scale, down_weight__scale, None, torch.float32)
+        _unsafe_view: "f32[2, 5, 96]" = torch.ops.aten._unsafe_view.default(down_scale_output, [2, 5, 96])
-        t_2: "f32[96, 40]" = torch.ops.aten.t.default(arg4_1)
-        addmm_1: "f32[10, 40]" = torch.ops.aten.addmm.default(arg5_1, view_6, t_2)
-        view_7: "f32[2, 5, 40]" = torch.ops.aten.view.default(addmm_1, [2, 5, 40])
+        odd_quantize_int8_per_token = torch.ops.qcompile.quantize_int8_per_token.default(view_6)
+        odd_q: "i8[10, 96]" = odd_quantize_int8_per_token[0]
+        odd_scale: "f32[10, 1]" = odd_quantize_int8_per_token[1]
+        odd_matmul_int8: "i32[10, 40]" = torch.ops.qcompile.matmul_int8.default(odd_q, odd_weight__qweight)
+        odd_scale_output: "f32[10, 40]" = torch.ops.qcompile.scale_output.default(odd_matmul_int8, odd_scale, odd_weight__scale, arg5_1, torch.float32)
+        view_7: "f32[2, 5, 40]" = torch.ops.aten.view.default(odd_scale_output, [2, 5, 40])""")


def test_suggestion_leaves_the_worst_layer_in_float():
    torch.manual_seed(1)
    net, x = Net(), torch.randn(2, 9, 64)
    with torch.no_grad():  # outliers in every group of `down` wreck its 4-bit grid
        net.down.weight[:, ::16] *= 30
    options = {"scheme": "intx_weight_only", "bits": 4, "group_size": 32}
    without_down = diff(net, (x,), {**options, "exclude": ["down"]}, target_sqnr_db=None)
    assert next(la for la in without_down.layers if la.module == "down").reason.startswith("excluded")
    target = without_down.output_sqnr_db - 0.5
    report = diff(net, (x,), options, target_sqnr_db=target)
    assert report.output_sqnr_db < target
    s = report.suggestion
    assert s.exclude == ["down"] and s.met and s.reached_sqnr_db == pytest.approx(without_down.output_sqnr_db)
    assert "options={'exclude': ['down']}" in str(report)


def test_target_already_met_suggests_nothing():
    report = diff(Net(), (torch.randn(2, 5, 64),), {"scheme": "int8_weight_only"}, target_sqnr_db=20)
    assert report.suggestion.exclude == [] and report.suggestion.met


def test_graph_break_gives_two_graphs_with_their_linears():
    net, x = TwoGraphs(), torch.randn(2, 5, 64)
    report = diff(net, (x,), {"scheme": "float8_weight_only"}, target_sqnr_db=None)
    assert [[la.module for la in g.layers] for g in report.graphs] == [["up"], ["down", "odd"]]
    assert all(la.output_sqnr_db > 20 for la in report.layers)
    assert 20 < report.output_sqnr_db < 60


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        diff(Net(), (torch.randn(2, 64),), {"scheme": "int3"})


def test_exported_from_package():
    assert qcompile.diff is diff


def test_fused_siblings_are_reported_per_linear_as_if_separate():
    """Sibling fusion changes the graph, not the figures: each fused linear keeps its own row in the report, with
    the same errors and bytes as unfused, and the text names the group."""
    from conftest import Siblings

    net, x = Siblings(), torch.randn(3, 5, 64)
    fused = diff(net, (x,), {"scheme": "int8_dynamic"}, target_sqnr_db=None)
    separate = diff(net, (x,), {"scheme": "int8_dynamic", "fuse_siblings": False}, target_sqnr_db=None)
    assert {la.module: la.fused_into for la in fused.layers} == {
        "q": "{q,k,v}", "k": "{q,k,v}", "v": "{q,k,v}", "gate": "{gate,up}", "up": "{gate,up}", "down": None}
    for a, b in zip(fused.layers, separate.layers):
        assert (a.module, a.weight_bytes, a.max_abs_error) == (b.module, b.weight_bytes, b.max_abs_error)
        assert a.weight_sqnr_db == pytest.approx(b.weight_sqnr_db, abs=1e-6)
        assert a.output_sqnr_db == pytest.approx(b.output_sqnr_db, abs=1e-6)
    assert fused.output_sqnr_db == pytest.approx(separate.output_sqnr_db, abs=1e-6)
    text = str(fused)
    assert "graph 0 {q,k,v}: 3 linears fused into one (64+32+32 x 64)" in text
    assert "graph 0 {gate,up}: 2 linears fused into one (128+128 x 64)" in text
    assert "q_k_v_scale_output: \"f32[15, 128]\"" in fused.graphs[0].diff  # one [M, 64+32+32] linear
