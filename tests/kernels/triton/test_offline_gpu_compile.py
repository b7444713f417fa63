"""The template's GPU variants through Triton's compiler on the CPU, in processes that do not interpret Triton:
the interpreter runs the kernels' Python only, so what only the compiler sees would first show on the GPU —
a compile-only error (a constexpr reassigned in an unrolled loop, inline PTX that ptxas rejects), or the TTIR
that Inductor's analysis of user kernels reads."""
import os
import pathlib
import subprocess
import sys

from sm90_compile_probe import ACTIVATION_VARIANTS, NOT_SERIALIZED, REGISTER_A, VARIANTS


def _run_without_interpreter(script: str) -> str:
    here = pathlib.Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[2]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, script], cwd=here, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_gpu_variants_compile_for_sm90():
    """sm_90 (Hopper), ptxas included. The pair-decode tile's decoded int4 weight is wgmma's register operand
    (Triton's TTGIR: every warp_group_dot takes A as a dot_op tensor) and its K loop stores nothing to shared
    memory: the decoded tile never round-trips through it."""
    lines = [line.split() for line in _run_without_interpreter("sm90_compile_probe.py").splitlines() if line.strip()]
    compiled = {line[0]: int(line[1]) for line in lines if line[0] not in ("wgmma_a", "serialized")}
    assert set(compiled) == set(VARIANTS) | set(ACTIVATION_VARIANTS) and all(size > 0 for size in compiled.values())
    register_a = {line[1]: tuple(map(int, line[2:])) for line in lines if line[0] == "wgmma_a"}
    assert set(register_a) == set(REGISTER_A)
    for name, (from_registers, from_shared, loop_shared_stores) in register_a.items():
        assert from_registers > 0 and from_shared == 0 and loop_shared_stores == 0, (name, register_a[name])
    # ptxas issues their wgmma asynchronously (the in-place pair tile's it serializes: sass_count.wgmma_serialized)
    assert {line[1]: line[2] for line in lines if line[0] == "serialized"} == dict.fromkeys(NOT_SERIALIZED, "no")


def test_inductor_sees_the_template_write_only_its_output():
    """With its inline PTX (the decode and the L1 prefetch), torch's analysis alone gives up and assumes the
    kernel writes every input, weights included (then CUDA graphs are skipped for "mutated inputs"); with
    qcompile's patch (_compat.install_ttir_memo) it finds the one output."""
    alone, patched = _run_without_interpreter("ttir_writes_probe.py").split("\n")[:2]
    assert {"w_ptr", "w_scale_ptr", "x_ptr"} <= set(alone.split())  # the probe reached the non-pure asm
    assert patched.split() == ["out_ptr"]
