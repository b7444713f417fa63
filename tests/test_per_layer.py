"""compile_blocks(): each decoder block and each linear outside the blocks compiled with backend="qcompile" —
every block quantized, also past Dynamo's recompile limit where the blocks get a graph each."""
import inspect

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import backend
from qcompile.quant.metrics import sqnr_db
from qcompile.step_graphs import StepGraphs

LAYERS = 12  # more than Dynamo's default recompile limit (8 graphs per code object)


def test_every_block_of_a_transformers_llama_is_quantized(monkeypatch):
    """transformers' decoder layers read their KV-cache slot by `layer_idx`: Dynamo makes a graph per layer. At the
    default recompile limit layers 9-12 ran eagerly, in float, with only Dynamo's warning. The graphs are alike
    but for their weights: the backend compiles one and binds it to each layer's own quantized weights."""
    compiles = []
    compile_graph = backend._compile_quantized
    monkeypatch.setattr(backend, "_compile_quantized", lambda *a: compiles.append(1) or compile_graph(*a))
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    h = torch.randn(3, 128)
    with torch.no_grad():
        expected = model(ids).logits  # use_cache: the layers index their cache slots
        down_expected = [layer.mlp.down_proj(h) for layer in model.model.layers]
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only"}, dynamic=False)
        out = model(ids).logits
        # each layer's linears still run eagerly, on their own quantized weights (qcompile/released.py), the
        # layers bound to the first one's compile included
        for want, layer in zip(down_expected, model.model.layers):
            assert 35 < sqnr_db(want, layer.mlp.down_proj(h)) < 80
    for i, layer in enumerate(model.model.layers):  # compiled and quantized: the float weights were released
        assert layer.mlp.down_proj.weight.untyped_storage().nbytes() == 0, f"layer {i} ran in float"
    assert isinstance(model.lm_head, torch._dynamo.eval_frame.OptimizedModule)
    assert model.lm_head._orig_mod.weight.untyped_storage().nbytes() == 0  # the head too (not tied here)
    assert 30 < sqnr_db(expected, out) < 80  # int8 weights' noise: quantized, and right (each layer its own)
    assert len(compiles) == 2  # one decoder layer's graph, bound to all 12, and the head's


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="Sequential has no nn.ModuleList of blocks; pass blocks="):
        qcompile.compile_blocks(nn.Sequential(nn.Linear(4, 4)), {"scheme": "int8_weight_only"})


def test_bad_options_fail_before_the_first_call():
    model = nn.Module()
    model.layers = nn.ModuleList(_Block() for _ in range(2))
    with pytest.raises(ValueError, match="no_such_scheme"):
        qcompile.compile_blocks(model, {"scheme": "no_such_scheme"})


def test_torch_nn_blocks_are_refused():
    """torch.compile does not trace torch.nn's own forwards: such blocks would silently stay in float."""
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(TypeError, match="a block is torch.nn.Linear"):
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only"})


def test_with_cuda_graphs_each_call_of_the_model_is_captured_whole(monkeypatch):
    """cudagraphs: the blocks compile without CUDA graphs of their own and the model's calls go through one
    StepGraphs (a graph per call signature on CUDA); on the CPU they run eagerly, with the warning."""
    block_options = []
    compile_block = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: (block_options.append(kw["options"]),
                                                                   compile_block(self, **kw))[1])
    model = _Stack(3)
    with pytest.warns(UserWarning, match="cudagraphs applies to CUDA graphs only; _Stack's parameters are on cpu"):
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only", "cudagraphs": True})
        steps = model.forward
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only", "cudagraphs": True})
    assert isinstance(steps, StepGraphs) and model.forward is steps  # one StepGraphs however often asked
    assert block_options == [{"scheme": "int8_weight_only"}] * 6
    with torch.no_grad():
        model(torch.randn(2, 16))
        model(torch.randn(2, 16))
    assert (steps.eager_calls, steps.captures, steps.replays) == (2, 0, 0)


class _Stack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(n))
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.gpu
def test_transformers_generate_replays_one_cuda_graph_per_step():
    """transformers' generate() with a static cache over a model compiled block by block with CUDA graphs: each
    decode step after the first three replays one captured graph (no recompile), and the tokens are those of the
    model compiled the same way without CUDA graphs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    tokens, new_tokens = [], 12
    for cudagraphs in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval().cuda().bfloat16()
        model.generation_config.eos_token_id = None
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only", "cudagraphs": cudagraphs}, dynamic=False)
        prompt = torch.arange(1, 9, device="cuda")[None]
        cache = transformers.StaticCache(config=config, max_cache_len=32)
        # transformers 5.2x renamed generate()'s past_key_values to cache (forward's signature says which it takes)
        cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, **{cache_kwarg: cache})
        tokens.append(out.tolist())
    steps = model.forward
    assert isinstance(steps, StepGraphs) and steps.captures == 1, vars(steps)
    # 11 decode calls: the first compiles (eager; its syncs are the compile's, so it cannot vouch for the step), the
    # second runs eagerly as the clean check (no compile, no sync), the third is captured and replayed, the rest replay
    assert steps.replays == new_tokens - 3
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_transformers_generate_gives_the_float_models_greedy_tokens(scheme):
    """generate() with a static cache over a tiny transformers Llama compiled block by block: the greedy tokens of
    the float model, no recompile across the decode steps, and one Dynamo trace for all blocks (block_views: they
    differ only by `layer_idx`, which reads as the module's own outside a compiled call). A small vocabulary and
    weights drawn at initializer_range 0.05 make each step's best token lead the next by more than twice int8's
    error on any logit — checked, so a failure is the compile's, not a near-tie's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 32, (1, 6))
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def generate():
        cache = transformers.StaticCache(config=config, max_cache_len=16)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **{cache_kwarg: cache})

    counters = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        expected = generate()
        torch._dynamo.reset()
        qcompile.compile_blocks(model, {"scheme": scheme}, dynamic=False)
        before = counters["unique_graphs"]
        got = generate()
        compiled = counters["unique_graphs"] - before
        again = generate()
    float_logits, quantized_logits = torch.cat(expected.logits), torch.cat(got.logits)
    top2 = float_logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * (quantized_logits - float_logits).abs().max()  # no near-ties
    assert got.sequences.tolist() == expected.sequences.tolist() == again.sequences.tolist()
    assert counters["unique_graphs"] == before + compiled  # 8 more steps, no recompile
    assert compiled <= 4, compiled  # a block and the LM head, for the prompt and a decode step (was 2 x 2 + 2)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


def test_a_head_tied_to_the_embedding_keeps_the_embeddings_float_weight():
    """The LM head shares its weight with the embedding (SmolLM2, Llama 3.2): compile_blocks quantizes the head but
    keeps the float storage the eager embedding reads (releasing it crashed the next lookup)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    original = embedding.detach().clone()
    prompt = torch.randint(0, 64, (1, 6))
    qcompile.compile_blocks(model, {"scheme": "int8_weight_only"}, dynamic=False)
    with torch.no_grad():
        first = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0).tolist() == first.tolist()
    assert torch.equal(model.model.embed_tokens.weight, original)
