"""Lab: does torch's own AOTInductor package load on this GPU machine at all, and which loading step crashes?
A plain fp32 model (no qcompile): packaged once per config in one subprocess, then each loading step runs in a
fresh subprocess (faulthandler on), so a segfault names its step.

  python benchmarks/experiments/aoti_control.py [--timeout 150]
"""
import argparse
import subprocess
import sys

PACKAGE = r"""
import sys, torch
case = sys.argv[1]
class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.fc = torch.nn.Linear(256, 128)
    def forward(self, x): return self.fc(x)
configs = {
    "linear": {},
    "linear_binary_blob": {"aot_inductor.package_constants_in_so": False,
                           "aot_inductor.package_constants_on_disk_format": "binary_blob"},
    "linear_embed_kernels": {"aot_inductor.embed_kernel_binary": True},
}
torch.manual_seed(0)
model = Linear().cuda()
x = torch.randn(8, 256, device="cuda")
ep = torch.export.export(model, (x,))
torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/{case}.pt2", inductor_configs=configs[case])
torch.save({"x": x.cpu(), "y": model(x).cpu()}, f"/tmp/{case}.io")
print("packaged", flush=True)
"""

# Each step is one way in, from the highest level to the lowest; the first that survives points at the crash.
LOAD = r"""
import sys, os, zipfile, glob, torch
case, step = sys.argv[1], sys.argv[2]
path = f"/tmp/{case}.pt2"
io = torch.load(f"/tmp/{case}.io", weights_only=True)
x = io["x"].cuda()
torch.cuda.init(); torch.empty(1, device="cuda")
if step == "metadata":
    print(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "model"), flush=True)
    raise SystemExit
if step == "device_info":
    from torch._inductor.codecache import get_device_information
    print(get_device_information("cuda"), flush=True)
    raise SystemExit
if step == "aoti_load_package":
    f = torch._inductor.aoti_load_package(path)
elif step == "loader_device0":
    from torch._inductor.package.package import AOTICompiledModel
    f = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, 0))
elif step == "loader_single_thread":
    from torch._inductor.package.package import AOTICompiledModel
    f = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", True, 1, -1))
elif step == "runner_so":
    # the legacy way in: unzip, then the container runner on the .so with its cubin folder
    out = f"/tmp/{case}_unzipped"
    zipfile.ZipFile(path).extractall(out)
    so = glob.glob(f"{out}/**/*.so", recursive=True)
    print("so files", so, flush=True)
    runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so[0], 1, "cuda", os.path.dirname(so[0]))
    f = lambda x: runner.run([x])[0]
print("loaded", flush=True)
print("max error", (f(x) - io["y"].cuda()).abs().max().item(), flush=True)
"""


def run(args, timeout):
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", *args], capture_output=True, text=True,
                              timeout=timeout)
        lines = [l for l in (done.stdout + done.stderr).splitlines() if "Warning" not in l and l.strip()]
        return f"rc {done.returncode} | " + " / ".join(lines[-6:])[:600]
    except subprocess.TimeoutExpired:
        return "timed out"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--cases", default="linear,linear_binary_blob,linear_embed_kernels")
    ap.add_argument("--steps", default="metadata,device_info,aoti_load_package,loader_device0,loader_single_thread,"
                                       "runner_so")
    a = ap.parse_args()
    for case in a.cases.split(","):
        print(case, "package:", run([PACKAGE, case], a.timeout), flush=True)
        for step in a.steps.split(","):
            print(case, step + ":", run([LOAD, case, step], 60), flush=True)
