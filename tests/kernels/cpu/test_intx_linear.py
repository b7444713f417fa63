"""The generated CPU intx kernels through Inductor (and AOTInductor): visible in the output code, every bit width,
GEMV (M=1) and GEMM (M=9) on one dynamic-M graph, against float64 references on fresh random inputs."""
import re

import expecttest
import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

from conftest import run_pass
from passes.test_graphs import format_graph

from qcompile.kernels.cpu import ops as cpu_ops
from qcompile.passes.lower_cpu import COUNTS, lower_intx_linears_cpu
from qcompile.quant import affine, packing
from qcompile.quant.metrics import sqnr_db

N, K = 40, 256  # N is not a multiple of the kernel's 16-row blocks: the tail is exercised


def _quantized_weight(bits, group_size, dtype=torch.float32, n=N, k=K):
    w = torch.randn(n, k) * 0.05
    scale = affine.choose_qparams_symmetric(w, group_size, bits).to(dtype)
    q = affine.quantize_symmetric(w, scale.float(), group_size, bits)
    return w, packing.pack_along_k(q.to(torch.int32) + (1 << (bits - 1)), bits), scale


def _dequantized_f64(packed, scale, bits, group_size):
    u = packing.unpack_along_k(packed, bits, packed.shape[1] * 8 // bits).double()
    return (u - (1 << (bits - 1))) * scale.double().repeat_interleave(group_size, dim=1)


def _expected_dynamic_f64(x, packed, scale, bias, bits, group_size):
    """int8 activations are exact integers: quantize as the reference does, then multiply in float64."""
    xq, x_scale, x_zero = torch.ops.qcompile.quantize_int8_per_token_asym(x.float())
    a = (xq.double() - x_zero.double()) * x_scale.double()
    return a @ _dequantized_f64(packed, scale, bits, group_size).t() + bias.double()


def _relative_error(out, expected):
    return ((out.double() - expected).abs().max() / expected.abs().max()).item()


# Every bit width runs natively in tests/kernels/cpu/arm (the same source, AVX2 and portable builds); through
# Inductor a few widths cover the plumbing: a generic-unpack width (3), the SIMD-unpack widths (4, 8), both groups.
CASES = [("dynamic", 2, 32), ("dynamic", 4, 32), ("dynamic", 8, 128), ("float", 3, 32), ("float", 4, 128)]


def test_generated_kernels_gemv_and_gemm():
    weights = [_quantized_weight(bits, group_size) for _, bits, group_size in CASES]
    bias = torch.randn(N)
    ops = {"dynamic": cpu_ops.intx_linear_dynamic_int8_cpu, "float": cpu_ops.intx_linear_float_cpu}

    def f(x):
        return [ops[kind](x, packed, scale, bias, bits, group_size, torch.float32)
                for (kind, bits, group_size), (_, packed, scale) in zip(CASES, weights)]

    compiled = torch.compile(f)
    for M in (9, 3):  # GEMM with a token tail, then the GEMV, on one graph with a symbolic M
        x = torch.randn(M, K) + 0.2
        torch._dynamo.mark_dynamic(x, 0)
        if M == 9:
            outs, (code,) = run_and_get_code(compiled, x)
            entry = {"dynamic": "intx_linear_dynamic_int8", "float": "intx_linear_float"}
            for kind, bits, group_size in CASES:
                assert f"qcompile_cpu::{entry[kind]}<{bits}, {group_size}, float" in code
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                outs = compiled(x)
        for out, (kind, bits, group_size), (w, packed, scale) in zip(outs, CASES, weights):
            if kind == "dynamic":
                expected = _expected_dynamic_f64(x, packed, scale, bias, bits, group_size)
            else:
                expected = x.double() @ _dequantized_f64(packed, scale, bits, group_size).t() + bias.double()
            assert _relative_error(out, expected) < 1e-5, (kind, bits, M)
            # and as near the unquantized product as b bits allow (~6 dB per bit)
            exact = x.double() @ w.double().t() + bias.double()
            assert sqnr_db(exact, out) > 6 * bits - 8, (kind, bits, M)


def test_interleaved_rows_gemv_and_gemm():
    """4- and 8-bit rows interleaved in blocks of 4 (kernels/cpu/layout.py, row_block=4), through Inductor: N = 39
    leaves a block of 3 rows, K = 352 a partial 64-byte chunk; GEMV and GEMM give what the row-major weights give
    (float64), and the ops' reference reads the rows back in order."""
    from qcompile.kernels.cpu import layout

    n, k = 39, 352
    cases = [("dynamic", 4, 32), ("dynamic", 8, 32), ("float", 4, 32), ("float", 8, 32)]
    weights = [_quantized_weight(bits, group_size, n=n, k=k) for _, bits, group_size in cases]
    interleaved = [layout.interleave_rows(packed) for _, packed, _ in weights]
    bias = torch.randn(n)
    ops = {"dynamic": cpu_ops.intx_linear_dynamic_int8_cpu, "float": cpu_ops.intx_linear_float_cpu}

    def f(x):
        return [ops[kind](x, rows, scale, bias, bits, group_size, torch.float32, 4)
                for (kind, bits, group_size), (_, _, scale), rows in zip(cases, weights, interleaved)]

    compiled = torch.compile(f)
    for M in (1, 3, 9):  # the GEMV, a 3-token GEMV, the GEMM with a token tail
        x = torch.randn(M, k) + 0.2
        outs, (code,) = run_and_get_code(compiled, x)
        assert code.count(", 4>(X, W, S, B, Y") == len(cases)
        for out, (kind, bits, group_size), (_, packed, scale), rows in zip(outs, cases, weights, interleaved):
            if kind == "dynamic":
                expected = _expected_dynamic_f64(x, packed, scale, bias, bits, group_size)
            else:
                expected = x.double() @ _dequantized_f64(packed, scale, bits, group_size).t() + bias.double()
            assert _relative_error(out, expected) < 1e-5, (kind, bits, M)
            reference = ops[kind](x, rows, scale, bias, bits, group_size, torch.float32, 4)  # eager: the reference
            assert torch.equal(reference, ops[kind](x, packed, scale, bias, bits, group_size, torch.float32))


def test_instances_sharing_one_graph_read_their_own_interleaved_rows():
    """Dynamo serves both instances from one graph: the second's quantized weights, quantized when it first calls,
    are fed interleaved as the first's were (backend.WeightBinding). Rows of 128 and 80 bytes: more than one 64-byte
    chunk (rows of at most 64 bytes are interleaved as they were)."""
    models = [nn.Sequential(nn.Linear(256, 160), nn.SiLU(), nn.Linear(160, 37)) for _ in range(2)]
    x = torch.randn(3, 256)
    options = {"scheme": "int8_dynamic_intx", "bits": 4, "group_size": 32, "keep_float_weights": True}
    with torch.no_grad():
        for model in models:
            assert sqnr_db(model(x), torch.compile(model, backend="qcompile", options=options)(x)) > 15


@pytest.mark.parametrize("shape", [(3, 5, K), (1, 2, K)], ids=["gemm", "gemv"])
def test_bfloat16_activations_scales_and_output(shape):
    w, packed, scale = _quantized_weight(4, 32, torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)

    def f(x):
        return (cpu_ops.intx_linear_dynamic_int8_cpu(x, packed, scale, bias, 4, 32, torch.bfloat16),
                cpu_ops.intx_linear_float_cpu(x, packed, scale, bias, 4, 32, torch.bfloat16))

    (dyn, flt), (code, *_) = run_and_get_code(torch.compile(f), x)
    assert re.search(r"qcompile_cpu::intx_linear_dynamic_int8<4, 32(, (at::|c10::)?BFloat16){4}, 1>", code)
    assert dyn.dtype == flt.dtype == torch.bfloat16 and dyn.shape == (*shape[:-1], N)
    expected = _expected_dynamic_f64(x, packed, scale, bias.float(), 4, 32)
    assert _relative_error(dyn, expected) < 1e-2  # bf16 output rounding
    expected_float = x.double() @ _dequantized_f64(packed, scale, 4, 32).t() + bias.double()
    assert _relative_error(flt, expected_float) < 1e-2


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 32, bias=False)

    side = 0  # a side computation of side x side elements (test_decode_graphs_run_on_one_intra_op_thread)

    def forward(self, x):
        out = self.down(torch.nn.functional.silu(self.up(x))) + x[..., :32]
        if self.side:
            out = out + torch.outer(x[..., 0].sum().expand(self.side), x[..., 1].sum().expand(self.side)).mean()
        return out


@pytest.mark.parametrize("scheme, op_name", [("int8_dynamic_intx", "intx_linear_dynamic_int8"),
                                             ("intx_weight_only", "intx_linear_float")])
def test_backend_lowers_intx_linears_to_generated_kernel(scheme, op_name):
    model = _MLP()
    x = torch.randn(2, 5, 64)
    COUNTS.clear()
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="qcompile",
                                 options={"scheme": scheme, "bits": 4, "group_size": 32, "keep_float_weights": True})
        out, (code, *_) = run_and_get_code(compiled, x)
    # 4-bit weights only lowered ops read: their rows interleaved (kernels/cpu/layout.py), the kernel told so
    assert COUNTS == {f"{scheme}: lowered": 2, "packed weights: rows interleaved in blocks of 4": 2}
    assert code.count(f"qcompile_cpu::{op_name}<4, 32, float, float, float, float, 4>") == 2
    assert sqnr_db(expected, out) > 15


def test_decode_graphs_run_on_one_intra_op_thread(monkeypatch):
    """A graph whose lowered linears are all GEMVs (<= 3 tokens) runs with one torch thread, then restores it, and
    is compiled without Inductor's per-call size asserts; a graph with GEMMs keeps the caller's threads and the
    asserts. Inductor is replaced by the lowered graph itself (cheap)."""
    from qcompile import _compat
    threads_seen, size_asserts_seen = [], []

    def lowered_graph_as_compiled(gm, inputs, cudagraphs=False, size_asserts=True, **other_options):
        size_asserts_seen.append(size_asserts)

        def run(*args):
            threads_seen.append(torch.get_num_threads())
            return gm(*args)
        return run

    monkeypatch.setattr(_compat, "compile_fx", lowered_graph_as_compiled)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 5 tokens: a GEMM; 1 token beside a 300x300 product: more than small kernels
        for tokens, side, expected_threads in ((1, 0, 1), (3, 0, 1), (5, 0, 2), (1, 300, 2)):
            model = _MLP()
            model.side = side
            x = torch.randn(tokens, 64)
            with torch.no_grad():
                out = torch.compile(model, backend="qcompile", dynamic=False,
                                    options={"scheme": "intx_weight_only", "bits": 4, "group_size": 32,
                                             "keep_float_weights": True})(x)
                assert sqnr_db(model(x), out) > 15
            assert threads_seen[-1] == expected_threads, tokens
            assert size_asserts_seen[-1] == (expected_threads == 2), tokens
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _repeat_kv(x, rep):  # transformers' repeat_kv, which it runs under torch.compile for grouped-query attention
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, rep, length, d).reshape(b, h * rep, length, d)


@pytest.mark.parametrize("query_length, rep", [(1, 3), (5, 2)])
def test_flash_attention_reads_grouped_kv_heads(query_length, rep):
    """The CPU lowering feeds flash attention the key/value heads themselves (no per-step copy of the cache):
    the repeat's clone leaves the graph and the outputs are bit-identical."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from qcompile.passes.lower_cpu import attend_grouped_kv_heads_cpu

    def attention(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, _repeat_kv(k, rep), _repeat_kv(v, rep),
                                                                attn_mask=mask, scale=0.125)

    q = torch.randn(1, 3 * rep, query_length, 16)
    k, v = torch.randn(2, 1, 3, 40, 16).unbind(0)
    mask = torch.rand(1, 1, query_length, 40) > 0.3
    with torch.no_grad():
        gm = make_fx(attention, tracing_mode="symbolic")(q, k, v, mask)  # symbolic sizes, as the backend traces
    COUNTS.clear()
    guards = len(gm.shape_env.guards)
    attend_grouped_kv_heads_cpu(gm, torch.device("cpu"))
    gm.recompile()
    assert len(gm.shape_env.guards) == guards  # symbolic sizes compared without guarding on them
    assert COUNTS == {"attention: repeated key/value heads dropped (grouped-query flash attention)": 1}
    assert not any(n.target in (torch.ops.aten.clone.default, torch.ops.aten.expand.default) for n in gm.graph.nodes)
    assert torch.equal(gm(q, k, v, mask), attention(q, k, v, mask))


class TestLoweredGraphs(expecttest.TestCase):
    """What the CPU lowering leaves for Inductor (EXPECTTEST_ACCEPT=1 to update)."""

    def lowered(self, scheme) -> str:
        _, (result,) = run_pass(_MLP(), (torch.randn(4, 64),), {"scheme": scheme, "bits": 4, "group_size": 32})
        lower_intx_linears_cpu(result.gm, torch.device("cpu"))
        return format_graph(result.gm)

    def test_int8_dynamic_intx(self):
        self.assertExpectedInline(self.lowered("int8_dynamic_intx"), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_intx_linear_dynamic_int8_cpu = qcompile::intx_linear_dynamic_int8_cpu(arg2_1, up_weight__qweight, up_weight__scale, arg1_1, 4, 32, torch.float32, 4)
silu = silu(up_intx_linear_dynamic_int8_cpu)
down_intx_linear_dynamic_int8_cpu = qcompile::intx_linear_dynamic_int8_cpu(silu, down_weight__qweight, down_weight__scale, None, 4, 32, torch.float32, 4)
slice_1 = slice.Tensor(arg2_1, 1, 0, 32)
add = add.Tensor(down_intx_linear_dynamic_int8_cpu, slice_1)
return ('add',)""")

    def test_intx_weight_only(self):
        self.assertExpectedInline(self.lowered("intx_weight_only"), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_intx_linear_float_cpu = qcompile::intx_linear_float_cpu(arg2_1, up_weight__qweight, up_weight__scale, arg1_1, 4, 32, torch.float32, 4)
silu = silu(up_intx_linear_float_cpu)
down_intx_linear_float_cpu = qcompile::intx_linear_float_cpu(silu, down_weight__qweight, down_weight__scale, None, 4, 32, torch.float32, 4)
slice_1 = slice.Tensor(arg2_1, 1, 0, 32)
add = add.Tensor(down_intx_linear_float_cpu, slice_1)
return ('add',)""")


def test_aoti_package_contains_and_runs_the_kernel(tmp_path):
    w, packed, scale = _quantized_weight(4, 32)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("bias", torch.randn(N))

        def forward(self, x):
            return torch.relu(cpu_ops.intx_linear_dynamic_int8_cpu(x, self.packed, self.scale, self.bias, 4, 32,
                                                                   torch.float32))

    model = Linear()
    program = torch.export.export(model, (torch.randn(7, K),), dynamic_shapes={"x": {0: torch.export.Dim("M")}})
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "intx.pt2"))
    import zipfile
    sources = [zipfile.ZipFile(path).read(n).decode() for n in zipfile.ZipFile(path).namelist() if n.endswith(".cpp")]
    assert any("qcompile_cpu::intx_linear_dynamic_int8<4, 32, float" in s for s in sources)
    loaded = torch._inductor.aoti_load_package(path)
    for M in (1, 9):
        x = torch.randn(M, K)
        expected = torch.relu(_expected_dynamic_f64(x, packed, scale, model.bias, 4, 32))
        assert _relative_error(loaded(x), expected) < 1e-5


@pytest.mark.parametrize("query_length, rep, batch", [(1, 3, 1), (3, 2, 2), (37, 3, 2), (70, 1, 1)])
def test_decode_attention_kernel_replaces_flash_attention(query_length, rep, batch, monkeypatch):
    """A decode step's attention (few query rows, grouped KV heads, an additive mask with masked slots) becomes the
    generated decode kernel: visible in Inductor's code, within float32 rounding of a float64 softmax; a fully
    masked row is NaN, as softmax makes it. A prefill's (more rows than a decode step: the kernel's blocked,
    threaded path, rows not a multiple of its block) too, under a causal mask whose masked keys it skips, with a
    fully masked row inside a block and a whole block of them. (The pass takes it only where Inductor builds
    AVX-512; the kernel's scalar path is checked here on any CPU.)"""
    from torch.fx.experimental.proxy_tensor import make_fx
    from qcompile import _compat
    from qcompile.kernels.cpu import inductor_template
    from qcompile.passes.lower_cpu import attend_few_rows_cpu, attend_grouped_kv_heads_cpu

    monkeypatch.setattr(inductor_template, "has_vector_decode_attention", lambda: True)

    def attention(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, _repeat_kv(k, rep), _repeat_kv(v, rep),
                                                                attn_mask=mask, scale=0.125) * 2

    q = torch.randn(batch, 3 * rep, query_length, 64)
    prefill = query_length > 16
    slots = query_length + 30 if prefill else 40  # prefill: 67 and 100 keys, more than one of the kernel's 64-key tiles
    k, v = torch.randn(2, batch, 3, slots, 64).unbind(0)
    mask = torch.randn(1, 1, query_length, slots)
    mask[..., slots - 10:] = float("-inf")  # the static cache's unwritten slots
    mask[..., -1, :] = float("-inf") if query_length > 1 else mask[..., -1, :]
    if prefill:  # causal past key i + 2 for row i; rows 5 and 8-11 (a whole block of the kernel's 4) masked throughout
        mask.masked_fill_(torch.ones(query_length, slots, dtype=torch.bool).triu(3), float("-inf"))
        mask[..., [5, 8, 9, 10, 11], :] = float("-inf")
    with torch.no_grad():
        gm = make_fx(attention)(q, k, v, mask)
        COUNTS.clear()
        attend_grouped_kv_heads_cpu(gm, torch.device("cpu"))
        attend_few_rows_cpu(gm, torch.device("cpu"))
        gm.recompile()
    assert COUNTS["attention: prefill kernel (masked keys skipped)" if prefill
                  else "attention: decode kernel (few query rows)"] == 1
    kk, vv = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    expected = torch.softmax(q.double() @ kk.transpose(-1, -2) * 0.125 + mask.double(), dim=-1) @ vv * 2
    eager = gm(q, k, v, mask)  # the op's reference (eager, as the graph runs outside Inductor)
    compiled, (code,) = run_and_get_code(lambda: _compat.compile_fx(gm, [q, k, v, mask])(q, k, v, mask))
    assert "qcompile_cpu::decode_attention(" in code
    for out in (eager, compiled[0] if isinstance(compiled, (list, tuple)) else compiled):
        assert torch.equal(out.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert _relative_error(out[finite], expected[finite]) < 1e-5


def test_fused_cpu_ops_pass_gradients_as_their_references():
    """Compiled with grad mode on, the generated kernels run forward and the backward is their reference's
    gradient: the input's gradient matches eager's (float weights: close, not equal), through the decode-attention
    kernel and the weight-only GEMV alike; a compile under no_grad is not reused for a grad-mode call."""
    import qcompile
    from qcompile.kernels.cpu.inductor_template import has_vector_decode_attention

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(64, 256)
            self.register_buffer("k", torch.randn(1, 4, 16, 64))
            self.register_buffer("v", torch.randn(1, 4, 16, 64))

        def forward(self, x, mask):
            q = self.q(x).view(1, 1, 4, 64).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask)

    model, mask = Attend(), torch.zeros(1, 1, 1, 16)
    mask[..., 12:] = float("-inf")
    x = torch.randn(1, 1, 64, requires_grad=True)
    expected = torch.autograd.grad(model(x, mask).sum(), x)[0]
    options = {"scheme": "intx_weight_only", "bits": 8, "keep_float_weights": True}
    for first_no_grad in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="qcompile", options=options)
        if first_no_grad:
            with torch.no_grad():
                compiled(x, mask)
        COUNTS.clear()
        x_ = x.detach().clone().requires_grad_()
        compiled(x_, mask).sum().backward()
        assert COUNTS["attention: decode kernel (few query rows)"] == (1 if has_vector_decode_attention() else 0)
        assert COUNTS["intx_weight_only: lowered"] == 1
        assert x_.grad is not None and sqnr_db(expected, x_.grad) > 30, first_no_grad
