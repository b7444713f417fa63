"""Lab (not a product benchmark): what bounds the int4 g128 linear at M=1 on the H200?

Sessions 2-3: every group-wise format took about as long as 8-bit weights (gate_up at M=1: int4 46 us, 2-bit
44 us, int8 44 us), whatever the kernel structure (GEMV, swapped tensor-core tile, plane decode at ~3.6 SASS
instructions per weight): a bound on weights per second, not bytes. Candidates: the access pattern (row-major
tiles read BLOCK_N rows x 64 bytes per step, rows K/2 bytes apart), the bytes a program keeps in flight (its
accumulator tile [BLOCK_N, BLOCK_K] in float32 limits occupancy), the group-parameter gathers. On gate_up
(28672 x 4096) and down (4096 x 14336), each swept over tiles, medians of CUDA-graph replays:
  copy         torch's device copy of the packed weight (the DRAM ceiling)
  load/<mode>  a Triton kernel that only reads the packed weight (xor into a small accumulator):
               words  = the template's pattern ([BLOCK_N, BLOCK_K / 8] int32 words, row-major)
               tiled  = int32 words with each (BLOCK_N rows, BLOCK_K) tile contiguous (a repacked layout)
  gemv/<mode>  a complete int4 GEMV on CUDA cores (words, no interleave: nibble j of word c is K = 8c + j and
               meets x[8c + j]; per group sum q*x, then scale * that + (zero - 8 scale) * sum x), row-major
               or tiled (BLOCK_N rows x one group contiguous); column-major parameters; checked against the
               reference
  template     qcompile's template, every candidate of the autotuner (column-major parameters)
  tinygemm     torch's _weight_int4pack_mm (torchao's int4 weight-only kernel)

  python benchmarks/experiments/int4_bound_lab.py --out $OUT/int4_bound.json
  TRITON_INTERPRET=1 python benchmarks/experiments/int4_bound_lab.py --smoke      # CPU: the kernels run
"""
import argparse
import itertools
import json
import os
import time

import torch
import triton
import triton.language as tl

USE_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
SHAPES = [("gate_up", 28672, 4096), ("down", 4096, 14336)]
GROUP = 128


@triton.jit
def load_kernel(w_ptr, out_ptr, N, K, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """Reads [BLOCK_N, BLOCK_KW] 32-bit words of packed int4 per step (BLOCK_KW * 8 K positions) and xors them
    into an accumulator of that shape: the memory traffic without the decode and the dot."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    KW = K // 8
    steps = KW // BLOCK_KW
    span = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)
    for step in range(pid_k * span, min(steps, pid_k * span + span)):
        if MODE == "words":
            wd = tl.load(w_ptr + rows[:, None] * KW + (step * BLOCK_KW + tl.arange(0, BLOCK_KW))[None, :])
            acc ^= wd
        else:
            wd = tl.load(w_ptr + (pid_n * steps + step) * (BLOCK_N * BLOCK_KW)
                         + tl.arange(0, BLOCK_N)[:, None] * BLOCK_KW + tl.arange(0, BLOCK_KW)[None, :])
            acc ^= wd
    tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, axis=1).to(tl.float32))


@triton.jit
def _in_place_fma(part, words, xj, POS: tl.constexpr):
    if USE_ASM:  # one LOP3 for the mask and the or (the compiler emits two)
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x4B000000, 0xea;", "=r,r,r",
                                         [words, tl.full(words.shape, 15 << POS, tl.uint32)], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    else:
        bits = (words & (15 << POS)) | 0x4B000000
    q = bits.to(tl.float32, bitcast=True) - 8388608.0  # q * 2^POS
    return part + q * (xj * (1.0 / (1 << POS)))[None, :]


@triton.jit
def gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_pn, stride_pg, TILED: tl.constexpr,
                      IN_PLACE: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """int4 tinygemm-format GEMV (g128): out[n] = sum_g s[n,g] * sum_k q x + (z[n,g] - 8 s[n,g]) * sum_k x.
    IN_PLACE: nibble j is not shifted down but masked where it lies (bits p = 4j, or 4j - 12 of the word shifted
    by 12 once for j >= 5) and or-ed into the mantissa of 2^23: 2^23 + q 2^p, exact; minus 2^23 gives q 2^p, and
    x is taken times 2^-p (exact): one LOP3 + FADD + FFMA per weight."""
    WPG: tl.constexpr = 16  # 32-bit words per group of 128
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, WPG)
    n_groups = K // 128
    g_span = tl.cdiv(n_groups, SPLIT_K * GROUPS_PER_STEP) * GROUPS_PER_STEP
    g_start = pid_k * g_span
    g_end = min(n_groups, g_start + g_span)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(g_start, g_end, GROUPS_PER_STEP):
        for gi in tl.static_range(GROUPS_PER_STEP):
            g = g0 + gi
            if TILED:
                words = tl.load(w_ptr + (pid_n * n_groups + g) * (BLOCK_N * WPG)
                                + tl.arange(0, BLOCK_N)[:, None] * WPG + c[None, :])
            else:
                words = tl.load(w_ptr + rows[:, None] * (K // 8) + (g * WPG + c)[None, :])
            words = words.to(tl.uint32, bitcast=True)  # logical shifts
            part = tl.zeros((BLOCK_N, WPG), tl.float32)
            xsum = tl.zeros((WPG,), tl.float32)
            high = words >> 12
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + g * 128 + 8 * c + j).to(tl.float32)
                xsum += xj
                if IN_PLACE:
                    if j < 5:
                        part = _in_place_fma(part, words, xj, 4 * j)
                    else:
                        part = _in_place_fma(part, high, xj, 4 * j - 12)
                else:
                    q = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    part += q * xj[None, :]
            s = tl.load(s_ptr + rows * stride_pn + g * stride_pg).to(tl.float32)
            z = tl.load(z_ptr + rows * stride_pn + g * stride_pg).to(tl.float32)
            acc += tl.sum(part, axis=1) * s + (z - 8.0 * s) * tl.sum(xsum, axis=0)
    tl.store(out_ptr + pid_k * N + rows, acc)


def tile_words(words: torch.Tensor, block_n: int, block_kw: int) -> torch.Tensor:
    """[N, KW] words -> each (block_n, block_kw) tile contiguous, tiles in (n-block, k-block) order."""
    N, KW = words.shape
    return words.view(N // block_n, block_n, KW // block_kw, block_kw).permute(0, 2, 1, 3).contiguous()


def bench(fn) -> float:
    fn()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return float("nan")
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def best_of(results):
    kept = [r for r in results if isinstance(r[0], float) and r[0] == r[0]]
    return min(kept) if kept else (results[0] if results else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int4_bound.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and one config each (interpreter)")
    ap.add_argument("--budget-s", type=float, default=300)
    a = ap.parse_args()
    deadline = time.time() + a.budget_s
    device = "cpu" if a.smoke else "cuda"
    shapes = [("tiny", 64, 512)] if a.smoke else SHAPES
    load_tiles = [(32, 16, 1)] if a.smoke else [
        t for t in itertools.product((32, 64, 128), (16, 32, 128), (1, 4)) if t[0] * t[1] <= 8192]
    gemv_tiles = [(32, 2, 2)] if a.smoke else list(itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 4)))
    gemv_modes = [(False, False), (False, True), (True, True)]  # (tiled, in place)
    from qcompile.kernels.triton import layout
    from qcompile.kernels.triton.linear import run_linear
    from qcompile.kernels.triton.ops import spec_for
    from qcompile.kernels.triton.tuning import candidates
    from qcompile import ops
    from qcompile.options import QuantOptions
    results = []
    for shape, N, K in shapes:
        torch.manual_seed(0)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        options = QuantOptions.from_dict({"scheme": "int4_weight_only", "group_size": GROUP})
        q = layout.for_kernels(options.scheme_def.quantize_weight(w, options))
        packed = q["qweight"]
        words = packed.view(torch.int32)
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        w_ref = ops.dequantize_int4_tinygemm(packed, q["scale"], q["zero"], GROUP, torch.float32)
        reference = (x.double() @ w_ref.double().t()).float()[0]
        del w, w_ref
        row = dict(shape=shape, N=N, K=K, bytes=packed.numel() + 2 * 2 * q["scale"].numel())
        scratch = torch.empty_like(packed)
        row["copy_us"] = bench(lambda: scratch.copy_(packed))
        for mode in ("words", "tiled"):
            timed = []
            for block_n, block_kw, split_k in load_tiles:
                if time.time() > deadline:
                    break
                if (K // 8) % (block_kw * split_k) or N % block_n:
                    continue
                src = tile_words(words, block_n, block_kw) if mode == "tiled" else words
                out = torch.empty(split_k, N, device=device, dtype=torch.float32)
                run = lambda: load_kernel[(N // block_n, split_k)](  # noqa: E731
                    src, out, N, K, MODE=mode, BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split_k, num_warps=4)
                timed.append((bench(run), block_n, block_kw * 8, split_k))
            row[f"load_{mode}"] = best_of(timed)
            row[f"load_{mode}_all"] = sorted(timed)[:6]
        for tiled, in_place in gemv_modes:
            name = "gemv_" + ("tiled" if tiled else "rowmajor") + ("_inplace" if in_place else "")
            timed = []
            for block_n, per_step, split_k in gemv_tiles:
                if time.time() > deadline:
                    break
                if (K // GROUP) % (per_step * split_k) or N % block_n:
                    continue
                src = tile_words(words, block_n, GROUP // 8) if tiled else words
                out = torch.empty(split_k, N, device=device, dtype=torch.float32)
                run = lambda: gemv_words_kernel[(N // block_n, split_k)](  # noqa: E731
                    x, src, q["scale"], q["zero"], out, N, K, q["scale"].stride(0), q["scale"].stride(1),
                    TILED=tiled, IN_PLACE=in_place, BLOCK_N=block_n, GROUPS_PER_STEP=per_step, SPLIT_K=split_k, num_warps=4)
                us = bench(run)
                err = ((out.sum(0) - reference).norm() / reference.norm()).item()
                timed.append((us, block_n, per_step, split_k, err))
            row[name] = best_of(timed)
            row[name + "_all"] = sorted(timed)[:6]
        spec = spec_for("float", "int4_tinygemm", 4, GROUP, q["scale"], q["zero"], None)
        timed = []
        for config in candidates(spec, 1, N, K)[:None if not a.smoke else 1]:
            if config.library or time.time() > deadline:
                continue
            try:
                us = bench(lambda: run_linear(x, packed, q["scale"], q["zero"], None, None, spec, torch.bfloat16,
                                              config))
            except Exception as e:  # a config this shape cannot take
                print(config, type(e).__name__, flush=True)
                continue
            timed.append((us, str(config)))
        row["template"] = best_of(timed)
        row["template_all"] = sorted(timed)[:6]
        if not a.smoke:
            try:
                wt = torch.ops.aten._convert_weight_to_int4pack(
                    torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8), 8)
                sz = torch.rand(K // GROUP, N, 2, device=device, dtype=torch.bfloat16)
                row["tinygemm_us"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, wt, GROUP, sz))
            except Exception as e:
                row["tinygemm_us"] = f"{type(e).__name__}: {e}"[:200]
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
