"""Lab (not a product benchmark): what bounds the int4 g128 linear at M=1 on the H200?

Session 3's run: every group-wise format took about as long as 8-bit weights (gate_up at M=1: int4 46 us, 2-bit
44 us, int8 44 us), and the plane decode, which halved the instructions per weight, did not move it. This lab
separates the memory access pattern from the decode, on gate_up (28672 x 4096) and down (4096 x 14336):
  copy        torch's device copy of the packed weight (the DRAM ceiling)
  load        a Triton kernel reading the packed weight in the template's tiles ([BLOCK_N rows, BLOCK_K / 2
              bytes] row-major, split-K) and reducing it cheaply: the access pattern's own ceiling
  load+rowmaj the same plus the scale and zero loads per (row, group), row-major [N, K/g] (session 3's layout)
  load+colmaj the same with column-major parameters (layout.py: this session's layout)
  template    qcompile's template, the autotuner's pick, with row-major vs column-major parameters
  tinygemm    torch's _weight_int4pack_mm (torchao's int4 weight-only kernel)
each swept over tile shapes; medians of CUDA-graph replays.

  python benchmarks/experiments/int4_bound_lab.py --out $OUT/int4_bound.json
  TRITON_INTERPRET=1 python benchmarks/experiments/int4_bound_lab.py --smoke      # CPU: the kernels run
"""
import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

SHAPES = [("gate_up", 28672, 4096), ("down", 4096, 14336)]
GROUP = 128


@triton.jit
def load_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_pn, stride_pg,
                PARAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Reads [BLOCK_N, BLOCK_K / 2] bytes of the packed weight per step (and the group parameters if PARAMS),
    reduces them to one int per row: the memory traffic of the template without its decode and dot."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.int32)
    facc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * k_span, min(K, pid_k * k_span + k_span), BLOCK_K):
        b = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :])
        acc += b.to(tl.int32)
        if PARAMS:
            g = k0 // 128
            facc += tl.load(s_ptr + rows * stride_pn + g * stride_pg).to(tl.float32)
            facc += tl.load(z_ptr + rows * stride_pn + g * stride_pg).to(tl.float32)
    tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, axis=1).to(tl.float32) + facc)


def bench(fn) -> float:
    fn()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return float("nan")
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int4_bound.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and one config each (interpreter)")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    shapes = [("tiny", 64, 512)] if a.smoke else SHAPES
    tiles = [(64, 128, 1)] if a.smoke else list(itertools.product((32, 64, 128, 256), (128, 256, 512, 1024),
                                                                  (1, 2, 4, 8)))
    from qcompile.kernels.triton import layout
    from qcompile.kernels.triton.ops import spec_for
    from qcompile.kernels.triton.linear import run_linear
    from qcompile.kernels.triton.tuning import candidates
    from qcompile.options import QuantOptions
    results = []
    for shape, N, K in shapes:
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        options = QuantOptions.from_dict({"scheme": "int4_weight_only", "group_size": GROUP})
        q = options.scheme_def.quantize_weight(w, options)
        qc = layout.for_kernels(q)
        packed = q["qweight"]
        nbytes = packed.numel() + 2 * 2 * q["scale"].numel()
        row = dict(shape=shape, N=N, K=K, bytes=nbytes)
        scratch = torch.empty_like(packed)
        row["copy_us"] = bench(lambda: scratch.copy_(packed))
        sweeps = {}
        for params, (s, z) in (("none", (q["scale"], q["zero"])), ("rowmaj", (q["scale"], q["zero"])),
                               ("colmaj", (qc["scale"], qc["zero"]))):
            best = None
            for block_n, block_k, split_k in tiles:
                if K % (block_k * split_k) or N % block_n or block_k > GROUP and params != "none":
                    continue
                out = torch.empty(split_k, N, device=device, dtype=torch.float32)
                run = lambda: load_kernel[(N // block_n, split_k)](  # noqa: E731
                    packed, s, z, out, N, K, packed.stride(0), s.stride(0), s.stride(1), PARAMS=params != "none",
                    BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4)
                us = bench(run)
                if best is None or us < best[0]:
                    best = (us, block_n, block_k, split_k)
            sweeps[params] = best
        row["load"] = sweeps
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        spec = spec_for("float", "int4_tinygemm", 4, GROUP, q["scale"], q["zero"], None)
        template = {}
        for name, t in (("rowmaj", q), ("colmaj", qc)):
            best = None
            for config in candidates(spec, 1, N, K)[:None if not a.smoke else 1]:
                if config.library:
                    continue
                try:
                    us = bench(lambda: run_linear(x, t["qweight"], t["scale"], t["zero"], None, None, spec,
                                                  torch.bfloat16, config))
                except Exception as e:  # a config this shape cannot take
                    print(name, config, type(e).__name__, flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, str(config))
            template[name] = best
        row["template"] = template
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
