"""Lab: where a transformers generate() decode step's time goes on the GPU (issue 21): the Llama 8B shapes under
qcompile int4 with per-layer compile and one CUDA graph per step, profiled over generate(); per step: wall time
between graph launches, GPU time of the kernels in it (busy), the host's time from generate()'s per-step sync to
the next launch (the GPU idles through it), and the kernels by total time.

  python benchmarks/experiments/hf_step_profile.py [--batches 1,128] [--rows transformers] [--out FILE.json]
"""
import argparse
import collections
import functools
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_e2e  # noqa: E402
import llama_model  # noqa: E402


def profile_generate(model, batch: int, steps: int, prompt_len: int = 32, cache_len: int = 288) -> dict:
    """cache_len: llama_e2e's decode phases attend 32 + 256 slots."""
    cache = llama_model.transformers_static_cache(model, batch, max(cache_len, prompt_len + steps + 1))
    # transformers 5.2x renamed generate()'s past_key_values to cache (forward's signature says which it takes)
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=model.device)

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def generate(n):
        cache.reset()
        sync()
        t = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **{cache_kwarg: cache})
        sync()
        return time.perf_counter() - t

    with torch.no_grad():
        first = time.perf_counter()
        generate(1), generate(2), generate(steps)
        first = time.perf_counter() - first
        one = min(generate(1) for _ in range(3))
        full = min(generate(steps) for _ in range(3))
        host = host_breakdown(model, lambda: generate(steps), steps) if model.device.type == "cuda" or FORCE else {}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            generate(steps)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sorted(e.time_range.start for e in events if e.name == "cudaGraphLaunch")
    per_step = []
    for a, b in zip(launches, launches[1:]):
        inside = [k for k in kernels if a <= k.time_range.start < b]
        busy = sum(k.time_range.elapsed_us() for k in inside)
        span = (max(k.time_range.end for k in inside) - min(k.time_range.start for k in inside)) if inside else 0
        per_step.append((b - a, busy, span, len(inside)))
    per_step = per_step[2:]  # past the prompt
    # the host's share: from the end of the sync generate() does every step (its stop check reads a device flag)
    # to the next graph launch, the GPU has nothing queued
    syncs = sorted(e.time_range.end for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    gaps = []
    for launch in launches[3:]:
        before = [end for end in syncs if end <= launch]
        if before:
            gaps.append(launch - before[-1])
    n = max(len(per_step), 1)
    mean = lambda i: round(sum(s[i] for s in per_step) / n, 1)  # noqa: E731
    return {"batch": batch, "tok_s": round(batch * (steps - 1) / (full - one), 1), "warm_up_s": round(first, 1),
            "graph_launches": len(launches), "step_wall_us": mean(0), "step_gpu_busy_us": mean(1),
            "step_gpu_span_us": mean(2), "kernels_per_step": mean(3),
            "host_gap_after_sync_us": round(sum(gaps) / max(len(gaps), 1), 1), "host_us_per_step": host,
            "top_kernels_us_per_step": kernel_table(kernels, steps)}


FORCE = False


def host_breakdown(model, generate, steps: int) -> dict:
    """Host time per decode step of generate() by part, timed by wrappers (no profiler): transformers'
    prepare_inputs_for_generation (its 4D mask creation apart), the model call up to the graph replay (StepGraphs'
    signature, input copies, replay launch), and where generate() synchronizes with the host (sync debug mode)."""
    import warnings
    import transformers.generation.utils as generation_utils
    from qcompile import step_graphs
    totals = collections.Counter()

    def timed(name, fn):
        @functools.wraps(fn)  # generate() reads prepare_inputs_for_generation's signature
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] += time.perf_counter() - start
        return wrapper

    patches = [(model, "prepare_inputs_for_generation"), (generation_utils, "create_masks_for_generate"),
               (step_graphs, "_signature_of_leaves"), (step_graphs._Captured, "replay"),
               (step_graphs.StepGraphs, "__call__"), (model, "_update_model_kwargs_for_generation")]
    saved = [(owner, name, owner.__dict__.get(name, None), getattr(owner, name)) for owner, name in patches]
    for owner, name, _, fn in saved:
        setattr(owner, name, timed(name, fn))
    syncs = collections.Counter()
    try:
        wall = time.perf_counter()
        generate()
        wall = time.perf_counter() - wall
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchronizing" in str(w.message):
                syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    finally:
        for owner, name, own, _ in saved:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
    per_step = {name: round(t / 2 / steps * 1e6, 1) for name, t in totals.items()}  # two generate() calls
    per_step["generate_wall"] = round(wall / steps * 1e6, 1)
    per_step["syncs_per_step"] = {k: round(v / steps, 2) for k, v in syncs.most_common(8)}
    return per_step


def kernel_table(kernels, steps: int) -> list:
    by_name, counts = collections.Counter(), collections.Counter()
    for k in kernels:
        by_name[k.name[:90]] += k.time_range.elapsed_us()
        counts[k.name[:90]] += 1
    return [(name, round(t / steps, 1), round(counts[name] / steps, 1)) for name, t in by_name.most_common(30)]


def profile_own_decode(model, row, batch: int, steps: int, prompt_len: int = 32, cache_len: int = 288) -> dict:
    """Our own Llama model's decode step as llama_e2e times it (the pieces compiled per layer, the step captured
    whole as one CUDA graph, no host sync between steps): the GPU work a transformers step is compared with."""
    device = model.emb.weight.device
    cache = llama_model.KVCache(model.config, batch, cache_len, device, model.emb.weight.dtype)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    for t in (ids, pos):
        torch._dynamo.mark_static_address(t)
    step = llama_e2e.compile_for(llama_model.decode_step, row, device, cuda_graphs=True)
    with torch.no_grad():
        for i in range(prompt_len):
            pos.fill_(i)
            step(model, ids, pos, cache)
        replay = llama_e2e.captured_step(lambda: step(model, ids, pos, cache), device)

        def run(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for j in range(n):
                out = replay()
                ids.copy_(out)
                pos.fill_(prompt_len + j)
            torch.cuda.synchronize()
            return time.perf_counter() - t
        run(steps)
        wall = min(run(steps) for _ in range(3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(steps)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(k.time_range.elapsed_us() for k in kernels) / steps
    return {"batch": batch, "tok_s": round(batch * steps / wall, 1), "step_wall_us": round(wall / steps * 1e6, 1),
            "step_gpu_busy_us": round(busy, 1), "kernels_per_step": round(len(kernels) / steps, 1),
            "top_kernels_us_per_step": kernel_table(kernels, steps)}


def _attention_as_matmuls():
    """Replace qcompile::grouped_query_attention's decomposition (the A/B of the two forms)."""
    import math
    lib = torch.library.Library("qcompile", "IMPL")

    def matmul_form(q, k, v, mask, scale):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        rows = q.reshape(B, Hkv, Hq // Hkv * Lq, D)
        scores = torch.matmul(rows, k.transpose(-1, -2)).float() * (scale if scale is not None else 1 / math.sqrt(D))
        if mask is not None:
            mask = mask.expand(B, Hq, Lq, Lk).reshape(B, Hkv, Hq // Hkv * Lq, Lk)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.matmul(scores.softmax(-1).to(q.dtype), v).reshape(B, Hq, Lq, D)

    lib.impl("grouped_query_attention", matmul_form, "CompositeImplicitAutograd", allow_override=True)
    _attention_as_matmuls.lib = lib  # the registration lives as long as its Library


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="transformers", help="transformers rows profile generate(); others (e.g. "
                    "int4_weight_only: our own model) llama_e2e's captured decode step")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep-attention", action="store_true",
                    help="without the CUDA lowering that folds grouped query heads (the A/B of that pass)")
    ap.add_argument("--attention-form", choices=("sdpa", "matmul"), default="sdpa",
                    help="matmul: qcompile::grouped_query_attention computed as matmul, float32 softmax, matmul "
                         "(our own Llama model's decode attention) instead of the fused SDPA kernel; run it with its "
                         "own TORCHINDUCTOR_CACHE_DIR (the AOTAutograd cache keys on the graph before this op's "
                         "decomposition)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (a smoke test of this script)")
    args = ap.parse_args()
    if args.keep_attention:
        from qcompile.passes import attention, lower
        lower.LOWERINGS["cuda"].remove(attention.attend_grouped_kv_heads_cuda)
    if args.attention_form == "matmul":
        _attention_as_matmuls()
    llama_e2e.COMPILE_SCOPE = "layer"
    e2e_args = llama_e2e.parse_args(["--compile-scope", "layer"])
    base = llama_e2e.TINY if args.tiny else llama_e2e.LLAMA_3_1_8B
    config = llama_model.LlamaConfig(**{**base.__dict__, "n_layers": 2 if args.tiny else args.layers})
    device = torch.device("cpu" if args.tiny else "cuda")
    results = []
    for name in args.rows.split(","):
        row = llama_e2e.row_named(name)
        model = llama_e2e.build_row_model(row, config, e2e_args, device)
        for batch in map(int, args.batches.split(",")):
            result = {"row": name, "fold_grouped_heads": not args.keep_attention,
                      "attention_form": args.attention_form,
                      **(profile_generate(model, batch, args.steps) if row.model == "transformers"
                         else profile_own_decode(model, row, batch, args.steps))}
            print(json.dumps(result, indent=1), flush=True)
            results.append(result)
        del model
        llama_e2e.cleanup(device)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
