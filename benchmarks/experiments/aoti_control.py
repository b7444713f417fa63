"""Lab: does torch's own AOTInductor package load on this GPU machine at all, and under which packaging configs?
A plain fp32 model (no qcompile) per case, each exported, packaged and loaded in its own subprocess.

  python benchmarks/experiments/aoti_control.py
"""
import subprocess
import sys

CASE = r"""
import sys, torch
case = sys.argv[1]
class Pointwise(torch.nn.Module):
    def forward(self, x): return x * 2 + 1
class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.fc = torch.nn.Linear(256, 128)
    def forward(self, x): return self.fc(x)
configs = {
    "pointwise": {}, "linear": {},
    "linear_pickle_weights": {"aot_inductor.package_constants_in_so": False,
                              "aot_inductor.package_constants_on_disk_format": "pickle_weights"},
    "linear_binary_blob": {"aot_inductor.package_constants_in_so": False,
                           "aot_inductor.package_constants_on_disk_format": "binary_blob"},
    "linear_embed_kernels": {"aot_inductor.embed_kernel_binary": True},
}
model = (Pointwise() if case == "pointwise" else Linear()).cuda()
x = torch.randn(8, 256, device="cuda")
ep = torch.export.export(model, (x,))
path = torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/{case}.pt2", inductor_configs=configs[case])
print("packaged", flush=True)
f = torch._inductor.aoti_load_package(path)
print("loaded", flush=True)
print("max error", (f(x) - model(x)).abs().max().item(), flush=True)
"""

for case in ("pointwise", "linear", "linear_binary_blob", "linear_embed_kernels"):
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, case], capture_output=True,
                              text=True, timeout=45)
        lines = [l for l in (done.stdout + done.stderr).splitlines() if "Warning" not in l]
        print(case, "rc", done.returncode, "|", " / ".join(lines[:3])[:300], flush=True)
    except subprocess.TimeoutExpired:
        print(case, "timed out", flush=True)
