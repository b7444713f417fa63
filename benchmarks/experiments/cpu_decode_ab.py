"""SmolLM2-135M decode (and with --prefill, 512-token prefill) on this CPU, engines alternated in one process,
per-round ratios: int8_dynamic_intx 4-bit against --scheme (intx_weight_only 4-bit unless named) compiled with the
CPU kernel header of a git revision and with the working tree's (or with header files named by --headers instead).

    PYTHONPATH=.:benchmarks python benchmarks/experiments/cpu_decode_ab.py [--rev HEAD] [--rounds 9] [--split]
        [--headers a.h b.h] [--split-rounds 5] [--scheme int8_dynamic_intx] [--prefill]

--split profiles each engine's decode (GEMVs / other kernels / rest) in --split-rounds alternating runs and prints
medians (min-max): one profiled run swung by +-20% here.

cpu_smollm2.py's engines (each its own code object) and model; its table alternates more engines with fewer rounds.
Each weight-only engine renders intx_linear.h from its own source (the CppTemplate pastes KERNEL_SOURCE) under its
own kernel-source stamp (so Inductor's caches keep the two apart) and options that differ by an exclude pattern no
layer has (so the backend does not serve one engine the other's compile).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import cpu_smollm2 as bench  # sets OMP_WAIT_POLICY before torch starts its pool
import numpy as np
import torch

from qcompile import _compat
from qcompile.kernels.cpu import inductor_template

HEADER = "qcompile/kernels/cpu/intx_linear.h"


@contextlib.contextmanager
def kernel_source(text: str):
    stamp = hashlib.sha256(text.encode()).digest()
    with mock.patch.object(inductor_template, "KERNEL_SOURCE", text), \
            mock.patch.object(_compat, "_kernel_sources_hash", lambda: stamp):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision of the baseline header")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--headers", nargs="+", help="variant intx_linear.h files (each named by its stem) instead "
                                                     "of the working tree's")
    parser.add_argument("--split", action="store_true", help="also print each engine's profiled decode-step split")
    parser.add_argument("--split-rounds", type=int, default=5, help="alternating profiled runs per engine")
    parser.add_argument("--scheme", default="intx_weight_only", help="the scheme the header variants compile")
    parser.add_argument("--prefill", action="store_true", help="also time a 512-token prefill every round")
    args = parser.parse_args()
    if args.split:
        torch._inductor.config.cpp.enable_kernel_profile = True
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    root = Path(__file__).resolve().parents[2]
    sources = {args.rev: subprocess.run(["git", "show", f"{args.rev}:{HEADER}"], cwd=root, check=True,
                                        capture_output=True, text=True).stdout}
    if args.headers:
        sources.update((Path(path).stem, Path(path).read_text()) for path in args.headers)
    else:
        sources["working tree"] = (root / HEADER).read_text()
    # as the CppTemplate pastes it: the working tree's simd.h (and any other local include) in place of its #include
    sources = {label: inductor_template.inline_includes(text) for label, text in sources.items()}
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 49000, bench.PROMPT_PREFILL)]

    def options(scheme, tag):
        return {"scheme": scheme, "bits": 4, "group_size": 32, "keep_float_weights": True,
                "exclude": f"no layer is named {tag}"}

    engines = [("int8_dynamic_intx", None, options("int8_dynamic_intx", "int8"))]
    engines += [(f"{args.scheme} ({label})", text, options(args.scheme, label)) for label, text in sources.items()]
    runs = []
    for name, text, opts in engines:
        engine = bench.TorchEngine(name, opts, "qcompile", args.decode_tokens)
        with kernel_source(text) if text is not None else contextlib.nullcontext():
            print(f"warm-up (compile) {name}: {engine.warm_up(prompt):.1f} s", flush=True)
        runs.append(engine)
    phases = ("decode", "prefill") if args.prefill else ("decode",)
    tok_s = {(phase, e.name): [] for phase in phases for e in runs}
    for r in range(args.rounds):
        for engine in (runs if r % 2 == 0 else runs[::-1]):
            tok_s["decode", engine.name].append(args.decode_tokens / engine.decode(prompt[:bench.PROMPT_DECODE],
                                                                                   args.decode_tokens))
            if args.prefill:
                tok_s["prefill", engine.name].append(bench.PROMPT_PREFILL / engine.prefill(prompt))
    print(f"\n{bench.versions_line()}; threads {args.threads}; {args.rounds} alternating rounds of "
          f"{args.decode_tokens} decode tokens" + (f" and a {bench.PROMPT_PREFILL}-token prefill" if args.prefill else "")
          + "\n")
    base = runs[0].name
    for phase in phases:
        rows = []
        for engine in runs:
            ratios = sorted(a / b for a, b in zip(tok_s[phase, engine.name], tok_s[phase, base]))
            rows.append([engine.name, f"{statistics.median(tok_s[phase, engine.name]):.1f}",
                         f"{statistics.median(ratios):.3f}", ", ".join(f"{x:.2f}" for x in ratios)])
        print(bench.table(["engine", f"{phase} tok/s (median)", f"per-round ratio to {base} (median)",
                           "ratios, sorted"], rows))
        variants = [e.name for e in runs[1:]]
        for other in variants[1:]:
            ratios = sorted(a / b for a, b in zip(tok_s[phase, other], tok_s[phase, variants[0]]))
            print(f"\n{phase}: {other} / {variants[0]}: median {statistics.median(ratios):.3f} "
                  f"({', '.join(f'{x:.2f}' for x in ratios)})\n")
    if args.split:
        print()
        splits = {e.name: [] for e in runs}
        for r in range(args.split_rounds):
            for engine in (runs if r % 2 == 0 else runs[::-1]):
                splits[engine.name].append(bench.decode_split_ms(engine, prompt[:bench.PROMPT_DECODE],
                                                                 args.decode_tokens))
        keys = ("step", "gemv", "other", "rest")
        rows = [[name] + [f"{statistics.median(t[k] for t in ts):.2f} ({min(t[k] for t in ts):.2f}-"
                          f"{max(t[k] for t in ts):.2f})" for k in keys] for name, ts in splits.items()]
        print(bench.table(["engine", "step ms", "qcompile templates", "other kernels + aten ops", "rest"], rows))
        print(f"medians (min-max) of {args.split_rounds} alternating profiled runs per engine")


if __name__ == "__main__":
    sys.exit(main())
