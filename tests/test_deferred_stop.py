"""deferred_stop: generate() reading its stop flag one step late (transformers' DeferredStopCheck, enabled by
qcompile/deferred_stop.py for an installed model) gives the same tokens and leaves a handed-back static cache as the
per-step check does — at a max-length stop (no extra step) and at an EOS only the device knew (one extra step,
undone). On CPU, where torch has no events, the test's events are no-ops: CPU tensor ops finish before they return."""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from qcompile import deferred_stop  # noqa: E402

if deferred_stop._deferred_stop_check() is None:
    pytest.skip("this transformers has no DeferredStopCheck", allow_module_level=True)


class _HostEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def host_events(monkeypatch):
    monkeypatch.setattr(torch, "Event", _HostEvent)


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _run(model, prompt, new_tokens, eos=None):
    """generate() over a fresh user StaticCache: (tokens, forward calls, the cache handed back)."""
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 2)
        cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=eos, **{cache_kwarg: cache})
    finally:
        del model.forward
    return out, len(calls), cache


@pytest.mark.parametrize("static_layers_crop", [True, False], ids=["transformers-crops", "qcompile-rolls-back"])
def test_deferred_generate_gives_the_same_tokens_and_cache(host_events, monkeypatch, static_layers_crop):
    # transformers 5.2x crops a StaticLayer itself (is_croppable); 5.17 cannot, and deferred_stop rolls it back
    from transformers.cache_utils import StaticLayer
    monkeypatch.setattr(StaticLayer, "is_croppable", static_layers_crop)
    model = _tiny_llama()
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    reference, reference_calls, _ = _run(model, prompt, 12)
    new = reference[0, 6:].tolist()
    stop_at = next(i for i in range(3, len(new)) if new[i] not in new[:i])  # a token not generated before it
    eos = new[stop_at]
    eos_reference, eos_calls, eos_cache = _run(model, prompt, 12, eos=eos)
    assert eos_reference.shape[1] == 6 + stop_at + 1

    assert deferred_stop.install_deferred_stop_check(model, device_types=("cpu",))
    assert deferred_stop.install_deferred_stop_check(model, device_types=("cpu",))  # once: the wrapper stays
    out, calls, _ = _run(model, prompt, 12)
    assert torch.equal(out, reference) and calls == reference_calls  # max length: decided on the host, no extra step
    out, calls, cache = _run(model, prompt, 12, eos=eos)
    assert torch.equal(out, eos_reference)
    assert calls == eos_calls + 1  # the step queued before the EOS was read: run, then undone
    length = int(eos_cache.get_seq_length())
    assert int(cache.get_seq_length()) == length  # rolled back
    for ours, theirs in zip(cache.layers, eos_cache.layers):
        assert torch.equal(ours.keys[:, :, :length], theirs.keys[:, :, :length])
        assert torch.equal(ours.values[:, :, :length], theirs.values[:, :, :length])


def test_other_devices_and_models_keep_the_per_step_check(host_events):
    model = _tiny_llama()
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    deferred_stop.install_deferred_stop_check(model)  # CUDA only: this CPU model keeps transformers' check
    _, calls, _ = _run(model, prompt, 8, eos=int(_run(model, prompt, 8)[0][0, 9]))
    plain = _tiny_llama()
    _, plain_calls, _ = _run(plain, prompt, 8, eos=int(_run(plain, prompt, 8)[0][0, 9]))
    assert calls == plain_calls  # no extra step: not deferred
    check = deferred_stop._deferred_stop_check()
    assert not check.is_supported(torch.device("cpu"), None, False, False)  # outside an installed generate()
    assert not deferred_stop.install_deferred_stop_check(torch.nn.Linear(2, 2))
