"""Times qcompile's Triton linears on the four linears of one Llama-3.1-8B layer, every scheme, M = 1, 16, 128,
8192, next to bf16 cuBLAS and the peers (../shared/bench/peers_h200.py) in the same process.

    python benchmarks/linear_h200.py --out results/ [--peers PATH/peers_h200.py] [--budget-s 420]

Writes results/linear_h200.json (every timing, device, versions, ceilings) and results/linear_h200.md (the
table for BENCHMARKS.md). Times are medians of CUDA-graph replays, as the peers' script takes them. Configs are
tuned on first use and cached on disk (QCOMPILE_CACHE_DIR); kernels are compiled up front in worker processes
so the main process only loads them.
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(__file__))
from harness import kernel_us, log, table, write_json  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
# --shapes may also name linears outside the layer's table, tuned here beforehand so that llama_e2e's compiles find
# their choices cached (tuning inside a compile builds the candidates one by one): our model's LM head, and the
# unfused projections of transformers' LlamaForCausalLM (q and o are "o"'s shape, down is "down"'s)
EXTRA_SHAPES = [("lm_head", 128256, 4096), ("hf_kv", 1024, 4096), ("hf_gate_up", 14336, 4096)]
MS = [1, 16, 128, 8192]
# scheme -> options; group-wise schemes at group 128 (intx at 2 and 3 bits)
SCHEMES = {
    "int4_weight_only": {"group_size": 128},
    "int8_weight_only": {},
    "float8_weight_only": {},
    "float8_dynamic": {"granularity": "row"},
    "int8_dynamic": {},
    "int8_dynamic_int4": {"group_size": 128},
    "float8_dynamic_int4": {"group_size": 128},
    "intx_weight_only_3bit": {"scheme": "intx_weight_only", "bits": 3, "group_size": 128},
    "intx_weight_only_2bit": {"scheme": "intx_weight_only", "bits": 2, "group_size": 128},
    "codebook": {},
    "mxfp8": {},
    "nvfp4": {},
}
# scheme -> peers that implement it (names from peers_h200.py); peers run in this order until the budget ends
PEERS = {
    "int4_weight_only": ["gemlite_a16w4_g128", "torchao_int4_wo_tinygemm"],
    "int8_weight_only": ["gemlite_a16w8_int8", "torchao_int8_wo"],
    "float8_weight_only": ["torchao_fp8_wo"],
    "float8_dynamic": ["raw_fp8_rowwise_scaled_mm", "torchao_fp8_rowwise", "gemlite_a8w8_fp8_dyn"],
    "int8_dynamic": ["gemlite_a8w8_int8_dyn", "raw_int8_int_mm_dyn", "torchao_int8_dyn"],
}
PEER_ORDER = ["gemlite_a16w4_g128", "torchao_int4_wo_tinygemm", "gemlite_a16w8_int8", "raw_fp8_rowwise_scaled_mm",
              "torchao_fp8_rowwise", "gemlite_a8w8_fp8_dyn", "gemlite_a8w8_int8_dyn", "torchao_int8_dyn",
              "torchao_fp8_wo", "torchao_int8_wo", "raw_int8_int_mm_dyn"]
# seconds per call at M > 1 (int8 weight-only), 0.1 s per call at M=8192 (tinygemm): see peers-h200.md; bare
# `_int_mm` (torchao's int8 dynamic too) refuses M <= 16 ("self.size(0) needs to be greater than 16")
PEER_SKIP_M = {"torchao_int8_wo": {16, 128, 8192}, "torchao_int4_wo_tinygemm": {8192},
               "torchao_int8_dyn": {1, 16}, "raw_int8_int_mm_dyn": {1, 16}}


def scheme_options(name: str) -> dict:
    opts = dict(SCHEMES[name])
    return {"scheme": opts.pop("scheme", name), **opts}


def fused_linear_args(name: str, w: torch.Tensor):
    """(fused_linear arguments after x, bias) for a bf16 weight, through the scheme's own quantize_weight."""
    from qcompile.kernels.triton import layout
    from qcompile.options import QuantOptions

    options = QuantOptions.from_dict(scheme_options(name))
    q = layout.for_kernels(options.scheme_def.quantize_weight(w, options))  # as the backend stores it on CUDA
    table = {  # scheme -> (activation, weight format, qweight, w_scale, w_zero, w_aux, bits, group size)
        "int4_weight_only": ("float", "int4_tinygemm", "qweight", "scale", "zero", None, 4),
        "int8_weight_only": ("float", "int8", "qweight", "scale", None, None, 8),
        "float8_weight_only": ("float", "fp8", "qweight", "scale", None, None, 8),
        "float8_dynamic": ("fp8_row", "fp8", "qweight", "scale", None, None, 8),
        "int8_dynamic": ("int8_sym", "int8", "qweight", "scale", None, None, 8),
        "int8_dynamic_int4": ("int8_asym", "intx", "qweight", "scale", "zero", None, 4),
        "float8_dynamic_int4": ("fp8_row", "intx", "qweight", "scale", None, None, 4),
        "intx_weight_only": ("float", "intx", "qweight", "scale", None, None, options.bits),
        "codebook": ("float", "codebook", "qweight", "scale", None, "codebook", 4),
        "mxfp8": ("mxfp8", "mxfp8", "qweight", "scale", None, None, 8),
        "nvfp4": ("nvfp4", "nvfp4", "qweight", "block_scale", None, "tensor_scale", 4),
    }[options.scheme]
    act, fmt, qw, sc, zr, aux, bits = table
    group = {"mxfp8": 32, "nvfp4": 16}.get(fmt, options.group_size or 0)
    get = lambda k: None if k is None else q[k]  # noqa: E731
    return (get(qw), get(sc), get(zr), get(aux), act, fmt, bits, group)


def _precompile_one(task):
    """Worker: compile one (scheme, M, config) on small tensors with the same specialisation as the real ones."""
    name, M, config = task
    os.environ.setdefault("QCOMPILE_AUTOTUNE", "0")
    from qcompile.kernels.triton.linear import run_linear
    from qcompile.kernels.triton.ops import spec_for

    torch.manual_seed(0)
    N, K = 256, 4096
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    qw, sc, zr, aux, act, fmt, bits, group = fused_linear_args(name, w)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    spec = spec_for(act, fmt, bits, group, sc, zr, None)
    try:
        run_linear(x, qw, sc, zr, aux, None, spec, torch.bfloat16, config)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported; the tuner skips configs that fail
        return f"{name} M={M} {config}: {type(e).__name__}: {str(e)[:200]}"


def precompile(names, workers: int, only_cached: bool) -> list[str]:
    """Compile every candidate config (or, with only_cached, the configs the disk cache already chose)."""
    from qcompile.kernels.triton.ops import spec_for
    from qcompile.kernels.triton.tuning import candidates, select_config, untried_candidates

    tasks = set()
    device_name = torch.cuda.get_device_name()
    for name in names:
        w = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
        qw, sc, zr, aux, act, fmt, bits, group = fused_linear_args(name, w)
        spec = spec_for(act, fmt, bits, group, sc, zr, None)
        for M in MS:
            if only_cached:  # the cached choices, and the candidates added since (the timing measures them)
                chosen = [c for _, N, K in SHAPES for c in [select_config(spec, M, N, K, device_name, None),
                                                            *untried_candidates(spec, M, N, K, device_name)]]
            else:
                chosen = candidates(spec, M, 4096, 4096)
            tasks |= {(name, M, c) for c in chosen if not c.library}
    with mp.get_context("spawn").Pool(workers) as pool:
        return [r for r in pool.imap_unordered(_precompile_one, tasks) if r]


def peer_fn(peers_mod, kind: str, N: int, K: int):
    """The peers script's callable for one peer kind on an [N, K] linear."""
    build = (peers_mod.torchao_fn if kind.startswith("torchao") else
             peers_mod.gemlite_fn if kind.startswith("gemlite") else peers_mod.raw_fn)
    return build(kind, N, K)


def _warm_peer(job) -> str | None:
    """Build one peer and run it at every M, untimed, so that Inductor's and Triton's on-disk caches hold its
    kernels before the timed phase builds it again (then cache hits: the peers' budget goes to timing). Only
    compiled code is shared: gemlite's autotuner still picks its configs in the timed phase, on an idle GPU."""
    peers_path, kind, ms = job
    peers_mod = load_peers(peers_path)
    torch._dynamo.config.recompile_limit = 10**4
    torch._dynamo.config.accumulated_recompile_limit = 10**5
    failures = []  # one M that fails (torchao's int8 at M <= 16) must not leave the other Ms and shapes cold
    for _, N, K in SHAPES:
        try:
            fn = peer_fn(peers_mod, kind, N, K)
        except Exception as e:
            failures.append(f"N={N} K={K}: {type(e).__name__}: {str(e)[:200]}")
            continue
        for M in ms:
            if M not in PEER_SKIP_M.get(kind, ()):
                try:
                    with torch.no_grad():
                        fn(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
                except Exception as e:
                    failures.append(f"N={N} K={K} M={M}: {type(e).__name__}: {str(e)[:120]}")
        del fn
        torch._dynamo.reset()
    return f"{kind}: " + "; ".join(failures[:3]) if failures else None


def load_peers(path: str):
    """The peers script as a module, with gemlite's tuned configs loaded."""
    spec = importlib.util.spec_from_file_location("peers_h200", path)
    peers_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers_mod)
    load_gemlite_configs()
    return peers_mod


def gemlite_config_path() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE_DIR", ".cache/qcompile")) / "gemlite_configs.json"


def load_gemlite_configs() -> None:
    """gemlite's autotuned configs from an earlier run on this GPU, as ours come from our tuning cache: both sides
    then spend the run timing, not tuning (gemlite tunes what the file lacks)."""
    if gemlite_config_path().exists():
        import gemlite

        gemlite.load_config(str(gemlite_config_path()))


def save_gemlite_configs() -> None:
    if "gemlite" in sys.modules:
        gemlite_config_path().parent.mkdir(parents=True, exist_ok=True)
        sys.modules["gemlite"].cache_config(str(gemlite_config_path()))


def warm_peers(peers_path: str, kinds: list[str]):
    """Start warming every peer (its compiles) in the background, one process per peer."""
    if not kinds:
        return None
    pool = mp.get_context("spawn").Pool(len(kinds))
    return pool, pool.map_async(_warm_peer, [(peers_path, k, list(MS)) for k in kinds])


def time_ours(names, rows, deadline):
    from qcompile.kernels.triton.ops import fused_linear
    from qcompile.kernels.triton.tuning import CACHE, cache_key
    from qcompile.kernels.triton.ops import spec_for

    device_name = torch.cuda.get_device_name()
    for name in names:
        for shape, N, K in SHAPES:
            if time.time() > deadline:
                print("budget reached", flush=True)
                return
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            args = fused_linear_args(name, w)
            del w
            for M in MS:
                if name.startswith("intx") and M > 16:
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                fn = lambda: fused_linear(x, *args[:4], None, *args[4:], torch.bfloat16)  # noqa: E731
                try:
                    with torch.no_grad():
                        us = kernel_us(fn)
                    spec = spec_for(*args[4:8], args[1], args[2], None)
                    config = CACHE.get(cache_key(spec, M, N, K, device_name))
                    rows.append(dict(kind=f"qcompile_{name}", shape=shape, N=N, K=K, M=M, us=us,
                                     config=None if config is None else config.__dict__))
                    log(f"qcompile_{name:24s} {shape:8s} M={M:5d} {us:9.1f} us  {config}")
                except Exception as e:
                    rows.append(dict(kind=f"qcompile_{name}", shape=shape, M=M, err=f"{type(e).__name__}: {e}"[:300]))
                    print(f"qcompile_{name} {shape} M={M}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del args
            torch.cuda.empty_cache()


def time_peers(peers_mod, kinds, rows, deadline, save=lambda: None):
    for kind in kinds:
        for shape, N, K in SHAPES:
            if time.time() > deadline:
                print(f"peer budget reached at {kind}", flush=True)
                return
            try:
                fn = peer_fn(peers_mod, kind, N, K)
            except Exception as e:
                rows.append(dict(kind=kind, shape=shape, M=None, err=f"build: {type(e).__name__}: {str(e)[:200]}"))
                print(f"{kind} {shape}: build failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            for M in MS:
                if M in PEER_SKIP_M.get(kind, ()):
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                try:
                    with torch.no_grad():
                        us = kernel_us(lambda: fn(x))
                    rows.append(dict(kind=kind, shape=shape, N=N, K=K, M=M, us=us))
                    log(f"{kind:28s} {shape:8s} M={M:5d} {us:9.1f} us")
                except Exception as e:
                    rows.append(dict(kind=kind, shape=shape, M=M, err=f"{type(e).__name__}: {str(e)[:200]}"))
                    print(f"{kind} {shape} M={M}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del fn
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            save()


def layer_totals(rows, shape_count: int = len(SHAPES)) -> dict[str, dict[int, float]]:
    """kind -> M -> sum over the run's linears (only where all of them were timed)."""
    per = {}
    for r in rows:
        if "us" in r:
            per.setdefault(r["kind"], {}).setdefault(r["M"], {})[r["shape"]] = r["us"]
    return {k: {M: sum(d.values()) for M, d in ms.items() if len(d) == shape_count} for k, ms in per.items()}


def markdown(result: dict) -> str:
    totals = layer_totals(result["rows"], len(result.get("shapes", SHAPES)))
    base = totals.get("bf16_cublas", {})

    def cell(kind, M):
        t = totals.get(kind, {}).get(M)
        if t is None:
            return "—"
        return f"{t:.0f} us ({base[M] / t:.2f}x)" if M in base else f"{t:.0f} us"

    rows = [["bf16 cuBLAS (`F.linear`)", *(cell("bf16_cublas", M) for M in MS)]]
    for name in SCHEMES:
        rows.append([f"**qcompile {name}**", *(cell(f"qcompile_{name}", M) for M in MS)])
        rows += [[f"&nbsp;&nbsp;peer {peer}", *(cell(peer, M) for M in MS)] for peer in PEERS.get(name, [])
                 if peer in totals]
    return table(["scheme", *(f"M={M}" for M in MS)], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results")
    ap.add_argument("--peers", default=None, help="path to peers_h200.py (peers are skipped without it)")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts to time")
    ap.add_argument("--shapes", default=",".join(s for s, _, _ in SHAPES),
                    help="linears to time (default: the layer's four; also: lm_head — the table then sums these)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop timing qcompile after this many seconds")
    ap.add_argument("--peer-budget-s", type=float, default=150)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--only-cached", action="store_true",
                    help="compile only the configs the cache chose and the candidates they never met")
    ap.add_argument("--skip-peers-after-ours", action="store_true")
    ap.add_argument("--wait-for", default=None, help="a pid to wait for before timing (a GPU test run)")
    ap.add_argument("--peer-kinds", default=None, help="comma-separated peers to run (default: every peer of --schemes)")
    a = ap.parse_args()
    MS[:] = [int(m) for m in a.ms.split(",")]
    known = {s[0]: s for s in SHAPES + EXTRA_SHAPES}
    unknown = [s for s in a.shapes.split(",") if s not in known]
    if unknown:
        ap.error(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    SHAPES[:] = [known[s] for s in a.shapes.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.schemes.split(",")
    start = time.time()
    torch._dynamo.config.recompile_limit = 10**4
    torch._dynamo.config.accumulated_recompile_limit = 10**5

    wanted = [k for k in PEER_ORDER if k in {p for n in names for p in PEERS.get(n, [])}]
    if a.peer_kinds:
        wanted = [k for k in wanted if k in a.peer_kinds.split(",")]
    warming = warm_peers(a.peers, wanted) if a.peers else None
    failures = precompile(names, a.workers, a.only_cached)
    print(f"precompiled in {time.time() - start:.0f} s; {len(failures)} configs failed", flush=True)
    for f in failures[:20]:
        print("  ", f, flush=True)
    if a.wait_for:
        while os.path.exists(f"/proc/{a.wait_for}"):
            time.sleep(1)
    warm_failures = []
    if warming is not None:  # nothing else may use the GPU while we time
        pool, pending = warming
        warm_failures = [f for f in pending.get() if f]
        pool.close()
        print(f"peers warmed at {time.time() - start:.0f} s; failures: {warm_failures}", flush=True)
    peers_mod = load_peers(a.peers) if a.peers else None
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "shapes": [s[0] for s in SHAPES],
              "rows": [], "precompile_failures": failures,
              "peer_warm_failures": warm_failures}
    if peers_mod is not None:
        result["ceilings"] = peers_mod.ceilings()
        for k in ("torchao", "gemlite"):
            try:
                result[k] = __import__(k).__version__
            except Exception as e:
                result[k] = f"unavailable: {type(e).__name__}"
    timing_start = time.time()
    deadline = timing_start + a.budget_s
    rows = result["rows"]
    time_peers(peers_mod, ["bf16_cublas"], rows, deadline + 60) if peers_mod else None
    if peers_mod is None:
        for shape, N, K in SHAPES:
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            for M in MS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                us = kernel_us(lambda: F.linear(x, w))
                rows.append(dict(kind="bf16_cublas", shape=shape, N=N, K=K, M=M, us=us))
    time_ours(names, rows, deadline)
    print(f"qcompile timed at {time.time() - start:.0f} s", flush=True)
    def save():  # the JSON and the table so far: a run stopped by its time limit keeps what it measured
        write_json(out / "linear_h200.json", result)
        (out / "linear_h200.md").write_text(markdown(result) + "\n")
        save_gemlite_configs()

    save()
    if peers_mod is not None and not a.skip_peers_after_ours:
        time_peers(peers_mod, wanted, rows, min(time.time() + a.peer_budget_s, deadline + a.peer_budget_s),
                   save=save)
    result["wall_s"] = time.time() - start
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
