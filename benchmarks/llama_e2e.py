"""End-to-end LLM inference (issue 9): a Llama-3.1-8B-shaped decoder with random weights on one GPU — prefill and
decode tokens/s, peak memory and compile time per row: bf16 under Inductor (the baseline), qcompile schemes, and
transformers' LlamaForCausalLM compiled with backend="qcompile" running generate().

    python benchmarks/llama_e2e.py --rows bf16,int4_weight_only            # runs rows, appends to --out
    python benchmarks/llama_e2e.py --rows transformers --phases decode_b1
    python benchmarks/llama_e2e.py --write BENCHMARKS.md                    # renders --out, runs nothing
    python benchmarks/llama_e2e.py --tiny --device cpu --rows bf16,int8_weight_only --out /tmp/e2e.json
    python benchmarks/llama_e2e.py --tp 2 --rows bf16,int4_weight_only --check   # 2 GPUs: llama_tp.py, torchrun

Rows: bf16, any qcompile scheme name (group-wise ones at group 128), transformers (int4_weight_only g128) and
transformers_bf16. Each phase of a row is saved to --out (JSON) as soon as it finishes, so a run killed by a
time limit keeps what it measured, and several invocations build one table (per row and phase, the latest
measurement wins). On a machine that returns only $OUT, carry the file there and back:

    cp benchmarks/llama_e2e_results.json $OUT/ 2>/dev/null
    python benchmarks/llama_e2e.py --rows bf16,int4_weight_only --budget-s 480 \
        --out $OUT/llama_e2e_results.json 2> $OUT/stderr.txt        # then copy the file back into benchmarks/

Protocol (every row alike):
- Build: the model is made on the meta device and materialized on the device one decoder layer at a time;
  quantized rows pass each layer to qcompile.prepare right away, so the float bf16 weights never all sit on the
  device. Every linear is quantized, the LM head included; the embedding and norms stay bf16.
- decode_b1 / decode_b128: B sequences, a --prompt-len-token random prompt fed one token per step through the
  decode step itself (no separate prompt graph to compile), then --new-tokens greedy steps timed: tok/s =
  B * new_tokens / time (best of --reps). One step = one token per sequence at a position given as a tensor,
  attention over the whole static cache (prompt + new tokens long) under a mask, argmax inside the graph.
  bf16: torch.compile(mode="reduce-overhead"); qcompile: options {"cudagraphs": True}: CUDA-graph trees.
- prefill: --prefill-prompts prompts of --prefill-len tokens into an empty cache, --prefill-chunk prompts per
  forward (bounds activation memory; the cache holds one chunk), no CUDA graphs (kernels are long): tok/s =
  prompts * len / time of all chunks (best of --reps). Logits of the last position only.
- Memory (CUDA): peak stats are reset before each phase; `peak_first_gb` = max_memory_allocated after compile and
  the first forward (the issue's measure), `peak_gb` at the end of the phase (CUDA-graph pools included).
- Compile time: the first call of each phase, split with Dynamo's own timers into Dynamo tracing, the backend's
  work outside Inductor (qcompile: aten trace + quantize pass + lowering; bf16: pre-grad passes), Inductor (AOT
  + lowering + codegen + waiting for kernel compiles) and the rest (running the first forward).
- --compile-scope layer (rows "<row> (per-layer compile)"): each decoder block and the LM head compiled on their
  own instead of the whole step — one graph serves all blocks, so a phase compiles one block and the head; the
  glue between them runs eagerly. On CUDA a decode step is captured as one CUDA graph (torch.cuda.graph) around
  the compiled blocks and the glue, after the first call compiled them: session 7's replay per block (CUDA-graph
  trees) cost ~100 us of host bookkeeping per block (194 tok/s at b1 against 268 whole-model). Prefill without
  CUDA graphs, as whole-model rows. transformers rows: each LlamaDecoderLayer and the LM head compiled (a graph per
  layer: Dynamo specializes on layer_idx), generate()'s loop eager, a CUDA-graph replay per block (trees).
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import datetime
import threading
import gc
import inspect
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import llama_model  # noqa: E402
from harness import (INVOCATION, REPO, START, allocated, captured_step, device_name, gb, git_commit,  # noqa: E402
                     load_records, log, peak, reset_peak, saver, sync, versions, write_section)
from llama_model import KVCache, LLAMA_3_1_8B, TINY, decode_step, prefill  # noqa: E402

import qcompile  # noqa: E402
from qcompile.options import QuantOptions  # noqa: E402
from qcompile.per_layer import compile_regions  # noqa: E402
from qcompile.step_graphs import StepGraphs  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "llama_e2e_results.json"
DEFAULT_ROWS = "bf16,float8_dynamic,int8_dynamic,int8_weight_only,int4_weight_only,transformers"
PHASES = ("decode_b1", "decode_b128", "prefill")  # smallest cache first
# options the installed qcompile accepts; without "cudagraphs" the decode step runs without CUDA graphs (noted)
HAS_CUDAGRAPHS_OPTION = "cudagraphs" in QuantOptions.__dataclass_fields__


# --- rows -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    weight: str
    activation: str
    options: dict | None = None  # qcompile options; None = bf16 under Inductor
    model: str = "ours"  # or "transformers"
    torchao: str | None = None  # a torchao config (TORCHAO_CONFIGS) applied with quantize_, then compiled as bf16
    whole_model: bool = False  # compiled whole whatever --compile-scope says (a baseline's own recipe)


INT4_G128 = {"scheme": "int4_weight_only", "group_size": 128}
ROWS = {r.name: r for r in (
    Row("bf16", "bf16", "bf16"),
    Row("float8_dynamic", "float8 e4m3, per row", "float8 e4m3, per token (dynamic)",
        {"scheme": "float8_dynamic", "granularity": "row"}),
    Row("int8_dynamic", "int8, per row (sym)", "int8, per token (dynamic, sym)", {"scheme": "int8_dynamic"}),
    Row("int8_weight_only", "int8, per row (sym)", "bf16", {"scheme": "int8_weight_only"}),
    Row("float8_weight_only", "float8 e4m3, per row", "bf16", {"scheme": "float8_weight_only"}),
    Row("int4_weight_only", "int4 g128 (asym, float zero)", "bf16", INT4_G128),
    Row("transformers", "int4 g128 (asym, float zero)", "bf16", INT4_G128, model="transformers"),
    Row("transformers_float8_dynamic", "float8 e4m3, per row", "float8 e4m3, per token (dynamic)",
        {"scheme": "float8_dynamic", "granularity": "row"}, model="transformers"),
    Row("transformers_int8_dynamic", "int8, per row (sym)", "int8, per token (dynamic, sym)",
        {"scheme": "int8_dynamic"}, model="transformers"),
    Row("transformers_bf16", "bf16", "bf16", model="transformers"),
    # transformers' own recipe: torch.compile(model.forward, mode="reduce-overhead") over a static cache
    Row("transformers_bf16_reduce_overhead", "bf16", "bf16", model="transformers", whole_model=True),
    Row("transformers_torchao_int4", "int4 g128 (torchao tinygemm)", "bf16", model="transformers",
        torchao="int4_tinygemm"),
    Row("transformers_torchao_float8", "float8 e4m3, per row (torchao)", "float8 e4m3, per token (dynamic)",
        model="transformers", torchao="float8_rowwise"),
)}
# torchao's configs for its rows, as ../shared/bench/e2e_peers_h200.py builds them (torchao is no dependency:
# carry its wheel to the GPU machine)
TORCHAO_CONFIGS = {
    "int4_tinygemm": lambda q: q.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    "float8_rowwise": lambda q: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()),
}


def row_named(name: str) -> Row:
    if name in ROWS:
        return ROWS[name]
    try:
        scheme = qcompile.get_scheme(name)
    except ValueError:
        raise SystemExit(f"--rows: unknown row {name!r}; rows are {', '.join(ROWS)} or a qcompile scheme: "
                         f"{', '.join(qcompile.SCHEMES)}") from None
    options = {"scheme": scheme.name}
    if 128 in scheme.group_sizes:
        options["group_size"] = 128
    return Row(scheme.name, scheme.summary, scheme.activation or "bf16", options)


def compile_kwargs(row: Row, device: torch.device, cuda_graphs: bool) -> dict:
    """torch.compile's arguments for the row; fixed shapes (dynamic=False) so every batch size gets its own graph."""
    graphs = cuda_graphs and device.type == "cuda"
    if row.options is None:
        return {"dynamic": False, "mode": "reduce-overhead" if graphs else None}
    options = dict(row.options)
    if graphs and HAS_CUDAGRAPHS_OPTION:
        options["cudagraphs"] = True
    if quantizes_activation_in_graph(row):
        options["activation_quantization"] = "graph"
    return {"backend": "qcompile", "options": options, "dynamic": False}


def compile_for(fn, row: Row, device: torch.device, cuda_graphs: bool):
    """`fn` compiled as the row says — as it is under --compile-scope layer, whose modules compile_per_layer
    compiled when the model was built (fn is then the eager glue between them)."""
    if compiled_per_layer(row):
        return fn
    return torch.compile(fn, **compile_kwargs(row, device, cuda_graphs))


def quantizes_activation_in_graph(row: Row) -> bool:
    """--activation-quantization graph, for a row whose scheme takes it (dynamic int8 / float8)."""
    return (ACTIVATION_QUANTIZATION == "graph" and row.options is not None
            and qcompile.get_scheme(row.options["scheme"]).activation_in_graph)


def compiled_per_layer(row: Row) -> bool:
    return COMPILE_SCOPE == "layer" and not row.whole_model


def compile_per_layer(model, row: Row, device: torch.device) -> None:
    """--compile-scope layer: every decoder block compiled on its own — one graph that Dynamo reuses for all of
    them, each fed its own (quantized) weights: a layer's compile instead of the model's — and the LM head on its
    own; the embedding, RoPE angles, final norm and argmax run eagerly between them. Our model: no CUDA-graph
    trees, the decode phases capture a whole step in one graph (captured_step). transformers: generate() owns its
    loop, so nothing captures a step there; each block and the head replay their own CUDA graphs (trees), with a
    trees step marked per call of the model (qcompile.per_layer: without it the H200 run failed, "accessing tensor
    output of CUDAGraphs that has been overwritten by a subsequent run", and session 8 measured these rows without
    CUDA graphs). Its decoder layers read their KV-cache slot by `self.layer_idx`, which Dynamo specializes on — a
    graph per layer (the first compiles, the others hit the FX-graph cache): the recompile limit is raised to
    hold them (qcompile.per_layer)."""
    transformers_model = row.model == "transformers"
    layers = model.model.layers if transformers_model else model.layers
    compile_regions(model, list(layers), **compile_kwargs(row, device, cuda_graphs=transformers_model))


def uses_cuda_graphs(row: Row, device: torch.device) -> bool:
    return device.type == "cuda" and (row.options is None or HAS_CUDAGRAPHS_OPTION)


# --- measuring ------------------------------------------------------------------------------------------------

# Dynamo's own cumulative timers (torch._dynamo.utils.compilation_time_metrics); missing names give None
TIMERS = {"dynamo": "_compile.compile_inner", "backend": "OutputGraph.call_user_compiler",
          "inductor": "create_aot_dispatcher_function", "inductor_codegen": "fx_codegen_and_compile",
          "kernel_compile_wait": "async_compile.wait"}


def compile_snapshot() -> dict:
    from torch._dynamo.utils import compilation_time_metrics, counters

    timers = {key: (sum(compilation_time_metrics[name]) if name in compilation_time_metrics else None)
              for key, name in TIMERS.items()}
    return {"timers": timers, "graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "fx_cache_hits": counters["inductor"].get("fxgraph_cache_hit", 0),
            "fx_cache_misses": counters["inductor"].get("fxgraph_cache_miss", 0),
            "aot_cache_hits": counters["aot_autograd"].get("autograd_cache_hit", 0),
            "autotuned_linear_configs": autotune_entries()}


def autotune_entries() -> int | None:
    """Entries in qcompile's Triton config cache (tuned configs per linear spec, M bucket, N, K)."""
    root = Path(os.environ.get("QCOMPILE_CACHE_DIR", Path.home() / ".cache" / "qcompile"))
    path = root / "triton_linear_configs.json"
    try:
        return len(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def compile_report(before: dict, after: dict, first_call_s: float) -> dict:
    """Where the first call's time went, from Dynamo's timers (cumulative, so take differences)."""
    # torch._dynamo.reset() may clear the timers: a name missing before counts from 0, one missing after is unknown
    t = {key: (None if after["timers"][key] is None else after["timers"][key] - (before["timers"][key] or 0.0))
         for key in TIMERS}

    def minus(a, b):
        return None if a is None or b is None else round(a - b, 2)

    report = {"first_call_s": round(first_call_s, 2), "dynamo_trace_s": minus(t["dynamo"], t["backend"]),
              "backend_outside_inductor_s": minus(t["backend"], t["inductor"]),
              "inductor_s": minus(t["inductor"], 0), "inductor_codegen_s": minus(t["inductor_codegen"], 0),
              "kernel_compile_wait_s": minus(t["kernel_compile_wait"], 0),
              "first_run_and_rest_s": minus(first_call_s, t["dynamo"])}
    for key in ("graphs", "graph_breaks", "fx_cache_hits", "fx_cache_misses", "aot_cache_hits"):
        if key in before and key in after:  # results of older runs lack the AOT count
            report[key] = after[key] - before[key]
    if after["autotuned_linear_configs"] is not None:
        tuned_before = before["autotuned_linear_configs"] or 0
        report["autotuned_linear_configs"] = after["autotuned_linear_configs"] - tuned_before
    return report


def phase_checks(result: dict, before: dict, device: torch.device, cuda_graphs: bool) -> None:
    """Counts that say a measurement is not what it claims: recompiles, graph breaks, skipped CUDA graphs."""
    after = compile_snapshot()
    result["graphs_compiled"] = after["graphs"] - before["graphs"]
    result["graph_breaks"] = after["graph_breaks"] - before["graph_breaks"]
    result["cudagraph_skips"] = after["cudagraph_skips"] - before["cudagraph_skips"]
    if device.type == "cuda":
        result["cuda_graphs"] = cuda_graphs and result["cudagraph_skips"] == 0
    if result["graph_breaks"] or result["cudagraph_skips"]:
        log(f"  WARNING: {result['graph_breaks']} graph break(s), {result['cudagraph_skips']} CUDA-graph skip(s) "
            f"(see TORCH_LOGS=graph_breaks,perf_hints)")


# --- phases of our model -------------------------------------------------------------------------------------

def decode_phase(model, row: Row, args, device, batch: int) -> dict:
    P, N = args.prompt_len, args.new_tokens
    config = model.config
    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, config.vocab, (batch, P), device=device, generator=gen)
    cache = KVCache(config, batch, P + N, device, model.emb.weight.dtype)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's inputs: fixed addresses, read in
    pos = torch.zeros(1, dtype=torch.long, device=device)  # place by the CUDA graph (no copy per replay)
    for t in (ids, pos):
        torch._dynamo.mark_static_address(t)
    generated = torch.empty(batch, N, dtype=torch.long, device=device)
    graphs = uses_cuda_graphs(row, device)
    step = compile_for(decode_step, row, device, cuda_graphs=True)
    whole_step_graph = graphs and compiled_per_layer(row)  # captured after the first call compiled the pieces
    mark_step = torch.compiler.cudagraph_mark_step_begin if graphs and not whole_step_graph else (lambda: None)

    def call():
        mark_step()  # a CUDA-graph tree replay may overwrite the previous step's output: it was copied already
        return step(model, ids, pos, cache)

    def generate() -> float:
        for i in range(P):
            ids.copy_(prompt[:, i:i + 1])
            pos.fill_(i)
            out = call()
        sync(device)
        start = time.perf_counter()
        for j in range(N):
            generated[:, j:j + 1].copy_(out)
            ids.copy_(out)
            pos.fill_(P + j)
            out = call()
        sync(device)
        return time.perf_counter() - start

    result = {"batch": batch, "prompt_len": P, "new_tokens": N, "kv_cache_gb": gb(cache.nbytes),
              "allocated_at_start_gb": gb(allocated(device))}
    with torch.no_grad():
        ids.copy_(prompt[:, :1])
        before = first_call(call, result, device, f"{row.name} decode b{batch}")
        if whole_step_graph:
            try:
                start = time.perf_counter()
                call = captured_step(call, device)
                result["capture_s"] = round(time.perf_counter() - start, 2)  # two warm-up steps and the capture
            except Exception as e:  # noqa: BLE001 (recorded; the phase still measures, without CUDA graphs)
                result["cuda_graph_capture_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"  WARNING: capturing the decode step failed, timing it without CUDA graphs: {e}")
                whole_step_graph = graphs = False
        if compiled_per_layer(row) and device.type == "cuda":
            result["cuda_graph_scope"] = "step" if whole_step_graph else "none"
        times = [generate() for _ in range(args.reps)]
    result["times_s"] = [round(t, 4) for t in times]
    result["tok_s"] = round(batch * N / min(times), 2)
    result["peak_gb"] = gb(peak(device))
    result["first_tokens"] = generated[0, :8].tolist()  # to compare rows by eye (random weights: no reference)
    phase_checks(result, before, device, graphs)
    return result


def prefill_phase(model, row: Row, args, device) -> dict:
    n, L, chunk = args.prefill_prompts, args.prefill_len, args.prefill_chunk
    if n % chunk:
        raise SystemExit(f"--prefill-prompts {n} is not a multiple of --prefill-chunk {chunk}")
    config = model.config
    gen = torch.Generator(device=device).manual_seed(2)
    chunks = [torch.randint(0, config.vocab, (chunk, L), device=device, generator=gen) for _ in range(n // chunk)]
    cache = KVCache(config, chunk, L, device, model.emb.weight.dtype)
    fn = compile_for(prefill, row, device, cuda_graphs=False)
    result = {"prompts": n, "prompt_len": L, "chunk": chunk, "kv_cache_gb": gb(cache.nbytes),
              "allocated_at_start_gb": gb(allocated(device))}
    def forward(ids):
        return fn(model, ids, cache)

    with torch.no_grad():
        before = first_call(lambda: forward(chunks[0]), result, device, f"{row.name} prefill")
        times = []
        for _ in range(args.reps):
            sync(device)
            start = time.perf_counter()
            for ids in chunks:
                logits = forward(ids)
            sync(device)
            times.append(time.perf_counter() - start)
    if not torch.isfinite(logits).all():
        raise RuntimeError("prefill logits are not finite")
    result["times_s"] = [round(t, 4) for t in times]
    result["tok_s"] = round(n * L / min(times), 1)
    result["peak_gb"] = gb(peak(device))
    phase_checks(result, before, device, False)
    return result


def first_call(call, result: dict, device, label: str) -> dict:
    """Run a phase's first call (compile + first forward) with peak memory stats reset before it; record its
    time, where that went, and the peak after it. Returns the compile counters from before, for phase_checks."""
    before = compile_snapshot()
    reset_peak(device)
    start = time.perf_counter()
    with (profiling(PROFILE_COMPILE / label.replace(" ", "_").replace("()", "")) if PROFILE_COMPILE is not None
          else contextlib.nullcontext()):
        call()
        sync(device)
    seconds = time.perf_counter() - start
    result["compile"] = compile_report(before, compile_snapshot(), seconds)
    result["peak_first_gb"] = gb(peak(device))
    log(f"  {label}: first call {seconds:.1f} s {short_compile(result['compile'])}")
    return before


PROFILE_COMPILE: Path | None = None  # --profile-compile: where first calls' profiles go
COMPILE_SCOPE = "model"  # --compile-scope
ACTIVATION_QUANTIZATION = "kernel"  # --activation-quantization
GRAPH_ACTIVATION_SUFFIX = " (activation quantized in the graph)"  # its rows' names under "graph"
PER_LAYER_SUFFIX = " (per-layer compile)"  # the rows' names under --compile-scope layer


@contextlib.contextmanager
def profiling(stem: Path, every_s: float = 15.0):
    """Profile the block into STEM.txt / STEM.prof, and every EVERY_S seconds append every thread's stack to
    STEM.stacks.txt (a sampling view that holds even if the block never ends). If a time limit ends the process
    (SIGTERM, as `timeout` sends), the profile so far is written before it exits."""
    profiler = cProfile.Profile()
    stem.parent.mkdir(parents=True, exist_ok=True)
    stacks = open(stem.with_suffix(".stacks.txt"), "w")
    # samples from a Python thread (it holds the GIL while it reads the frames): faulthandler's watchdog
    # (dump_traceback_later) reads other threads' frames without it, and crashed an H100 cold compile mid-dump
    done = threading.Event()

    def sample():
        while not done.wait(every_s):
            write_stacks(stacks, f"sample (every {every_s:g} s)")

    sampler = threading.Thread(target=sample, daemon=True, name="compile-stack-sampler")
    sampler.start()

    def on_term(signum, frame):
        profiler.disable()
        write_profile(profiler, stem.with_suffix(".txt"))
        write_stacks(stacks, "at SIGTERM")
        os._exit(124)

    previous = signal.signal(signal.SIGTERM, on_term)
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        signal.signal(signal.SIGTERM, previous)
        done.set()
        sampler.join()
        stacks.close()
        write_profile(profiler, stem.with_suffix(".txt"))


def write_stacks(file, title: str) -> None:
    """Every thread's Python stack, most recent call first (as faulthandler prints them)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    file.write(f"--- {title}\n")
    for ident, frame in sys._current_frames().items():
        file.write(f"Thread {names.get(ident, ident)} (most recent call first):\n")
        file.writelines(reversed(traceback.format_stack(frame)))
    file.flush()


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """The functions a first call spent its time in, by cumulative and by own time (cProfile's text), and the
    raw profile beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(120)
    path.write_text(text.getvalue())
    profiler.dump_stats(path.with_suffix(".prof"))  # the whole profile, for pstats / snakeviz
    log(f"  profile of the first call -> {path}")


def short_compile(c: dict) -> str:
    labels = (("Dynamo", "dynamo_trace_s"), ("pass", "backend_outside_inductor_s"), ("Inductor", "inductor_s"))
    parts = [f"{label} {c[key]:.1f} s" for label, key in labels if c.get(key) is not None]
    return f"({', '.join(parts)})" if parts else ""


# --- transformers ---------------------------------------------------------------------------------------------

def transformers_phase(model, row: Row, args, device, batch: int) -> dict:
    """generate() with a static cache; decode tok/s = B * (N - 1) / (time of N new tokens - time of 1), so the
    prompt's forward and generate()'s set-up cancel out."""
    P, N = args.prompt_len, args.new_tokens
    cache = llama_model.transformers_static_cache(model, batch, P + N)
    prompt = torch.randint(0, model.config.vocab_size, (batch, P), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    mask = torch.ones_like(prompt)
    # transformers 5.2x renamed generate()'s past_key_values to cache (forward's signature says which it takes)
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def generate(n: int) -> float:
        cache.reset()
        sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, **{cache_kwarg: cache})
        sync(device)
        if out.shape[1] != P + n:
            raise RuntimeError(f"generate() returned {out.shape[1] - P} new tokens, asked for {n}")
        result["first_tokens"] = out[0, P:P + 8].tolist()
        return time.perf_counter() - start

    result = {"batch": batch, "prompt_len": P, "new_tokens": N,
              "kv_cache_gb": gb(llama_model.transformers_cache_nbytes(cache)),
              "allocated_at_start_gb": gb(allocated(device))}
    steps = model.__dict__.get("forward")
    steps = steps if isinstance(steps, StepGraphs) else None
    with torch.no_grad():
        # generate(1) compiles the prompt's graph, generate(2) the one-token graph
        before = first_call(lambda: (generate(1), generate(2)), result, device, f"{row.name} generate() b{batch}")
        generate(N)  # CUDA graphs recorded
        warm = compile_snapshot()
        counts = None if steps is None else (steps.captures, steps.replays, steps.eager_calls)
        one, full = [], []
        for _ in range(args.reps):
            one.append(generate(1))
            full.append(generate(N))
    result["generate_1_s"] = [round(t, 4) for t in one]
    result["generate_n_s"] = [round(t, 4) for t in full]
    result["tok_s"] = round(batch * (N - 1) / (min(full) - min(one)), 2)
    result["generate_tok_s"] = round(batch * N / min(full), 2)  # prompt and set-up included
    result["peak_gb"] = gb(peak(device))
    after = compile_snapshot()
    result["graphs_compiled_while_timed"] = after["graphs"] - warm["graphs"]  # recompiles per step: must be 0
    result["graph_breaks_while_timed"] = after["graph_breaks"] - warm["graph_breaks"]
    if steps is not None:  # each timed call of the model: replayed as one CUDA graph, or eager (the prompts)
        result["step_graphs"] = {"captured": steps.captures - counts[0], "replayed": steps.replays - counts[1],
                                 "eager": steps.eager_calls - counts[2], "graphs_held": len(steps.graphs)}
        result["cuda_graph_scope"] = "step"
    phase_checks(result, before, device, uses_cuda_graphs(row, device))
    if steps is not None:  # graphs asked for; replayed only where a capture succeeded
        result["cuda_graphs"] = result["step_graphs"]["replayed"] > 0
        result["capture_failures"] = sorted(set(steps.uncapturable.values()))
    return result


def _installed(package: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(package) is not None


# --- one row ----------------------------------------------------------------------------------------------------

def build_row_model(row: Row, config, args, device):
    parts = config.n_layers + 3
    marks = {parts * q // 4 for q in (1, 2, 3, 4)}

    def on_part(i: int) -> None:
        if i + 1 in marks:
            log(f"  {row.name}: {i + 1}/{parts} parts on {device}"
                + (" (quantized layer by layer)" if row.options else "")
                + (f"; allocated {gb(allocated(device))} GB, peak {gb(peak(device))} GB" if device.type == "cuda"
                   else ""))

    quantize = None
    if row.options is not None:
        def quantize(module):
            qcompile.prepare(module, row.options, device, progress=False)
    if row.torchao is not None:
        import torchao.quantization as torchao_quantization

        torchao_config = TORCHAO_CONFIGS[row.torchao](torchao_quantization)

        def quantize(module):
            torchao_quantization.quantize_(module, torchao_config)
    builder = llama_model.build_transformers if row.model == "transformers" else llama_model.build
    model = builder(config, device, getattr(torch, args.dtype), seed=0, quantize=quantize, on_part=on_part)
    if compiled_per_layer(row):
        compile_per_layer(model, row, device)
    if row.model == "transformers":
        model.generation_config.disable_compile = True  # we compile forward ourselves (prompt and step alike)
        model.generation_config.eos_token_id = None  # random weights: never stop early
        model.forward = compile_for(model.forward, row, device, cuda_graphs=True)
    return model


def run_row(row: Row, args, device, config, phases: list[str], save) -> dict:
    record = {"row": row.name + (GRAPH_ACTIVATION_SUFFIX if quantizes_activation_in_graph(row) else "")
              + (PER_LAYER_SUFFIX if compiled_per_layer(row) else "") + args.suffix,
              "invocation": INVOCATION, "model": row.model, "weight": row.weight,
              "activation": row.activation, "torchao": row.torchao,
              "options": row.options, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "setup": setup(args, device, config), "phases": {}}
    missing = [name for name, needed in (("transformers", row.model == "transformers"),
                                         ("torchao", row.torchao is not None)) if needed and not _installed(name)]
    if missing:
        record["error"] = f"{' and '.join(missing)} not installed on this machine"
        log(f"{row.name}: {record['error']}")
        save(record)
        return record
    cleanup(device)
    log(f"{row.name}: building ({config.n_layers} layers, {args.dtype}, options {row.options})")
    reset_peak(device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model = build_row_model(row, config, args, device)
    except Exception as e:  # noqa: BLE001 (recorded, the next row runs)
        record["error"] = f"build: {type(e).__name__}: {e}"
        log(f"{row.name}: FAILED to build\n{traceback.format_exc()}")
        save(record)
        return record
    sync(device)
    record["build_s"] = round(time.perf_counter() - start, 1)
    record["weights_gb"] = gb(allocated(device))
    embedding = model.get_input_embeddings() if row.model == "transformers" else model.emb
    record["embedding_gb"] = gb(embedding.weight.numel() * embedding.weight.element_size())  # one row read per token
    record["build_peak_gb"] = gb(peak(device))
    log(f"{row.name}: built in {record['build_s']} s, weights on {device}: {record['weights_gb']} GB "
        f"(build peak {record['build_peak_gb']} GB)")
    save(record)
    if row.model == "transformers":
        phases = [p for p in phases if p.startswith("decode_b")]  # generate() only: no prefill phase
    for phase in phases:
        if args.budget_s is not None and time.monotonic() - START > args.budget_s:
            record["phases"][phase] = {"skipped": f"--budget-s {args.budget_s} reached"}
            log(f"{row.name} {phase}: skipped, --budget-s reached")
            continue
        try:
            if row.model == "transformers":
                result = transformers_phase(model, row, args, device, int(phase.removeprefix("decode_b")))
            elif phase == "prefill":
                result = prefill_phase(model, row, args, device)
            else:
                result = decode_phase(model, row, args, device, int(phase.removeprefix("decode_b")))
            log(f"{row.name} {phase}: {result['tok_s']} tok/s, peak {result.get('peak_first_gb')} GB after the first "
                f"call, {result.get('peak_gb')} GB at the end")
        except Exception as e:  # noqa: BLE001 (recorded, the next phase runs)
            result = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"{row.name} {phase}: FAILED\n{traceback.format_exc()}")
        record["phases"][phase] = result
        save(record)
        cleanup(device)
    del model
    cleanup(device)
    return record


def cleanup(device) -> None:
    """Drop compiled graphs and their CUDA-graph pools (quantized weights stay cached with their tensors)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the run's setup ---------------------------------------------------------------------------------------------

def setup(args, device, config) -> dict:
    return {"command": "python benchmarks/llama_e2e.py " + " ".join(args.argv),
            "device": device_name(device), "versions": versions(), "commit": git_commit(),
            "compile_scope": COMPILE_SCOPE, "activation_quantization": ACTIVATION_QUANTIZATION,
            "config": {"layers": config.n_layers, "dim": config.dim, "heads": config.n_heads, "kv_heads": config.n_kv,
                       "ffn": config.ffn, "vocab": config.vocab, "tiny": args.tiny, "dtype": args.dtype},
            "protocol": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
                         "prefill_prompts": args.prefill_prompts, "prefill_len": args.prefill_len,
                         "prefill_chunk": args.prefill_chunk}}


# --- rendering ----------------------------------------------------------------------------------------------

def config_key(record: dict) -> str:
    """What makes two measurements comparable: device, model shapes, protocol (the number of reps aside)."""
    s = record["setup"]
    protocol = {k: v for k, v in s["protocol"].items() if k != "reps"}
    return json.dumps([s["device"], s["config"], protocol], sort_keys=True)


def merged_rows(records: list[dict]) -> tuple[dict[str, dict], list[dict]]:
    """Rows of the latest configuration (device, shapes, protocol): per row and phase the latest successful
    measurement (a later failure does not erase it). Returns ({row: {"record": the latest record that gave a
    measurement, "phases": {phase: result}}}, records used)."""
    if not records:
        raise SystemExit("no results to render")
    key = config_key(records[-1])
    rows: dict[str, dict] = {}
    used = []
    for record in records:
        if config_key(record) != key:
            continue
        entry = rows.setdefault(record["row"], {"record": record, "phases": {}})
        if "error" in record and not record["phases"]:
            entry["error"] = record["error"]
        for phase, result in record["phases"].items():
            if "tok_s" in result or phase not in entry["phases"]:
                entry["phases"][phase] = result
                if "tok_s" in result:
                    entry["record"] = record
                if record not in used:
                    used.append(record)
    return rows, used


def per_layer_graphs(rows: dict) -> str:
    """How the per-layer rows' decode steps replayed CUDA graphs (records before session 7's change: per block)."""
    per_layer = [entry for name, entry in rows.items() if name.endswith(PER_LAYER_SUFFIX)]
    scopes = {result.get("cuda_graph_scope", "block") for entry in per_layer if entry["record"]["model"] == "ours"
              for phase, result in entry["phases"].items() if phase.startswith("decode") and "tok_s" in result}
    words = {"step": "one CUDA graph captured around the whole step (`torch.cuda.graph`)",
             "block": "a CUDA-graph replay per block (CUDA-graph trees)", "none": "no CUDA graphs (capture failed)"}
    described = " or ".join(words[s] for s in sorted(scopes, reverse=True)) if scopes else "not measured"
    described += " (as each row's record says)" if len(scopes) > 1 else ""
    transformers_rows = [entry for entry in per_layer if entry["record"]["model"] == "transformers"]
    if transformers_rows:
        results = [result for entry in transformers_rows for result in entry["phases"].values()]
        graphs = ("each call of the model captured whole as one CUDA graph (`qcompile.step_graphs`)"
                  if any(result.get("cuda_graph_scope") == "step" for result in results)
                  else "a CUDA-graph replay per block (trees, a step marked per forward)"
                  if any(result.get("cuda_graphs") for result in results) else "no CUDA graphs")
        described += ("; transformers' rows: each LlamaDecoderLayer and the LM head compiled (`qcompile.compile_blocks`"
                      "), generate()'s loop eager, " + graphs)
    return described


def render(records: list[dict], source: Path = DEFAULT_OUT) -> str:
    rows, used = merged_rows(records)
    latest = used[-1] if used else records[-1]
    s = latest["setup"]
    p, c = s["protocol"], s["config"]
    base = rows.get("bf16", {}).get("phases", {})

    def cell(entry, phase):
        result = entry["phases"].get(phase)
        if result is None:
            return "—"
        if "tok_s" not in result:
            return "failed" if "error" in result else "skipped"
        text = f"{result['tok_s']:,.0f}" if result["tok_s"] >= 100 else f"{result['tok_s']:.1f}"
        scope = PER_LAYER_SUFFIX if entry["record"]["row"].endswith(PER_LAYER_SUFFIX) else ""
        same_scope = rows.get("bf16" + scope)  # bf16 compiled the same way where measured, else whole-model bf16
        ref = (same_scope["phases"] if same_scope else base).get(phase, {}).get("tok_s")
        if ref:
            text += f" ({result['tok_s'] / ref:.2f}x)"
        hf_ref = rows.get("transformers_bf16" + scope, {}).get("phases", {}).get(phase, {}).get("tok_s")
        if entry["record"]["model"] == "transformers" and entry["record"]["options"] and hf_ref:
            text += f", {result['tok_s'] / hf_ref:.2f}x transformers bf16"
        if phase.startswith("decode") and result.get("cuda_graphs") is False:
            text += " no CUDA graphs"
        return text

    def mem(entry):
        parts = []
        for phase in PHASES:
            r = entry["phases"].get(phase, {})
            if r.get("peak_first_gb") is not None:
                parts.append(f"{r['peak_first_gb']:.1f} ({r['kv_cache_gb']:.2f})" if r.get("kv_cache_gb") is not None
                             else f"{r['peak_first_gb']:.1f}")
            else:
                parts.append("—")
        return " / ".join(parts)

    def compile_cell(entry):
        times = [entry["phases"].get(ph, {}).get("compile", {}).get("first_call_s") for ph in PHASES]
        return " / ".join("—" if t is None else f"{t:.0f}" for t in times)

    lines = [
        f"## Llama-3.1-8B end to end (issue 9)",
        "",
        f"**Device**: {s['device']}; torch {s['versions']['torch']} (CUDA {s['versions']['cuda']}), triton "
        f"{s['versions']['triton']}, transformers {s['versions']['transformers']}. **Commands** (results merged "
        f"per row and phase from `{shown_path(source)}`, latest measurement wins):",
        "",
        *[f"    {r['setup']['command']}    # qcompile {r['setup']['commit']}, {r.get('invocation', r['started'])[:16]}Z"
          for r in {r.get("invocation", r["started"]): r for r in used}.values()],
        "",
        f"**Model**: Llama-3.1-8B shapes ({c['layers']} layers, hidden {c['dim']}, {c['heads']} heads / "
        f"{c['kv_heads']} KV heads, FFN {c['ffn']}, vocab {c['vocab']}, RoPE theta 500000, RMSNorm), random weights, "
        f"{c['dtype']}; our decoder fuses q/k/v and gate/up into one linear each (as vLLM). Every linear is quantized, "
        f"the LM head included (group-wise schemes at group 128). **Prefill**: {p['prefill_prompts']} prompts x "
        f"{p['prefill_len']} tokens into an empty cache, {p['prefill_chunk']} prompts per forward (bounds activation "
        f"memory), no CUDA graphs. **Decode**: batch 1 and 128, {p['prompt_len']}-token prompts fed through the "
        f"decode step, {p['new_tokens']} greedy tokens timed, one CUDA-graph replay per token (bf16: "
        f"`mode=\"reduce-overhead\"`; qcompile: `options={{..., \"cudagraphs\": True}}`), attention over the "
        f"static cache ({p['prompt_len']} + {p['new_tokens']} slots) under a mask. Best of {p['reps']}; speedups "
        f"against bf16 under Inductor in the same table."
        + (f" Rows marked{PER_LAYER_SUFFIX} (`--compile-scope layer`): each decoder block and the LM head compiled "
           f"on their own (one graph serves every block), the glue between them eager; decode "
           + per_layer_graphs(rows) + "; against bf16 compiled the same way where measured."
           if any(n.endswith(PER_LAYER_SUFFIX) for n in rows) else "")
        + (f" Rows marked{GRAPH_ACTIVATION_SUFFIX} (`--activation-quantization graph`): qcompile's option "
           f"`activation_quantization=\"graph\"` — the activation's quantization left in the graph for Inductor to "
           f"fuse into its producer." if any(GRAPH_ACTIVATION_SUFFIX in n for n in rows) else ""),
        "",
        "| row | weight | activation | prefill tok/s | decode tok/s b1 | decode tok/s b128 | weights GB "
        "| peak GB b1 / b128 / prefill (KV cache) | compile s b1 / b128 / prefill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = [n for n in ROWS if n in rows] + [n for n in rows if n not in ROWS]
    for name in order:
        entry = rows[name]
        rec = entry["record"]
        label = "bf16 (Inductor)" + name.removeprefix("bf16") if rec["options"] is None else f"qcompile {name}"
        if rec["model"] == "transformers":
            how = (f"qcompile {rec['options']['scheme']}" if rec["options"] is not None
                   else f"torchao {rec['torchao']}" if rec.get("torchao") else "bf16")
            label = (f"transformers LlamaForCausalLM, generate() ({how})"
                     + (PER_LAYER_SUFFIX if name.endswith(PER_LAYER_SUFFIX) else " (whole-model compile)"))
        if "error" in entry and not entry["phases"]:
            lines.append(f"| {label} | {rec['weight']} | {rec['activation']} | {entry['error']} | | | | | |")
            continue
        weights = "—" if rec.get("weights_gb") is None else f"{rec['weights_gb']:.2f}"
        lines.append(f"| {label} | {rec['weight']} | {rec['activation']} | {cell(entry, 'prefill')} | "
                     f"{cell(entry, 'decode_b1')} | {cell(entry, 'decode_b128')} | {weights} | {mem(entry)} | "
                     f"{compile_cell(entry)} |")
    lines += decode_bandwidth(rows, order)
    lines += ["", "Peak memory: `torch.cuda.max_memory_allocated` after compile and the first forward of each phase "
              "(stats reset before it); weights GB: allocated after building (quantized tensors, bf16 embedding "
              "and norms). Compile: the first call of each phase (warm Inductor / autotune caches if the machine "
              "had them). The transformers row's decode tok/s = (N - 1) / (time of generate(N) - time of "
              "generate(1)) at batch 1, with a StaticCache allocated once and passed to every generate() call.", "",
              "Where compile time goes (first call of each phase, seconds; Dynamo's own timers):", "",
              "| row | phase | first call | Dynamo trace | backend outside Inductor (qcompile pass) | Inductor "
              "(codegen, kernel-compile wait) | run + rest | autotuned linear configs | FX-cache hits | AOT-cache hits |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    for name in order:
        for phase in PHASES:
            comp = rows[name]["phases"].get(phase, {}).get("compile")
            if not comp:
                continue
            lines.append(f"| {name} | {phase} | {fmt(comp['first_call_s'])} | {fmt(comp['dynamo_trace_s'])} | "
                         f"{fmt(comp['backend_outside_inductor_s'])} | {fmt(comp['inductor_s'])} "
                         f"({fmt(comp['inductor_codegen_s'])}, {fmt(comp['kernel_compile_wait_s'])}) | "
                         f"{fmt(comp['first_run_and_rest_s'])} | {comp.get('autotuned_linear_configs', '—')} | "
                         f"{comp['fx_cache_hits']} | {comp.get('aot_cache_hits', '—')} |")
    lines += targets(rows)
    problems = [f"- {name} {phase}: {r['error'][:300]}" for name in order
                for phase, r in rows[name]["phases"].items() if "error" in r]
    if problems:
        lines += ["", "Failed phases:", *problems]
    return "\n".join(lines)


def decode_bandwidth(rows: dict, order: list[str]) -> list[str]:
    """Bytes one decode step reads at least (every weight but the embedding table, plus the whole KV cache, which
    the masked attention reads in full) and the rate the measured step time implies."""
    parts = []
    for name in order:
        rec = rows[name]["record"]
        if rec.get("weights_gb") is None or rec.get("embedding_gb") is None:
            continue
        cells = []
        for phase in ("decode_b1", "decode_b128"):
            r = rows[name]["phases"].get(phase, {})
            if r.get("tok_s") and r.get("kv_cache_gb") is not None:
                step_gb = rec["weights_gb"] - rec["embedding_gb"] + r["kv_cache_gb"]
                cells.append(f"{phase.removeprefix('decode_')} {step_gb:.1f} GB x {r['tok_s'] / r['batch']:.0f}/s = "
                             f"{step_gb * r['tok_s'] / r['batch'] / 1e3:.2f} TB/s")
        if cells:
            parts.append(f"- {name}: {'; '.join(cells)}")
    return ["", "Decode: bytes read per step (weights without the embedding table + whole KV cache) x steps/s:",
            *parts] if parts else []


# issue 9's targets: speedup over bf16 under Inductor (prefill, decode b1, decode b128)
TARGETS = {"float8_dynamic": (1.55, 1.6, 1.35), "int8_dynamic": (1.15, 1.6, 1.3),
           "int8_weight_only": (0.95, 1.6, 1.2), "int4_weight_only": (0.9, 2.6, 1.3)}
INT4_PEAK_TARGET_GB = 6.5  # plus the KV cache, after compile and a first forward
COMPILE_TARGET_S = 120  # per scheme, the three phases together, autotune cache warm


def targets(rows: dict) -> list[str]:
    """The issue's targets against the rows present: met / missed, computed from the table's own numbers."""
    out = ["", "Against the issue's targets (speedup over bf16 under Inductor compiled the same way; memory; "
           "compile time):", "",
           "| row | prefill | decode b1 | decode b128 | peak after compile + 1st forward, b1 | compile, 3 phases |",
           "|---|---|---|---|---|---|"]
    for (scheme, goals), scope in [(t, scope) for scope in ("", PER_LAYER_SUFFIX) for t in TARGETS.items()]:
        name = scheme + scope
        base = rows.get("bf16" + scope, {}).get("phases", {})
        phases = rows.get(name, {}).get("phases")
        if not phases:
            continue
        cells = []
        for phase, goal in zip(("prefill", "decode_b1", "decode_b128"), goals):
            got, ref = phases.get(phase, {}).get("tok_s"), base.get(phase, {}).get("tok_s")
            cells.append("—" if not got or not ref else
                         f"{got / ref:.2f}x vs ≥ {goal}x: {'met' if got / ref >= goal else 'missed'}")
        b1 = phases.get("decode_b1", {})
        memory = "—"
        if scheme == "int4_weight_only" and b1.get("peak_first_gb") is not None:
            limit = INT4_PEAK_TARGET_GB + b1["kv_cache_gb"]
            memory = (f"{b1['peak_first_gb']:.2f} GB vs ≤ {limit:.2f} GB (6.5 + KV): "
                      f"{'met' if b1['peak_first_gb'] <= limit else 'missed'}")
        times = [phases.get(ph, {}).get("compile", {}).get("first_call_s") for ph in PHASES]
        compile_s = "—" if None in times else (f"{sum(times):.0f} s vs < {COMPILE_TARGET_S} s: "
                                                f"{'met' if sum(times) < COMPILE_TARGET_S else 'missed'}")
        out.append(f"| {name} | {' | '.join(cells)} | {memory} | {compile_s} |")
    return out if len(out) > 5 else []


def shown_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)



# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", help=f"comma-separated rows (default {DEFAULT_ROWS}; with --write alone: none)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of " + ", ".join(PHASES))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file, appended to")
    ap.add_argument("--write", type=Path, help="render the table from --out into this markdown file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, help="decoder layers (default 32; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config for CPU smoke tests (hidden 256, 2 layers, "
                    "short prompts)")
    ap.add_argument("--new-tokens", type=int, help="decode: tokens generated and timed (default 256; tiny 8)")
    ap.add_argument("--prompt-len", type=int, help="decode: prompt tokens (default 32; tiny 4)")
    ap.add_argument("--prefill-prompts", type=int, help="default 32 (tiny 4)")
    ap.add_argument("--prefill-len", type=int, help="default 4096 (tiny 64)")
    ap.add_argument("--prefill-chunk", type=int, help="prompts per prefill forward (default 4; tiny 2)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per phase; the best is reported")
    ap.add_argument("--budget-s", type=float, help="start no phase after this many seconds (a run's time limit)")
    ap.add_argument("--suffix", default="", help="appended to every row's name, e.g. ' (warm caches)' for a second "
                    "process that finds the first one's Inductor and tuning caches")
    ap.add_argument("--compile-scope", choices=("model", "layer"), default="model",
                    help="compile the whole step (default), or each decoder block and the LM head on their own "
                         "(rows named '<row> (per-layer compile)'; transformers rows too)")
    ap.add_argument("--activation-quantization", choices=("kernel", "graph"), default="kernel",
                    help="dynamic int8 / float8 rows: qcompile's option activation_quantization (rows under 'graph' "
                         "named '<row> (activation quantized in the graph)')")
    ap.add_argument("--profile-compile", type=Path, help="profile each phase's first call (compile + first forward) "
                    "with cProfile; its top functions go to DIR/<row>_<phase>.txt")
    ap.add_argument("--tp", type=int, default=1, help="shard the model over this many GPUs (decode phases): runs "
                    "benchmarks/llama_tp.py under torchrun, one process per GPU, with the other options")
    ap.add_argument("--check", action="store_true", help="with --tp: compare logits and greedy tokens with the "
                    "unsharded model under the same options")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tp < 1:
        ap.error(f"--tp: {args.tp} processes; give 1 or more")
    if args.check and args.tp == 1:
        ap.error("--check compares a sharded run with the unsharded model: it needs --tp 2 or more")
    if args.tp > 1:
        given = {a.split("=")[0] for a in args.argv if a.startswith("--")}
        unsharded_only = sorted(given & set(UNSHARDED_ONLY))
        if unsharded_only:
            ap.error(f"--tp: {', '.join(unsharded_only)} not available sharded (llama_tp.py times the decode phases "
                     f"of whole-model compiles)")
    defaults = ({"new_tokens": 8, "prompt_len": 4, "prefill_prompts": 4, "prefill_len": 64, "prefill_chunk": 2}
                if args.tiny else
                {"new_tokens": 256, "prompt_len": 32, "prefill_prompts": 32, "prefill_len": 4096, "prefill_chunk": 4})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [p for p in args.phases.split(",") if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown {', '.join(unknown)}; valid: {', '.join(PHASES)}")
    return args


UNSHARDED_ONLY = ("--compile-scope", "--activation-quantization", "--prefill-prompts", "--prefill-len",
                  "--prefill-chunk", "--profile-compile")


def tensor_parallel_command(argv: list[str], tp: int) -> list[str]:
    """--tp N: the decode phases sharded Megatron-style over N GPUs — benchmarks/llama_tp.py under torchrun (one
    process per GPU, a free rendezvous port) — with this invocation's other options."""
    rest, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--tp":
            skip_value = True
        elif not arg.startswith("--tp="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
            str(REPO / "benchmarks" / "llama_tp.py"), *rest]


def main(argv=None) -> list[dict]:
    global PROFILE_COMPILE, COMPILE_SCOPE, ACTIVATION_QUANTIZATION
    args = parse_args(argv)
    if args.tp > 1:
        command = tensor_parallel_command(args.argv, args.tp)
        log("tensor parallel: " + " ".join(command))
        returncode = subprocess.run(command).returncode
        if returncode:
            raise SystemExit(f"--tp {args.tp}: llama_tp.py exited with status {returncode}")
        return []
    PROFILE_COMPILE, COMPILE_SCOPE = args.profile_compile, args.compile_scope
    ACTIVATION_QUANTIZATION = args.activation_quantization
    if args.write is not None and args.rows is None:
        write_section(args.write, "llama_e2e", render(load_records(args.out), args.out))
        print(f"wrote the llama_e2e section of {args.write} from {args.out}")
        return []
    device = torch.device(args.device)
    config = TINY if args.tiny else LLAMA_3_1_8B
    if args.layers is not None:
        config = llama_model.LlamaConfig(**{**config.__dict__, "n_layers": args.layers})
    rows = [row_named(n) for n in (args.rows or DEFAULT_ROWS).split(",")]
    phases = [p for p in PHASES if p in args.phases.split(",")]
    log(f"device {device_name(device)}; torch {torch.__version__}; rows {', '.join(r.name for r in rows)}; "
        f"phases {', '.join(phases)}; qcompile cudagraphs option: {HAS_CUDAGRAPHS_OPTION}; results -> {args.out}")
    save = saver(args.out)
    records = [run_row(row, args, device, config, phases, save) for row in rows]
    table = render(load_records(args.out), args.out)
    print("\n" + table, flush=True)
    if args.write is not None:
        write_section(args.write, "llama_e2e", table)
        log(f"wrote {args.write}")
    return records


if __name__ == "__main__":
    main()
