"""Can transformers' forward be captured whole as one CUDA graph (qcompile.step_graphs) on this machine's versions?

    python benchmarks/experiments/step_capture_probe.py

A tiny LlamaForCausalLM (bf16, CUDA) under generate() with a static cache, its forward wrapped in StepGraphs:
eager, then compiled block by block with qcompile (int8 weight-only). Prints what StepGraphs did (captures, replays,
eager calls, warnings), whether the tokens match the uncaptured model's, and every host synchronization the
forward makes (torch.cuda.set_sync_debug_mode): a sync inside the forward is what makes a capture fail.

    python benchmarks/experiments/step_capture_probe.py --where int4_weight_only 4

--where SCHEME LAYERS: an 8B-shaped model of LAYERS layers built as llama_e2e builds it, compiled block by block,
four generate() calls of two tokens on one static cache, StepGraphs' state after each (compiles, captures, why a
signature stays eager), and every capture traced function by function: prints the first Python call or return
after which the stream is no longer capturing (what voided a capture).
"""
import inspect
import warnings

import torch
import transformers

import qcompile
from qcompile import _compat
from qcompile.step_graphs import StepGraphs, capture_steps


def build(seed=0):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval().cuda().bfloat16()
    model.generation_config.eos_token_id = None
    model.generation_config.disable_compile = True
    return model, config


def generate(model, config, new_tokens=10):
    prompt = torch.arange(1, 9, device="cuda")[None]
    cache = transformers.StaticCache(config=config, max_cache_len=32)
    kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **{kwarg: cache}).tolist()


def syncs_in_forward(model, config):
    prompt = torch.arange(1, 9, device="cuda")[None]
    cache = transformers.StaticCache(config=config, max_cache_len=32)
    kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    forward = model.__dict__.get("forward")
    fn = forward.fn if isinstance(forward, StepGraphs) else model.forward
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(prompt, **{kwarg: cache})
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        fn(prompt[:, :1], **{kwarg: cache})
        torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in caught if "synchroniz" in str(w.message)})


def where_capture_breaks(scheme: str, layers: int) -> None:
    import sys
    sys.path.insert(0, "benchmarks")
    import llama_model

    config = llama_model.LlamaConfig(**{**llama_model.LLAMA_3_1_8B.__dict__, "n_layers": layers})
    options = {"scheme": scheme, "cudagraphs": True, **({"group_size": 128} if "int4" in scheme else {})}
    model = llama_model.build_transformers(config, torch.device("cuda"), torch.bfloat16, seed=0,
                                           quantize=lambda m: qcompile.prepare(m, options, "cuda", progress=False))
    model.generation_config.eos_token_id = None
    qcompile.compile_blocks(model, options, dynamic=False)
    steps = model.forward
    cache = llama_model.transformers_static_cache(model, 1, 64)
    kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    prompt = torch.randint(0, 1000, (1, 32), device="cuda")
    events, first_bad = [], []

    def profile(frame, event, arg):
        if first_bad or event not in ("call", "return", "c_call", "c_return"):
            return
        name = f"{event} {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
        if event.startswith("c_"):
            name += f" [{getattr(arg, '__qualname__', arg)}]"
        if not torch.cuda.is_current_stream_capturing():
            first_bad.append(name)
        else:
            events.append(name)
            del events[:-12]

    real = steps.fn

    def traced(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            sys.setprofile(profile)
            try:
                return real(*args, **kwargs)
            finally:
                sys.setprofile(None)
        return real(*args, **kwargs)

    steps.fn = traced
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for attempt in range(4):  # the prompt's forward: eager until clean, then captured, then replayed
            compiles = _compat.dynamo_compile_count()
            cache.reset()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                           pad_token_id=0, **{kwarg: cache})
            print(f"generate {attempt}: graphs compiled {_compat.dynamo_compile_count() - compiles}, captures "
                  f"{steps.captures}, replays {steps.replays}, eager {steps.eager_calls}, ready {len(steps.ready)}, "
                  f"uncapturable {list(steps.uncapturable.values())}")
    print(f"{scheme} x {layers} layers: captures {steps.captures}, uncapturable {steps.uncapturable}")
    for w in caught:
        print("   warning:", str(w.message)[:300])
    print("   first event outside capture:", first_bad[:1])
    print("   the events before it:\n     " + "\n     ".join(events))


def main():
    import sys
    if sys.argv[1:2] == ["--where"]:
        return where_capture_breaks(sys.argv[2], int(sys.argv[3]))
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    model, config = build()
    reference = generate(model, config)
    for label, prepare in (("eager", lambda m: None),
                           ("compile_blocks int8_weight_only",
                            lambda m: qcompile.compile_blocks(m, {"scheme": "int8_weight_only"}, dynamic=False))):
        torch._dynamo.reset()
        model, config = build()
        prepare(model)
        expected = generate(model, config) if label != "eager" else reference
        steps = capture_steps(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = generate(model, config)
        print(f"{label}: captures {steps.captures}, replays {steps.replays}, eager {steps.eager_calls}, "
              f"uncapturable {steps.uncapturable}, tokens equal: {tokens == expected}")
        for w in caught:
            if "qcompile" in str(w.message):
                print("   warning:", str(w.message)[:300])
        for line in syncs_in_forward(model, config):
            print("   sync:", line)
    print("random after all:", torch.randn(2, device="cuda").isfinite().all().item())


if __name__ == "__main__":
    main()
