"""Lab (issue 22): int4 weight-only (tinygemm format, group 128) against bf16 cuBLAS on the four linears of a
Llama-3.1-8B layer (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) at M = 1, 16, 128.

Rows per (linear, M), each a median of CUDA-graph replays (as linear_h200.py times), with its SQNR against the
float64 product of the dequantized weight:
  bf16          F.linear on the bf16 weight (cuBLAS)
  today         the template's choice in this GPU's shipped seed (qcompile/kernels/triton/tuned/; the same kernel
                code for those configs), or the bucket's first candidate where none is cached
  pairs/<cfg>   the pair-decode tiles (KernelConfig.pair_decode: int4 words decoded by byte pairs straight into
                wgmma's register operand), every candidate the autotuner has for the bucket
  gemv/<cfg>    at M = 1: the word GEMVs of GEMV_SHAPES (the H200's picks for these linears and their neighbours)
  tinygemm      torch's _weight_int4pack_mm (torchao's int4 kernel) at M = 1, 16, on a random packed weight
A split-K config's partial sum is torch's own launches here (sum, cast), as in BENCHMARKS' table and as the tuner
times it; a compiled model fuses it into the consumer, so each split-K row also has kernel_us (us less the timed
sum of its partials) and the summary a kernel column for today's choice. Prints a table of per-linear times and
the four-linear sums (speedup over bf16: the issue asks >= 2.5x at M=1, >= 2.2x at M=16, >= 1.2x at M=128) and
writes JSON (the whole sweep).

  python benchmarks/experiments/int4_mma_lab.py --out $OUT/int4_lab.json          # GPU, ~3 minutes
  python benchmarks/experiments/int4_mma_lab.py --ms 1 --out $OUT/int4_lab.json  # GPU, decode only (~1 minute)
  python benchmarks/experiments/int4_mma_lab.py --ms 1 --no-pairs ...             # ... the GEMV rows alone
  TRITON_INTERPRET=1 python benchmarks/experiments/int4_mma_lab.py --smoke         # CPU: correctness only
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's qcompile

from qcompile import ops  # noqa: E402
from qcompile.kernels.triton import layout  # noqa: E402
from qcompile.kernels.triton.linear import pair_decode_verified, run_linear  # noqa: E402
from qcompile.kernels.triton.ops import spec_for  # noqa: E402
from qcompile.kernels.triton.tuning import SHIPPED, KernelConfig, candidates, m_bucket, pair_decode_tiles  # noqa: E402
from qcompile.options import QuantOptions  # noqa: E402
from qcompile.quant.metrics import sqnr_db  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
MS = (1, 16, 128)
GROUP = 128
TARGETS = {1: 2.5, 16: 2.2, 128: 1.2}


def cached_choices(spec) -> dict[tuple[int, int, int], KernelConfig]:
    """(M bucket, N, K) -> the config this GPU's shipped seed chose for this spec (any kernel version: the configs
    of the existing paths compute with the same code)."""
    entries = {}
    for seed in SHIPPED:
        entries.update(json.loads(seed.read_text()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    found = {}
    for key, entry in entries.items():
        parts = key.split("|")
        if len(parts) == 7 and parts[0] == device and parts[3] == spec.key() and "config" in entry:
            bucket, n, k = (int(re.sub(r"\D", "", p)) for p in parts[4:])
            found[(bucket, n, k)] = KernelConfig(**entry["config"])
    return found


def fits(config: KernelConfig, K: int) -> bool:
    return config.library != "" or not (K % config.block_k or K < config.block_k * config.split_k)


@functools.lru_cache(None)
def partial_sum_us(split_k: int, M: int, N: int, device: str) -> float:
    """The time of a split-K config's partial sum as run_linear does it (sum of [split_k, M, N] float32, cast to
    bf16): the same for every config of that split and shape, so timed once."""
    partials = torch.empty(split_k, M, N, device=device)
    return bench(lambda: partials.sum(0).to(torch.bfloat16))


def bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
    except Exception:  # not capturable: timed from the host (includes launch overhead)
        return triton.testing.do_bench(fn, warmup=25, rep=60, return_mode="median") * 1e3


def _compile_one(task) -> str | None:
    """Worker: run one (M, config) once on a small weight with the real shapes' specialisation (N, K, strides
    multiples of 16), so the timing process finds its binary in Triton's cache."""
    M, config = task
    torch.manual_seed(0)
    N, K = 256, 4096
    options = QuantOptions.from_dict({"scheme": "int4_weight_only", "group_size": GROUP})
    q = layout.for_kernels(options.scheme_def.quantize_weight(
        torch.randn(N, K, device="cuda", dtype=torch.bfloat16), options))
    spec = spec_for("float", "int4_tinygemm", 4, GROUP, q["scale"], q["zero"], None)
    try:
        run_linear(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), q["qweight"], q["scale"], q["zero"], None,
                   None, spec, torch.bfloat16, config)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported; the timing reports it again
        return f"M={M} {config_name(config)}: {type(e).__name__}: {str(e)[:200]}"


def precompile(tasks, workers: int) -> None:
    import multiprocessing as mp

    start = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        for failure in pool.imap_unordered(_compile_one, sorted(set(tasks), key=str)):
            if failure:
                print("compile failed:", failure, flush=True)
    print(f"compiled {len(set(tasks))} kernels in {time.time() - start:.0f} s", flush=True)


# word GEMVs (block_n, block_k, split_k, num_warps, num_stages): the shapes the H200 picked for these linears and
# their neighbours
GEMV_SHAPES = [(64, 512, 4, 4, 2), (128, 128, 4, 4, 3), (128, 512, 4, 4, 2), (64, 128, 4, 4, 2), (32, 512, 2, 4, 2),
               (128, 128, 8, 2, 3)]


def gemv_rows(M: int) -> list[KernelConfig]:
    """At M = 1: the word GEMVs of GEMV_SHAPES."""
    return [KernelConfig(1, *c) for c in GEMV_SHAPES] if M == 1 else []


def config_name(config: KernelConfig) -> str:
    if config.library:
        return config.library
    tags = [t for t, on in (("swap", config.swap_ab), ("planes", config.planes), ("join", config.join_planes),
                            ("pairs", config.pair_decode), ("after_dot", config.scale_after_dot),
                            ("product", config.block_product)) if on]
    return (f"m{config.block_m}n{config.block_n}k{config.block_k}s{config.split_k}w{config.num_warps}"
            f"st{config.num_stages}" + "".join("_" + t for t in tags))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int4_lab.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, outputs checked, nothing timed (CPU)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop timing after this many seconds (counted after compiling)")
    ap.add_argument("--workers", type=int, default=12, help="processes compiling the kernels before the timing")
    ap.add_argument("--ms", type=lambda v: tuple(int(m) for m in v.split(",")), default=MS,
                    help="token counts to sweep, comma-separated (default 1,16,128)")
    ap.add_argument("--no-pairs", action="store_true",
                    help="leave the pair-decode tiles out (compiled and timed: ~20 per linear and M)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    timed = device == "cuda"
    if a.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
    shapes = [("tiny", 96, 512)] if a.smoke else SHAPES
    ms = (1, 5, 17) if a.smoke else a.ms
    deadline = time.time() + a.budget_s
    options = QuantOptions.from_dict({"scheme": "int4_weight_only", "group_size": GROUP})
    verified = pair_decode_verified(f"cuda:{torch.cuda.current_device()}" if timed else "cpu")
    print(f"pair decode verified on {device}: {verified}", flush=True)
    if timed and a.workers > 0:  # every (M, config) the sweep runs, compiled in parallel first
        probe = layout.for_kernels(options.scheme_def.quantize_weight(
            torch.randn(64, 4096, device=device, dtype=torch.bfloat16), options))
        spec = spec_for("float", "int4_tinygemm", 4, GROUP, probe["scale"], probe["zero"], None)
        cached = cached_choices(spec)
        precompile([(M, c) for _, N, K in shapes for M in ms
                    for c in [cached.get((m_bucket(M), N, K)) or candidates(spec, M, N, K)[0],
                              *([] if a.no_pairs else pair_decode_tiles(m_bucket(M))), *gemv_rows(M)]
                    if fits(c, K) and not c.library],
                   a.workers)
        deadline = time.time() + a.budget_s
    linears = {}  # every linear's tensors, prepared once: the sweep goes M by M, so a budget cut keeps small M whole
    for shape, N, K in shapes:
        torch.manual_seed(0)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        q = layout.for_kernels(options.scheme_def.quantize_weight(w, options))  # as the backend stores it on CUDA
        spec = spec_for("float", "int4_tinygemm", 4, GROUP, q["scale"], q["zero"], None)
        w_dequant = ops.dequantize_int4_tinygemm(q["qweight"], q["scale"], q["zero"], GROUP, torch.float32)
        tinygemm = None
        if timed:  # timing only: a random weight in its packing
            tinygemm = (torch.ops.aten._convert_weight_to_int4pack(
                torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8), 8),
                torch.rand(K // GROUP, N, 2, device=device, dtype=torch.bfloat16))
        linears[shape] = (N, K, w, q, spec, w_dequant, cached_choices(spec), tinygemm)
    rows = []
    for M in ms:
        for shape, (N, K, w, q, spec, w_dequant, cached, tinygemm) in linears.items():
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            exact = (x.double() @ w_dequant.double().t()).float()
            bucket = m_bucket(M)
            today = cached.get((bucket, N, K)) or candidates(spec, M, N, K)[0]
            runs = [("bf16", lambda: F.linear(x, w)), ("today", today)]
            if a.smoke:  # tiles that fit the tiny shape: one token block, split-K, a K block over groups
                pairs = [KernelConfig(16, 64, 128, 2, swap_ab=True, pair_decode=True),
                         KernelConfig(16, 32, 256, 1, swap_ab=True, pair_decode=True),
                         KernelConfig(16, 64, 128, 1, swap_ab=True, pair_decode=True, scale_after_dot=True),
                         KernelConfig(16, 64, 128, 1, swap_ab=True, pair_decode=True, block_product=True)]
            else:
                pairs = [] if a.no_pairs else [c for c in pair_decode_tiles(bucket) if fits(c, K)]
            runs += [("pairs/" + config_name(c), c) for c in pairs]
            runs += [("gemv/" + config_name(c), c) for c in gemv_rows(M) if fits(c, K)]
            if tinygemm is not None and M <= 16:
                runs.append(("tinygemm", lambda: torch.ops.aten._weight_int4pack_mm(x, tinygemm[0], GROUP,
                                                                                   tinygemm[1])))
            for kind, run in runs:
                if timed and time.time() > deadline:
                    print("budget reached: the rest is not timed", flush=True)
                    break
                config = run if isinstance(run, KernelConfig) else None
                fn = run if config is None else (lambda c=config: run_linear(
                    x, q["qweight"], q["scale"], q["zero"], None, None, spec, torch.bfloat16, c))
                row = dict(shape=shape, N=N, K=K, M=M, kind=kind.split("/")[0], name=kind,
                           config=None if config is None else config.__dict__)
                try:
                    with torch.no_grad():
                        out = fn()
                        # against the dequantized weight's product: the kernels' own error (bf16's is the
                        # quantization error, not reported)
                        row["sqnr_db"] = None if kind in ("bf16", "tinygemm") else round(sqnr_db(exact, out.float()), 1)
                        if timed:
                            row["us"] = bench(fn)
                            if config is not None and config.split_k > 1:
                                # here the split-K partial sum is torch's own launches (sum, cast); in a compiled
                                # model Inductor fuses it into the consumer: the kernel alone is us - partial_sum_us
                                row["partial_sum_us"] = partial_sum_us(config.split_k, M, N, device)
                                row["kernel_us"] = row["us"] - row["partial_sum_us"]
                except Exception as e:  # a config the compiler rejects (shared memory, registers) is reported
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(f"{shape:8s} M={M:4d} {kind:44s} {row.get('us', float('nan')):8.1f} us  "
                      f"SQNR {row.get('sqnr_db')} dB {row.get('error', '')}", flush=True)
    summary = summarize(rows, ms, [s for s, _, _ in shapes]) if timed else {}
    result = dict(device=torch.cuda.get_device_name() if timed else "cpu (interpreter)", torch=torch.__version__,
                  pair_decode_verified=verified, summary=summary, rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    bad = [r for r in rows if r["kind"] in ("today", "pairs", "gemv")
           and (r.get("error") or (r.get("sqnr_db") or 0) < 25)]
    for r in bad:
        print(f"NOT OK: {r['shape']} M={r['M']} {r['name']}: {r.get('error') or str(r['sqnr_db']) + ' dB'}")
    print(f"wrote {a.out}" + ("" if bad else " (every kernel output within 25 dB of the float64 product)"))


def summarize(rows, ms, shapes) -> dict:
    """Per M: the four-linear sum of bf16, of today's choice, of the best pair-decode tile per linear, of the faster
    of the two per linear (what the autotuner would pick with the new candidates), of tinygemm; the speedups over
    bf16 against the issue's targets. Prints the table."""
    def best(shape, M, kind, field="us"):  # field "kernel_us": a split-K row's kernel alone, else its us
        times = [r.get(field, r["us"]) for r in rows if r["shape"] == shape and r["M"] == M and r["kind"] == kind
                 and "us" in r and (kind in ("bf16", "tinygemm") or (r.get("sqnr_db") or 0) >= 25)]
        return min(times) if times else None

    summary = {}
    print(f"\n{'M':>4s} {'linear':8s} {'bf16':>8s} {'today':>8s} {'kernel':>8s} {'pairs':>8s} {'gemv':>8s} "
          f"{'tuned':>8s} {'tinygemm':>9s}   best pair / GEMV config   (kernel: today's without the split-K sum's "
          f"own launches)")
    for M in ms:
        sums = {}
        for shape in shapes:
            cells = {kind: best(shape, M, kind) for kind in ("bf16", "today", "pairs", "gemv", "tinygemm")}
            cells["today_kernel"] = best(shape, M, "today", "kernel_us")
            ours = [cells[k] for k in ("today", "pairs", "gemv") if cells[k] is not None]  # as the tuner times them
            cells["tuned"] = min(ours) if ours else None
            pick = min((r for r in rows if r["shape"] == shape and r["M"] == M and r["kind"] in ("pairs", "gemv")
                        and "us" in r
                        and (r.get("sqnr_db") or 0) >= 25), key=lambda r: r["us"], default=None)
            print(f"{M:4d} {shape:8s} " + " ".join(f"{cells[k]:8.1f}" if cells[k] else f"{'-':>8s}"
                                                 for k in ("bf16", "today", "today_kernel", "pairs", "gemv", "tuned")) +
                  (f" {cells['tinygemm']:9.1f}" if cells["tinygemm"] else f" {'-':>9s}") +
                  f"   {pick['name'] if pick else '-'}")
            for kind, us in cells.items():
                sums.setdefault(kind, 0.0 if us is not None else None)
                sums[kind] = None if us is None or sums[kind] is None else sums[kind] + us
        speedups = {k: round(sums["bf16"] / v, 2) for k, v in sums.items() if v and sums.get("bf16")}
        summary[M] = dict(sum_us={k: round(v, 1) for k, v in sums.items() if v}, speedup_over_bf16=speedups,
                          target=TARGETS.get(M))
        print(f"{M:4d} {'sum':8s} " + " ".join(f"{sums[k]:8.1f}" if sums.get(k) else f"{'-':>8s}"
                                              for k in ("bf16", "today", "today_kernel", "pairs", "gemv", "tuned"))
              + f"   speedup over bf16: {speedups} (target {TARGETS.get(M)}x)")
    return summary


if __name__ == "__main__":
    main()
