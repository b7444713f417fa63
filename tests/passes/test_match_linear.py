"""Which matmuls the pass treats as linears: every aten form of a weight matmul, never activation x activation."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.quant.metrics import sqnr_db

OPTS = {"scheme": "int8_weight_only"}


class Forms(nn.Module):
    """One linear in every form the aten graph can hold."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(32, 48, bias=False)  # 3-D input, no bias: view + mm + view
        self.biased = nn.Linear(48, 32)  # bias: addmm
        self.conv1d_weight = nn.Parameter(torch.randn(32, 40) * 0.1)  # GPT-2 Conv1D: x @ P, P stored [K, N]
        self.batched = nn.Parameter(torch.randn(24, 40) * 0.1)  # bmm against a broadcast weight
        self.cast = nn.Linear(24, 16)  # the weight cast before use

    def forward(self, x):
        h = self.biased(F.relu(self.plain(x)))
        h = h @ self.conv1d_weight
        h = torch.bmm(h, self.batched.t().unsqueeze(0).expand(h.shape[0], -1, -1))
        return F.linear(h.double(), self.cast.weight.double(), self.cast.bias.double())


def test_every_form_matches_and_computes(pass_runner):
    m = Forms()
    x = torch.randn(3, 5, 32)
    out, results = pass_runner(m, (x,), OPTS)
    (result,) = results
    forms = {r.module or r.weight: r.form for r in result.quantized}
    assert sorted(forms.values()) == ["addmm", "addmm", "bmm", "mm", "mm"]
    assert {r.weight for r in result.quantized} == {"plain.weight", "biased.weight", "conv1d_weight", "batched",
                                                  "cast.weight"}
    shapes = {r.weight: (r.out_features, r.in_features) for r in result.quantized}
    assert shapes["conv1d_weight"] == (40, 32) and shapes["batched"] == (24, 40) and shapes["plain.weight"] == (48, 32)
    assert out.dtype == torch.float64
    with torch.no_grad():
        assert sqnr_db(m(x), out) > 30


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.register_buffer("inv_freq", torch.rand(1, 8, 1))

    def forward(self, x, pos):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)  # activation x activation: never quantized
        rotary = self.inv_freq.expand(x.shape[0], -1, -1) @ pos  # buffer on the left: not a linear
        return scores @ v, rotary


def test_attention_and_left_hand_buffers_stay_float(pass_runner):
    x, pos = torch.randn(2, 6, 32), torch.randn(2, 1, 6)
    (out, rotary), (result,) = pass_runner(Attention(), (x, pos), OPTS)
    assert [r.weight for r in result.linears] == ["qkv.weight"]
    targets = [n.target for n in result.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.bmm.default) == 3  # q @ k^T, scores @ v, rotary: untouched
    assert targets.count(torch.ops.qcompile.dequantize_int8.default) == 1


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight
        self.twice = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(self.twice(self.twice(h)))


def test_tied_and_reused_weights_are_quantized_once(pass_runner):
    ids = torch.randint(0, 50, (2, 7))
    _, (result,) = pass_runner(Tied(), (ids,), OPTS)
    assert [r.module for r in result.quantized] == ["twice", "twice", "head"]
    assert [name for name, _ in result.constants] == ["twice_weight__qweight", "twice_weight__scale",
                                                      "embed_weight__qweight", "embed_weight__scale"]
    # the embedding still reads the float table: its placeholder stays
    assert any(n.target is torch.ops.aten.embedding.default for n in result.gm.graph.nodes)


def test_include_exclude_and_unfit_layers(pass_runner):
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 8))
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, (result,) = pass_runner(m, (x,), {"scheme": "int4_weight_only", "group_size": 32, "exclude": ["0"]})
    by_module = {r.module: r for r in result.linears}
    assert by_module["0"].scheme is None and "excluded" in by_module["0"].reason
    assert by_module["2"].scheme == "int4_weight_only"
    assert by_module["4"].scheme is None and "in_features=100 is not divisible by group_size=32" in by_module["4"].reason
    messages = [str(w.message) for w in caught if "qcompile" in str(w.message)]
    assert len(messages) == 1 and "'4'" in messages[0] and "stays in float" in messages[0]
    _, (result,) = pass_runner(m, (x,), {"scheme": "int8_dynamic", "include": "2"})
    assert [r.module for r in result.quantized] == ["2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_dtypes(pass_runner, dtype):
    m = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    out, (result,) = pass_runner(m, (x,), {"scheme": "int8_dynamic"})
    assert out.dtype == dtype and len(result.quantized) == 2
    with torch.no_grad():
        assert sqnr_db(m(x), out) > 25
