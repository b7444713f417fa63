"""AOTInductor export on the GPU: a 2-layer Llama-3.1-8B-shaped bf16 model, int4_weight_only and float8_dynamic.

  python benchmarks/export_h200.py --out results/export_h200.json
For each scheme: compile with backend="qcompile", export with qcompile.export, load the package in a fresh
process that never imports qcompile, compare outputs, and time both (CUDA-graph-free medians of do_bench)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import build  # noqa: E402

import qcompile  # noqa: E402
from qcompile.quant.metrics import sqnr_db  # noqa: E402

LOADER = r"""
import json, sys, time, torch, triton
t0 = time.perf_counter()
f = torch._inductor.aoti_load_package(sys.argv[1])
ids = torch.load(sys.argv[2], weights_only=True).cuda()
out = f(ids); torch.cuda.synchronize()
load_s = time.perf_counter() - t0
ms = triton.testing.do_bench(lambda: f(ids), warmup=25, rep=200, return_mode="median")
torch.save(out.cpu(), sys.argv[3])
print(json.dumps({"load_s": load_s, "package_ms": ms, "qcompile_imported": "qcompile" in sys.modules}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--schemes", default="int4_weight_only,float8_dynamic")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    import triton

    rows = []
    tmp = tempfile.mkdtemp()
    ids = torch.randint(0, 128256, (1, args.tokens), device="cuda")
    torch.save(ids.cpu(), os.path.join(tmp, "ids.pt"))
    for scheme in args.schemes.split(","):
        torch._dynamo.reset()
        model = build(layers=2)
        options = {"scheme": scheme, "keep_float_weights": True}
        with torch.no_grad():
            ref = model(ids)
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="qcompile", options=options)
            out = compiled(ids)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            compiled_ms = triton.testing.do_bench(lambda: compiled(ids), warmup=25, rep=200, return_mode="median")
            t0 = time.perf_counter()
            path = qcompile.export(model, (ids,), options, package_path=os.path.join(tmp, f"{scheme}.pt2"))
            export_s = time.perf_counter() - t0
        done = subprocess.run([sys.executable, "-c", LOADER, path, os.path.join(tmp, "ids.pt"),
                               os.path.join(tmp, "out.pt")], capture_output=True, text=True)
        if done.returncode:
            rows.append({"scheme": scheme, "loader_returncode": done.returncode, "stdout": done.stdout[-2000:],
                         "stderr": done.stderr[-3000:], "package": path, "compiled_ms": compiled_ms,
                         "compile_s": compile_s, "export_s": export_s})
            continue
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
        pkg_out = torch.load(os.path.join(tmp, "out.pt"), weights_only=True).cuda()
        rows.append({
            "scheme": scheme, "compile_s": compile_s, "export_s": export_s, "compiled_ms": compiled_ms,
            "package_ms": loaded["package_ms"], "package_over_compiled": loaded["package_ms"] / compiled_ms,
            "load_s": loaded["load_s"], "package_mb": os.path.getsize(path) / 1e6,
            "qcompile_imported_by_loader": loaded["qcompile_imported"],
            "sqnr_package_vs_compiled_db": sqnr_db(out.float(), pkg_out.float()),
            "sqnr_vs_bf16_db": sqnr_db(ref.float(), pkg_out.float()),
        })
        print(json.dumps(rows[-1]), flush=True)
        del model, compiled
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(sys.argv), "tokens": args.tokens}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
