"""compile_blocks(): each decoder block and each linear outside the blocks compiled with backend="qcompile" —
every block quantized, also past Dynamo's recompile limit where the blocks get a graph each."""
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.quant.metrics import sqnr_db

LAYERS = 12  # more than Dynamo's default recompile limit (8 graphs per code object)


def test_every_block_of_a_transformers_llama_is_quantized():
    """transformers' decoder layers read their KV-cache slot by `layer_idx`: Dynamo makes a graph per layer. At the
    default recompile limit layers 9-12 ran eagerly, in float, with only Dynamo's warning."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits  # use_cache: the layers index their cache slots
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only"}, dynamic=False)
        out = model(ids).logits
    for i, layer in enumerate(model.model.layers):  # compiled and quantized: the float weights were released
        assert layer.mlp.down_proj.weight.untyped_storage().nbytes() == 0, f"layer {i} ran in float"
    assert isinstance(model.lm_head, torch._dynamo.eval_frame.OptimizedModule)
    assert model.lm_head._orig_mod.weight.untyped_storage().nbytes() == 0  # the head too (not tied here)
    assert 30 < sqnr_db(expected, out) < 80  # int8 weights' noise: quantized, and right


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="Sequential has no nn.ModuleList of blocks; pass blocks="):
        qcompile.compile_blocks(nn.Sequential(nn.Linear(4, 4)), {"scheme": "int8_weight_only"})


def test_torch_nn_blocks_are_refused():
    """torch.compile does not trace torch.nn's own forwards: such blocks would silently stay in float."""
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(TypeError, match="a block is torch.nn.Linear"):
        qcompile.compile_blocks(model, {"scheme": "int8_weight_only"})
