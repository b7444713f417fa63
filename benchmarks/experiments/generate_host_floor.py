"""Lab (issue 21): the host's floor of one transformers generate() decode step — a 2-layer Llama (hidden 64)
compiled as compile_blocks does it (each block compiled, each call of the model one CUDA-graph replay:
qcompile.step_graphs), vocab 128256 as Llama-3's (the logits generate() reads), static cache: per-step wall time is
then generate()'s own Python and launches plus ours, whatever the model. Parts timed by wrappers:
prepare_inputs_for_generation (4D mask creation apart), the forward (StepGraphs). Three runs, whose tokens must
agree: transformers' own mask creation and per-step stop check; qcompile.decode_masks' one-op decode-step mask;
that and qcompile.deferred_stop's one-step-late stop check (CUDA: the host's step work overlaps the GPU's previous
step — with this tiny model the GPU step is short, so the floor shows the host's own time).
(Session 16's run compiled nothing: its eager forward synchronized and StepGraphs captured no step.)

  python benchmarks/experiments/generate_host_floor.py [--steps 128] [--out FILE.json]
"""
import argparse
import functools
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import transformers.generation.utils as generation_utils
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qcompile.decode_masks import install_decode_step_masks  # noqa: E402
from qcompile.deferred_stop import install_deferred_stop_check  # noqa: E402
from qcompile.per_layer import compile_regions  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128256)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # as llama_e2e's transformers rows: random weights never stop
    compile_regions(model, list(model.model.layers), mode="reduce-overhead", dynamic=False)
    steps = model.forward  # StepGraphs
    cache = StaticCache(config=config, max_cache_len=32 + args.steps + 1)
    prompt = torch.randint(0, config.vocab_size, (1, 32), device=device)
    # transformers 5.2x renamed generate()'s past_key_values to cache (forward's signature says which it takes)
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    totals = {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def generate(n):
        cache.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **{cache_kwarg: cache})
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def measure(fast_masks: bool, deferred: bool = False) -> dict:
        model.__dict__.pop("create_masks_for_generate", None)
        model.__dict__.pop("generate", None)
        if fast_masks:
            install_decode_step_masks(model)
        if deferred:
            install_deferred_stop_check(model)
        totals.clear()
        with torch.no_grad():
            for n in (1, 2, 8, args.steps):
                generate(n)
            step_s = min(generate(args.steps) - generate(1) for _ in range(3)) / (args.steps - 1)
            tokens = tokens_of(args.steps)
            patched = [(model, "prepare_inputs_for_generation"), (generation_utils, "create_masks_for_generate"),
                       (model, "forward")]
            if fast_masks:
                patched.append((model, "create_masks_for_generate"))
            saved = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name in patched]
            for owner, name, fn, _ in saved:
                setattr(owner, name, timed(name, fn))
            try:
                generate(args.steps)
            finally:
                for owner, name, fn, own in saved:
                    if own:
                        setattr(owner, name, fn)
                    else:
                        delattr(owner, name)
        return {"step_us": round(step_s * 1e6, 1), "steps_per_s": round(1 / step_s, 1),
                "parts_us_per_step": {k: round(v / args.steps * 1e6, 1) for k, v in totals.items()},
                "tokens": tokens}

    def tokens_of(n):
        cache.reset()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, **{cache_kwarg: cache})
        return out[0, -n:].tolist()

    runs = {"transformers masks": measure(False), "decode_masks": measure(True),
            "decode_masks + deferred_stop": measure(True, deferred=True)}
    tokens = [run.pop("tokens") for run in runs.values()]
    same_tokens = all(t == tokens[0] for t in tokens)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              **runs, "same_tokens": same_tokens,
              "step_graphs": {"captures": steps.captures, "replays": steps.replays, "eager": steps.eager_calls}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
