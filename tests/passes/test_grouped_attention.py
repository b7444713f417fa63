"""Grouped-query attention without the repeated KV cache (passes/attention.py, CUDA lowering): the op against a
float64 reference, and the rewrite of a fused SDPA node over transformers' repeat_kv (traced on meta tensors: the
CUDA op's graph without a GPU), run afterwards on the CPU."""
import expecttest
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from passes.test_graphs import format_graph

from qcompile import ops
from qcompile.passes.attention import COUNTS, attend_grouped_kv_heads_cuda
from qcompile.quant.metrics import sqnr_db

aten = torch.ops.aten


def _repeat_kv(x, rep):
    """transformers' repeat_kv: [b, h, L, d] -> [b, h * rep, L, d], kv head j serving query heads j*rep .. +rep-1."""
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, rep, length, d).reshape(b, h * rep, length, d)


def _attention_f64(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


def _mask(shape, masked_fraction=0.3):
    """An additive mask (0 / -inf) with at least one slot open per row."""
    keep = torch.rand(shape) > masked_fraction
    keep[..., 0] = True
    return torch.zeros(shape).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_rows, mask_shape", [(1, None), (1, "b1qk"), (1, "bhqk"), (3, "b11k"), (3, "b1qk")])
def test_grouped_query_attention_matches_float64(dtype, query_rows, mask_shape):
    B, Hkv, rep, Lk, D = 2, 2, 4, 37, 16
    q = torch.randn(B, Hkv * rep, query_rows, D, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Lk, D, dtype=dtype) for _ in range(2))
    shapes = {"b1qk": (B, 1, query_rows, Lk), "bhqk": (B, Hkv * rep, query_rows, Lk), "b11k": (B, 1, 1, Lk)}
    mask = None if mask_shape is None else _mask(shapes[mask_shape]).to(dtype)
    out = ops.grouped_query_attention(q, k, v, mask, 0.3)
    assert out.shape == q.shape and out.dtype == dtype
    assert sqnr_db(_attention_f64(q, k, v, mask, 0.3), out.double()) > (100 if dtype == torch.float32 else 40)


def test_grouped_query_attention_takes_a_boolean_mask():
    """transformers' 4D masks are boolean (True: attend); SDPA's bias may be either."""
    q = torch.randn(2, 8, 1, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 37, 16, dtype=torch.bfloat16) for _ in range(2))
    additive = _mask((2, 1, 1, 37))
    out = ops.grouped_query_attention(q, k, v, additive == 0, 0.3)
    assert sqnr_db(_attention_f64(q, k, v, additive, 0.3), out.double()) > 40


def _decode_attention(rep, causal=False):
    def attention(q, k, v, bias):
        out = aten._scaled_dot_product_efficient_attention(q, _repeat_kv(k, rep), _repeat_kv(v, rep), bias, False,
                                                           0.0, causal, scale=0.125)
        return out[0]
    return attention


def _meta(*tensors):
    return [t.to("meta") for t in tensors]


def _decode_inputs(query_rows=1, rep=4):
    q = torch.randn(2, 2 * rep, query_rows, 16)
    k, v = torch.randn(2, 2, 2, 40, 16).unbind(0)
    bias = _mask((2, 1, 1, 40)).expand(2, 2 * rep, query_rows, 40)  # as SDPA expands a [B, 1, 1, Lk] mask
    return q, k, v, bias


class TestGroupedAttentionGraph(expecttest.TestCase):
    def test_decode_step_reads_the_unrepeated_cache(self):
        q, k, v, bias = _decode_inputs()
        gm = make_fx(_decode_attention(4), tracing_mode="fake")(*_meta(q, k, v, bias))  # heads are static
        COUNTS.clear()
        attend_grouped_kv_heads_cuda(gm, torch.device("cuda"))
        gm.recompile()
        assert COUNTS == {"attention: query heads folded onto their key/value head (no repeated cache)": 1}
        self.assertExpectedInline(format_graph(gm), """\
input q_1
input k_1
input v_1
input bias_1
_scaled_dot_product_efficient_attention_grouped = qcompile::grouped_query_attention(q_1, k_1, v_1, bias_1, 0.125)
return _scaled_dot_product_efficient_attention_grouped""")
        # no CUDA op left: the rewritten graph runs here, against float64
        expected = _attention_f64(q, k, v, bias, 0.125)
        assert sqnr_db(expected, gm(q, k, v, bias).double()) > 100


@pytest.mark.parametrize("why, query_rows, causal", [
    ("dropout or is_causal", 1, True),
    ("more than 16 query rows", 17, False),
    ("a mask per query row", 3, False),
])
def test_attention_the_fold_cannot_take_stays(why, query_rows, causal):
    q, k, v, _ = _decode_inputs(query_rows)
    bias = _mask((2, 1, query_rows, 40)).expand(2, 8, query_rows, 40)
    gm = make_fx(_decode_attention(4, causal), tracing_mode="fake")(*_meta(q, k, v, bias))
    before = format_graph(gm)
    COUNTS.clear()
    attend_grouped_kv_heads_cuda(gm, torch.device("cuda"))
    assert COUNTS == {f"attention: kept ({why})": 1}
    assert format_graph(gm) == before
