"""decode_masks: generate()'s decode-step 4D mask in one op (qcompile/decode_masks.py), against transformers' own
create_masks_for_generate on every call of a real generate() — left padding, batch 2 — and the calls it leaves to
transformers."""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402
from transformers import masking_utils  # noqa: E402

from qcompile.decode_masks import install_decode_step_masks  # noqa: E402


def _tiny_llama(**config):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa", **config)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def test_the_decode_step_mask_is_transformers_own_and_generate_gives_the_same_tokens():
    model = _tiny_llama()
    assert install_decode_step_masks(model) and not install_decode_step_masks(model)  # once
    ours = model.create_masks_for_generate
    calls = []

    def compared(config, inputs_embeds, attention_mask, *args, **kwargs):
        theirs = masking_utils.create_masks_for_generate(config, inputs_embeds, attention_mask, *args, **kwargs)
        mine = ours(config, inputs_embeds, attention_mask, *args, **kwargs)
        calls.append(inputs_embeds.shape[1])
        assert type(mine) is type(theirs)
        if isinstance(theirs, torch.Tensor):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)
        return mine

    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    prompt = torch.randint(1, 256, (2, 8))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    prompt[1, :3] = 0
    outputs = []
    for masks in (compared, None):
        if masks is None:
            del model.create_masks_for_generate  # transformers' own
        else:
            model.create_masks_for_generate = masks
        cache = StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            outputs.append(model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                          pad_token_id=0, **{cache_kwarg: cache}))
    assert calls == [8] + [1] * 9  # the prompt's call (transformers' own) and nine decode steps
    assert torch.equal(outputs[0], outputs[1])


def test_models_it_does_not_fit_keep_transformers_masks():
    assert not install_decode_step_masks(_tiny_llama(sliding_window=16))
    eager = _tiny_llama()
    eager.config._attn_implementation = "eager"  # additive float masks: not this one-op form
    assert not install_decode_step_masks(eager)
    assert "create_masks_for_generate" not in vars(eager)
