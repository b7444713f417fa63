"""The template's GPU variants compile for sm_90 (Hopper) through Triton's whole pipeline, ptxas included, on
the CPU: the interpreter runs the kernels' Python only, so a compile-only error (a constexpr reassigned in an
unrolled loop, inline PTX that ptxas rejects) would otherwise first show on the GPU."""
import os
import pathlib
import subprocess
import sys

from sm90_compile_probe import VARIANTS


def test_gpu_variants_compile_for_sm90():
    here = pathlib.Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[2]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "sm90_compile_probe.py"], cwd=here, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = {line.split()[0]: int(line.split()[1]) for line in run.stdout.splitlines() if line.strip()}
    assert set(compiled) == set(VARIANTS) and all(size > 0 for size in compiled.values())
