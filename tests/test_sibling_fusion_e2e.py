"""Sibling fusion through the whole backend (Inductor, CPU) on tiny transformers models: q/k/v and gate/up fuse,
and the model's output is as accurate as with fuse_siblings=False (a second compile, which finds its weights
quantized in the cache: the fused compile released the float weights)."""
import pytest
import torch

from qcompile.passes import fuse_siblings
from qcompile.quant.metrics import sqnr_db


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), {"use_cache": False}, lambda out: out.logits


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32)
    return BertModel(cfg).eval(), {}, lambda out: out.last_hidden_state


# per model: (fused groups, fused linears): Llama per layer q/k/v -> 1 and gate/up -> 1; BERT per layer q/k/v -> 1
CASES = {"llama": (tiny_llama, (4, 10)), "bert": (tiny_bert, (2, 6))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_siblings_fuse_in_a_tiny_transformers_model_as_accurate_as_unfused(name):
    make, (groups, linears) = CASES[name]
    model, kwargs, output = make()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        reference = output(model(ids, **kwargs))
        db = {}
        for fuse in (True, False):
            torch._dynamo.reset()
            fuse_siblings.COUNTS.clear()
            compiled = torch.compile(model, backend="qcompile",
                                     options={"scheme": "int8_dynamic", "fuse_siblings": fuse})
            db[fuse] = sqnr_db(reference, output(compiled(ids, **kwargs)))
            fused = (fuse_siblings.COUNTS["fused groups"], fuse_siblings.COUNTS["fused linears"])
            assert fused == ((groups, linears) if fuse else (0, 0)), f"fuse_siblings={fuse}: {fused}"
    assert 20 < db[True] < 200 and abs(db[True] - db[False]) < 0.5, db


def test_a_compile_with_fusion_is_not_reused_for_a_graph_without_it(monkeypatch):
    """The backend reuses a compile for graphs of the same structure only under the same options: a graph
    compiled with fuse_siblings=False after a fused one of the same structure gets its own, unfused compile."""
    from conftest import Siblings
    from qcompile import _compat
    from qcompile.backend import compile_quantized
    from qcompile.options import QuantOptions

    monkeypatch.setattr(_compat, "compile_fx", lambda gm, inputs, **settings: gm)  # the pass is the point
    results = []

    def backend(gm, example_inputs, **_):
        runs = [compile_quantized(gm, example_inputs, QuantOptions.from_dict(
            {"scheme": "int8_dynamic", "fuse_siblings": fuse, "keep_float_weights": True})) for fuse in (True, False)]
        results.extend(result for _, result in runs)
        return runs[0][0]

    with torch.no_grad():
        torch.compile(Siblings(), backend=backend)(torch.randn(4, 64))
    assert [len(r.fused) for r in results] == [2, 0]
