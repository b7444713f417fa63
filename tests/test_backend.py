"""The backend end to end through Inductor on CPU: every scheme, real transformers models, recompiles,
options errors, and what happens to the float weights."""
import subprocess
import sys
import uuid
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.backend import compile_quantized, qcompile_backend
from qcompile.options import QuantOptions
from qcompile.quant.metrics import sqnr_db

from conftest import Projection

# output SQNR (dB) of one Gaussian 512 -> 256 linear: the scheme's own noise, measured once and kept as a window
GAUSSIAN_SQNR_DB = {
    "int8_weight_only": 42.5, "int8_dynamic": 39.5, "float8_weight_only": 31.6, "float8_dynamic": 28.6,
    "int4_weight_only": 20.0, "float8_dynamic_int4": 18.8, "int8_dynamic_int4": 21.8, "intx_weight_only": 45.1,
    "int8_dynamic_intx": 40.9, "codebook": 19.8, "mxfp8": 28.6, "nvfp4": 17.5,
}


def compile_with(model, options):
    return torch.compile(model, backend="qcompile", options=options)


@pytest.mark.parametrize("scheme", sorted(GAUSSIAN_SQNR_DB))
def test_each_scheme_adds_its_own_noise_on_a_gaussian_layer(scheme):
    lin = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        lin.weight.normal_()
    x = torch.randn(64, 512)
    with torch.no_grad():
        ref = lin(x)
        out = compile_with(lin, {"scheme": scheme})(x)
    expected = GAUSSIAN_SQNR_DB[scheme]
    assert expected - 1.5 < sqnr_db(ref, out) < expected + 1.5  # not "no change", not much worse


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(dtype)


# logits SQNR floors on the tiny random Llama (measured ~6 dB above each)
LLAMA_FLOOR_DB = {
    "int8_weight_only": 30, "int8_dynamic": 28, "float8_weight_only": 20, "float8_dynamic": 17,
    "int4_weight_only": 9, "float8_dynamic_int4": 7, "int8_dynamic_int4": 10, "intx_weight_only": 30,
    "int8_dynamic_intx": 28, "codebook": 9, "mxfp8": 17, "nvfp4": 6,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", sorted(LLAMA_FLOOR_DB))
def test_every_scheme_on_a_tiny_transformers_llama(scheme, dtype):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 256, (2, 16))
    results = []

    def backend(gm, example_inputs, **_):
        run, result = compile_quantized(gm, example_inputs, QuantOptions.from_dict({"scheme": scheme}))
        results.append(result)
        return run

    with torch.no_grad():
        ref = model(ids).logits.float()
        out = torch.compile(model, backend=backend)(ids).logits.float()
    assert sum(len(r.quantized) for r in results) == 8  # 7 linears in the layer + the tied lm_head
    # q/k/v and gate/up fuse, except where a per-tensor scale or codebook keeps the weights apart
    assert sum(len(r.fused) for r in results) == (0 if scheme in ("codebook", "nvfp4") else 2)
    db = sqnr_db(ref, out)
    floor = LLAMA_FLOOR_DB[scheme] - (3 if dtype == torch.bfloat16 else 0)
    assert floor < db < 200, f"{scheme} {dtype}: {db:.1f} dB"


def test_bert_encoder_linears_are_all_matched():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    _, results = _capture(model, (torch.randint(0, 100, (2, 12)),), {"scheme": "int8_dynamic"})
    names = sorted(r.module for res in results for r in res.quantized)
    assert len(names) == 13  # 2 x (q, k, v, attention out, intermediate, output) + pooler
    assert "pooler.dense" in names and "encoder.layer.1.attention.self.query" in names


def _capture(model, args, options):
    from conftest import run_pass
    return run_pass(model, args, options)


def test_no_recompile_per_batch_size_or_repeated_call():
    calls = []

    def backend(gm, example_inputs, **_):
        calls.append(1)
        return qcompile_backend(gm, example_inputs, options={"scheme": "int8_dynamic", "keep_float_weights": True})

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (2, 3, 4, 7, 9, 9, 9):
            x = torch.randn(batch, 32)
            assert sqnr_db(model(x), compiled(x)) > 25
    assert len(calls) == 2  # the first shape, then one dynamic-batch graph for every later size


def test_bad_options_name_the_problem():
    model = nn.Linear(32, 32)
    with pytest.raises(Exception, match="unknown scheme 'int3'.*valid schemes"):
        compile_with(model, {"scheme": "int3"})(torch.randn(2, 32))
    with pytest.raises(ValueError, match="group_size=48 is not valid.*32, 64, 128, 256"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "group_size": 48})
    with pytest.raises(ValueError, match="unknown qcompile option.*'groupsize'"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "groupsize": 32})
    with pytest.raises(ValueError, match="'bits' does not apply to scheme 'int8_dynamic'"):
        QuantOptions.from_dict({"scheme": "int8_dynamic", "bits": 4})
    with pytest.raises(ValueError, match="bits=9 is not valid"):
        QuantOptions.from_dict({"scheme": "intx_weight_only", "bits": 9})
    with pytest.raises(ValueError, match="activation_quantization='fused' is not valid"):
        QuantOptions.from_dict({"scheme": "int8_dynamic", "activation_quantization": "fused"})
    with pytest.raises(ValueError, match="'graph' does not apply to scheme 'int4_weight_only'.*float8_dynamic"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "activation_quantization": "graph"})
    with pytest.raises(ValueError, match="needs options"):
        QuantOptions.from_dict(None)
    assert QuantOptions.from_dict({"scheme": "Int4WeightOnlyConfig"}).scheme == "int4_weight_only"
    assert QuantOptions.from_dict({"scheme": "intx_weight_only"}).group_size == 32


def test_unfit_layer_stays_float_with_a_named_warning():
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(3, 96)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = model(x)
        out = compile_with(model, {"scheme": "int4_weight_only", "group_size": 64})(x)
    msgs = [str(w.message) for w in caught if "qcompile" in str(w.message)]
    assert msgs == ["qcompile: linear '0' (64x96) stays in float for scheme 'int4_weight_only': in_features=96 is "
                    "not divisible by group_size=64 (group_size 32 would fit)"]
    assert 15 < sqnr_db(ref, out) < 60


def test_float_weights_are_released_after_compiling():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        compiled = compile_with(model, {"scheme": "int8_weight_only"})
        first = compiled(x)
        assert model[0].weight.untyped_storage().nbytes() == 0  # quantized: float storage freed
        assert model[0].bias.untyped_storage().nbytes() > 0  # biases stay float and in use
        assert model[0].weight.shape == (64, 64)
        # later calls and a recompile for a new shape still work from the cached quantized weights
        assert torch.equal(compiled(x), first)
        out3d = compiled(torch.randn(2, 3, 64))
        assert out3d.shape == (2, 3, 64)
    assert sqnr_db(ref, first) > 35


def test_keep_float_weights_keeps_them():
    model = nn.Linear(64, 64)
    with torch.no_grad():
        compile_with(model, {"scheme": "int8_weight_only", "keep_float_weights": True})(torch.randn(2, 64))
        assert model.weight.untyped_storage().nbytes() == 64 * 64 * 4
        model(torch.randn(2, 64))


def test_backend_name_works_without_importing_qcompile():
    code = ("import torch\n"
            "m = torch.nn.Linear(32, 16)\n"
            "with torch.no_grad():\n"
            "    y = torch.compile(m, backend='qcompile', options={'scheme': 'int8_dynamic'})(torch.randn(2, 32))\n"
            "import sys; assert 'qcompile' in sys.modules and y.shape == (2, 16); print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    assert qcompile.qcompile_backend is qcompile_backend


@pytest.mark.parametrize("scheme", sorted(GAUSSIAN_SQNR_DB))
def test_nan_and_inf_inputs_propagate_to_their_tokens_only(scheme):
    lin = nn.Linear(128, 64)
    x = torch.randn(4, 128)
    x[1, 7] = float("nan")
    x[2, 100] = float("inf")
    with torch.no_grad():
        out = compile_with(lin, {"scheme": scheme, "group_size": 32} if qcompile.get_scheme(scheme).group_sizes
                           else {"scheme": scheme})(x)
    assert not torch.isfinite(out[1]).all() and not torch.isfinite(out[2]).all()
    if scheme != "nvfp4":  # nvfp4's per-tensor activation scale is shared by every token, as in torchao
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()


def test_weights_mapped_from_a_file_are_left_alone(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Linear(64, 64)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    model.load_state_dict(load_file(tmp_path / "w.safetensors"), assign=True)  # mmapped, not resizable
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
        out = compile_with(model, {"scheme": "int8_weight_only"})(x)
    assert sqnr_db(ref, out) > 35 and model.weight.untyped_storage().nbytes() > 0


@pytest.mark.parametrize("keep_float_weights", [True, False])
def test_instances_sharing_one_graph_each_run_their_own_weights(keep_float_weights):
    """Dynamo serves every instance of a module class from one graph (parameters are inputs): each instance must
    still be multiplied by its own quantized weights, and quantized once."""
    blocks = [Projection() for _ in range(3)]
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = [b(x) for b in blocks]
        options = {"scheme": "int8_weight_only", "keep_float_weights": keep_float_weights}
        compiled = [torch.compile(b, backend="qcompile", options=options) for b in blocks]
        for _ in range(2):  # the second round takes the per-instance tensors from the cache
            for c, e in zip(compiled, expected):
                assert sqnr_db(e, c(x)) > 35
    for b in blocks:
        assert (b.proj.weight.untyped_storage().nbytes() == 0) != keep_float_weights


def test_instances_sharing_a_gptq_graph_is_an_error():
    blocks = [Projection() for _ in range(2)]
    x = torch.randn(4, 128)
    options = {"scheme": "int4_weight_only", "group_size": 32, "algorithm": "gptq", "calibration": [(x,)],
               "keep_float_weights": True}
    with torch.no_grad():
        torch.compile(blocks[0], backend="qcompile", options=options)(x)
        with pytest.raises(RuntimeError, match="another module instance.*calibration"):
            torch.compile(blocks[1], backend="qcompile", options=options)(x)


def test_int8_dynamic_at_batch_one():
    """A single token (decode): Inductor lays the quantized row out with stride 0, which ATen's CPU _int_mm
    misreads unless the op guards against it."""
    model = nn.Linear(256, 64)
    x = torch.randn(1, 256)
    with torch.no_grad():
        out = compile_with(model, {"scheme": "int8_dynamic", "keep_float_weights": True})(x)
        assert sqnr_db(model(x), out) > 30


@pytest.mark.parametrize("scheme", [name for name in qcompile.SCHEMES
                                    if qcompile.get_scheme(name).rows_independent(QuantOptions.from_dict(
                                        {"scheme": name}))])
def test_large_weights_quantized_in_row_blocks_give_the_same_tensors(scheme, monkeypatch):
    """A scheme that declares its rows independent gets the same tensors when the backend quantizes a large weight
    in blocks of rows (bounding float32 temporaries) as from one call: the declaration is checked, not trusted."""
    from qcompile import backend

    options = QuantOptions.from_dict({"scheme": scheme})
    w = (torch.randn(96, 256) * torch.linspace(0.1, 3.0, 96)[:, None]).to(torch.bfloat16)  # rows of unlike ranges
    whole = backend._quantize_in_row_blocks(w, options, ())
    monkeypatch.setattr(backend, "ROW_BLOCK_ELEMENTS", 40 * 256)  # blocks of 40 rows: 40, 40, 16
    blocks = backend._quantize_in_row_blocks(w, options, ())
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), f"{scheme}: {name}"


def _aot_cache_hits_of_a_fresh_compile(hidden: int) -> int:
    """Compiles a small model from scratch (Dynamo reset), returns how many AOTAutograd cache hits that added."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    hits = counters["aot_autograd"]["autograd_cache_hit"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 32)).eval()
    with torch.no_grad():
        torch.compile(model, backend="qcompile", options={"scheme": "int8_weight_only"})(torch.randn(3, 64))
    return counters["aot_autograd"]["autograd_cache_hit"] - hits


def test_a_second_compile_of_the_same_model_hits_aotautograds_cache():
    """AOTAutograd's cache key pickles the graph module handed to it: our aten trace must not carry make_fx's
    ShapeEnv (it pickled differently every time, so every warm compile retraced the whole graph)."""
    _aot_cache_hits_of_a_fresh_compile(64)
    assert _aot_cache_hits_of_a_fresh_compile(64) == 1


def test_an_edited_kernel_misses_aotautograds_cache(monkeypatch):
    """AOTAutograd's cache key covers Inductor's config, our kernel-source stamp pass included: a graph compiled
    with other kernel or reference-op sources is not served."""
    from qcompile import _compat

    _aot_cache_hits_of_a_fresh_compile(48)
    edited = f"edited kernels {uuid.uuid4()}".encode()  # new every run: Inductor's cache outlives the test session
    monkeypatch.setattr(_compat, "_kernel_sources_hash", lambda: edited)
    assert _aot_cache_hits_of_a_fresh_compile(48) == 0


def test_a_graph_compiled_without_autotuning_does_not_serve_a_tuning_compile(monkeypatch):
    """A cached graph carries the kernel configs chosen when it was compiled: one compiled with the autotuner off
    must miss the cache of a compile that tunes (and the other way round), or that compile tunes nothing."""
    from qcompile import _compat

    fresh = f"kernels {uuid.uuid4()}".encode()  # both compiles new to Inductor's cache, which outlives the session
    monkeypatch.setattr(_compat, "_kernel_sources_hash", lambda: fresh)
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    _aot_cache_hits_of_a_fresh_compile(40)
    assert _aot_cache_hits_of_a_fresh_compile(40) == 1
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    assert _aot_cache_hits_of_a_fresh_compile(40) == 0


def test_nested_compile_regions_are_inlined_with_each_sites_weights():
    """A model whose blocks are `torch.compiler.nested_compile_region`s (Dynamo traces one body and calls it at
    every block): each block's linears quantize with their own weights and keep their own module names, with a
    warning that the region is inlined (it crashed in Inductor before)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 64)

        @torch.compiler.nested_compile_region
        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(3)]).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        with pytest.warns(UserWarning, match="nested_compile_region regions; they are inlined"):
            report = qcompile.diff(model, (x,), {"scheme": "int8_weight_only"})
        out = torch.compile(model, backend="qcompile", options={"scheme": "int8_weight_only"})(x)
    assert [layer.module for layer in report.layers] == [f"{i}.{name}" for i in range(3) for name in ("up", "down")]
    assert 35 < sqnr_db(expected, out) < 80  # int8 weights' noise: quantized, and right


@pytest.mark.parametrize("scheme", ["int8_dynamic", "float8_dynamic"])
def test_grad_mode_compile_gives_the_reference_graphs_gradients(scheme):
    """Compiled with grad mode on, a dynamic scheme after an activation function backpropagates as its reference
    ops do eagerly (Inductor used to fuse the activation's quantization into the GELU at float32 precision, and the
    amax's backward, matching the saved max against the saved bf16 activation, returned NaN)."""
    from qcompile.backend import quantize_graph

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).to(torch.bfloat16)
    options = {"scheme": scheme, "keep_float_weights": True}
    opts = QuantOptions.from_dict(options)

    def eager_reference(gm, example_inputs, **_):  # the quantized graph, its reference ops run eagerly
        result, _, kept = quantize_graph(gm, example_inputs, opts)
        constants = [t for _, t in result.constants]
        return lambda *args: result.gm(*([args[i] for i in kept] + constants))

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    upstream = torch.randn(4, 64)
    grads = []
    for backend in (eager_reference, "qcompile"):
        torch._dynamo.reset()
        x_ = x.clone().requires_grad_()
        compiled = torch.compile(model, backend=backend, **({"options": options} if backend == "qcompile" else {}))
        (compiled(x_).float() * upstream).sum().backward()
        grads.append((x_.grad.double(), model[0].bias.grad.double()))
        model.zero_grad()
    (x_ref, bias_ref), (x_grad, bias_grad) = grads
    assert torch.isfinite(x_grad).all() and torch.isfinite(bias_grad).all()
    # float8's reference gradient runs through the e4m3 cast (a coarse grid): one rounding step apart is loud
    bound = 25 if scheme == "int8_dynamic" else 8
    assert sqnr_db(x_ref, x_grad) > bound and sqnr_db(bias_ref, bias_grad) > bound
