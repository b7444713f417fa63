"""Lab: why does an AOTInductor package of a CUDA model with qcompile's Triton kernels crash on load? Bisects
scheme x (fused Triton lowering on / off) on a small bf16 MLP; each package loads in a fresh process with
faulthandler on, and once in-process.

  python benchmarks/experiments/export_debug.py --out $OUT/export_debug.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch

import qcompile

LOADER = r"""
import sys, torch
f = torch._inductor.aoti_load_package(sys.argv[1])
print("loaded", flush=True)
x = torch.load(sys.argv[2], weights_only=True).cuda()
out = f(x)
torch.cuda.synchronize()
print("ran", out.shape, float(out.float().abs().mean()), flush=True)
"""


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(512, 1024)
        self.down = torch.nn.Linear(1024, 256, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--schemes", default="int8_weight_only,int4_weight_only,float8_dynamic")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    torch.save(x.cpu(), os.path.join(tmp, "x.pt"))
    rows = []
    qexport = sys.modules["qcompile.export"]  # the package exports a function of the same name
    real_lower = qexport.lower_for_device
    for scheme in args.schemes.split(","):
        for lowered in (True, False):
            qexport.lower_for_device = real_lower if lowered else (lambda gm, device: None)
            model = MLP().cuda().bfloat16()
            path = os.path.join(tmp, f"{scheme}_{lowered}.pt2")
            row = {"scheme": scheme, "lowered": lowered}
            try:
                qcompile.export(model, (x,), {"scheme": scheme}, package_path=path)
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
                    row["files"] = [n for n in names if not n.endswith(".json")][:40]
                    cpp = [n for n in names if n.endswith(".cpp") or n.endswith(".wrapper.cpp")]
                    if cpp:
                        src = z.read(cpp[0]).decode(errors="replace")
                        row["kernel_mentions"] = [line.strip()[:200] for line in src.splitlines()
                                                  if "quantized_linear_kernel" in line or "loadKernel" in line][:12]
            except Exception as e:  # noqa: BLE001
                row["export_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", LOADER, path,
                                   os.path.join(tmp, "x.pt")], capture_output=True, text=True,
                                  env={**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1"})
            row.update(rc=done.returncode, stdout=done.stdout[-1500:], stderr=done.stderr[-4000:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    qexport.lower_for_device = real_lower
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    bad = [r for r in rows if r.get("rc")]
    if bad:  # in-process load of the first crashing package, last (it may take this process down)
        path = os.path.join(tmp, f"{bad[0]['scheme']}_{bad[0]['lowered']}.pt2")
        print("in-process load of", path, flush=True)
        import faulthandler
        faulthandler.enable()
        f = torch._inductor.aoti_load_package(path)
        print("in-process loaded", flush=True)
        print("in-process ran", f(x).shape, flush=True)


if __name__ == "__main__":
    main()
