"""Lab (not a product benchmark): small-M kernel structures for the int4 / int8 weight-only linears on the H200,
each swept over tile configs, against the current template (autotuned) and bf16 cuBLAS, at M=1 and M=16.

  python benchmarks/experiments/gemv_lab.py --out $OUT/gemv_lab.json
Variants (the plane decode that came out of this lab now lives in the template: dequant.decode_planes_ptx): swap_ab (out^T = W x^T on tensor cores: the dequantized weight tile is the dot's A operand),
swap_ab_eo (the same, int4 bytes split into even/odd K positions: two dots, no interleave), gemv_eo (CUDA cores,
even/odd, group scale applied to partial sums).
"""
import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qcompile.kernels.triton.dequant import load_weight_tile, small_int_to_float
from qcompile.kernels.triton.ops import fused_linear
from qcompile.options import QuantOptions

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


@triton.jit
def swap_ab_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, EVEN_ODD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols % N
    rows = tl.arange(0, BLOCK_M)
    rows_in = rows % M
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    k_end = min(K, k_start + k_span)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    n_groups = K // GROUP
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_ODD:  # int4 tinygemm, BLOCK_K <= GROUP
            half = tl.arange(0, BLOCK_K // 2)
            b = tl.load(w_ptr + cols_in[:, None] * stride_wn + (k0 // 2 + half)[None, :]).to(tl.int32)
            s = tl.load(s_ptr + cols_in * n_groups + k0 // GROUP).to(tl.float32)[:, None]
            z = tl.load(z_ptr + cols_in * n_groups + k0 // GROUP).to(tl.float32)[:, None]
            w_lo = (small_int_to_float(b & 15, 8) * s + z).to(tl.bfloat16)
            w_hi = (small_int_to_float(b >> 4, 8) * s + z).to(tl.bfloat16)
            x_even = tl.load(x_ptr + rows_in[None, :] * stride_xm + (k0 + 2 * half)[:, None])
            x_odd = tl.load(x_ptr + rows_in[None, :] * stride_xm + (k0 + 2 * half + 1)[:, None])
            acc = tl.dot(w_lo, x_even, acc)
            acc = tl.dot(w_hi, x_odd, acc)
        else:
            w = load_weight_tile(w_ptr, s_ptr, z_ptr, w_ptr, cols_in, k0, K, stride_wn, n_groups, 1, FORMAT,
                                 4 if FORMAT == "int4_tinygemm" else 8, GROUP, False, False, BLOCK_K)
            xt = tl.load(x_ptr + rows_in[None, :] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[:, None])
            acc = tl.dot(w.to(tl.bfloat16), xt, acc)
    if FORMAT == "int8":
        acc *= tl.load(s_ptr + cols_in).to(tl.float32)[:, None]
    ptrs = out_ptr + rows[None, :] * N + cols[:, None]
    mask = (rows < M)[None, :] & (cols < N)[:, None]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def gemv_eo_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols % N
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    k_end = min(K, k_start + k_span)
    n_groups = K // GROUP
    if FORMAT == "int8":
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + cols_in[:, None] * stride_wn + offs[None, :], eviction_policy="evict_first")
            x = tl.load(x_ptr + offs).to(tl.float32)
            acc += small_int_to_float(w.to(tl.int32) + 128, 128) * x[None, :]
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + cols_in).to(tl.float32)
    else:  # int4 tinygemm, BLOCK_K <= GROUP: sum w x = s * sum q x + (z - 8 s) * sum x
        acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_start, k_end, BLOCK_K):
            b = tl.load(w_ptr + cols_in[:, None] * stride_wn + (k0 // 2 + half)[None, :],
                        eviction_policy="evict_first").to(tl.int32)
            x_even = tl.load(x_ptr + k0 + 2 * half).to(tl.float32)
            x_odd = tl.load(x_ptr + k0 + 2 * half + 1).to(tl.float32)
            part = small_int_to_float(b & 15, 0) * x_even[None, :] + small_int_to_float(b >> 4, 0) * x_odd[None, :]
            s = tl.load(s_ptr + cols_in * n_groups + k0 // GROUP).to(tl.float32)[:, None]
            z = tl.load(z_ptr + cols_in * n_groups + k0 // GROUP).to(tl.float32)[:, None]
            acc += part * s + (z - 8.0 * s) * (x_even + x_odd)[None, :]
        out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + cols, out.to(tl.bfloat16), mask=cols < N)
    else:
        tl.atomic_add(out_ptr + cols, out, mask=cols < N)


def quantized(fmt, w):
    opts = QuantOptions.from_dict({"scheme": "int4_weight_only" if fmt == "int4_tinygemm" else "int8_weight_only",
                                   **({"group_size": 128} if fmt == "int4_tinygemm" else {})})
    q = opts.scheme_def.quantize_weight(w, opts)
    return q["qweight"], q["scale"], q.get("zero")


def launch(variant, fmt, x, qw, s, z, N, K, cfg):
    bn, bk, sk, warps, stages = cfg
    M = x.shape[0]
    out = torch.zeros((M, N), dtype=torch.float32 if sk > 1 else torch.bfloat16, device=x.device)
    grid = (triton.cdiv(N, bn), sk)
    z = s if z is None else z
    if variant == "gemv_eo":
        gemv_eo_kernel[grid](x, qw, s, z, out, N, K, qw.stride(0), FORMAT=fmt, GROUP=128, BLOCK_N=bn, BLOCK_K=bk,
                             SPLIT_K=sk, num_warps=warps, num_stages=stages)
    else:
        swap_ab_kernel[grid](x, qw, s, z, out, M, N, K, x.stride(0), qw.stride(0), FORMAT=fmt, GROUP=128,
                             EVEN_ODD=variant == "swap_ab_eo", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                             num_warps=warps, num_stages=stages)
    return out


def configs(variant, fmt):
    if variant == "gemv_eo":
        bks = (128,) if fmt == "int4_tinygemm" else (128, 256, 512)
        return list(itertools.product((16, 32, 64), bks, (1, 2, 4, 8), (4, 8), (1, 3)))
    bks = (64, 128) if fmt == "int4_tinygemm" else (64, 128, 256)
    return list(itertools.product((64, 128), bks, (1, 2, 4, 8), (4,), (3, 5)))


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    torch.manual_seed(0)
    results = []
    for fmt, (name, N, K) in itertools.product(("int4_tinygemm", "int8"), SHAPES):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, s, z = quantized(fmt, w)
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            row = {"fmt": fmt, "shape": name, "M": M, "bf16_us": bench(lambda: F.linear(x, w))}
            act, wf = ("float", fmt)
            cur = lambda: fused_linear(x, qw, s, z, None, None, act, wf, 4 if fmt != "int8" else 8,  # noqa: E731
                                       128 if fmt != "int8" else 0, torch.bfloat16)
            cur()
            row["template_us"] = bench(cur)
            for variant in ("gemv_eo", "swap_ab", "swap_ab_eo"):
                if variant == "gemv_eo" and M != 1 or variant == "swap_ab_eo" and fmt == "int8":
                    continue
                best = None
                for cfg in configs(variant, fmt):
                    if time.time() > deadline:
                        break
                    if K < cfg[1] * cfg[2]:
                        continue
                    try:
                        out = launch(variant, fmt, x, qw, s, z, N, K, cfg)
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        if err > 0.2:
                            row.setdefault("errors", []).append([variant, cfg, err])
                            continue
                        t = bench(lambda: launch(variant, fmt, x, qw, s, z, N, K, cfg))
                    except Exception as e:  # noqa: BLE001
                        row.setdefault("failures", []).append([variant, cfg, str(e)[:200]])
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    row[variant] = {"us": best[0], "cfg": best[1]}
            print(json.dumps(row), flush=True)
            results.append(row)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
