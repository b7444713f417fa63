"""The kernel source Inductor generates from (intx_linear.h), built standalone with intx_linear_check.cpp: every
bit width, GEMV and GEMM, against a float64 reference. aarch64 builds are cross-compiled and run under qemu-user:
each -march picks its micro-kernels at compile time (NEON, dotprod, i8mm) and the check prints which it ran;
x86 builds run natively (AVX2 where the CPU has it, and the portable fallback).
CI needs the Debian packages g++-aarch64-linux-gnu and qemu-user-static."""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import qcompile.kernels.cpu

KERNEL_DIR = Path(qcompile.kernels.cpu.__file__).parent
CHECK_SOURCE = Path(__file__).parent / "intx_linear_check.cpp"
CROSS_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64-static"
# (8 bit widths, row-major + 4- and 8-bit interleaved) x 2 group sizes x 12 shapes x 2 entry points, + inf / NaN
EXPECTED_SUMMARY = "481 passed, 0 failed"

needs_cross = pytest.mark.skipif(
    shutil.which(CROSS_CXX) is None or shutil.which(QEMU) is None,
    reason=f"{CROSS_CXX} / {QEMU} not found: apt-get install g++-aarch64-linux-gnu qemu-user-static")


def _build(tmp_path, compiler, flags, name) -> Path:
    binary = tmp_path / name
    subprocess.run([compiler, "-O2", "-std=c++17", *flags, f"-I{KERNEL_DIR}", str(CHECK_SOURCE), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


def _run(command) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _assert_checked(result, isa):
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"isa {isa}"
    assert lines[-1] == EXPECTED_SUMMARY, result.stdout


@needs_cross
@pytest.mark.parametrize("march, qemu_cpu, isa", [
    ("armv8-a", "cortex-a53", "arm_neon"),  # no dotprod: the widening-multiply fallback
    ("armv8.2-a+dotprod", "max", "arm_dotprod"),  # vdotq_s32
    ("armv8.2-a+dotprod+i8mm", "max", "arm_i8mm"),  # vmmlaq_s32 in the GEMM, vdotq_s32 in the GEMV
])
def test_aarch64_kernels_under_qemu(tmp_path, march, qemu_cpu, isa):
    binary = _build(tmp_path, CROSS_CXX, ["-static", f"-march={march}"], isa)
    _assert_checked(_run([QEMU, "-cpu", qemu_cpu, str(binary)]), isa)


@needs_cross
def test_dotprod_build_really_uses_dotprod(tmp_path):
    """A core without dotprod (Cortex-A53) must trap on the dotprod build, or the fast path was never emitted."""
    binary = _build(tmp_path, CROSS_CXX, ["-static", "-march=armv8.2-a+dotprod"], "dotprod")
    result = _run([QEMU, "-cpu", "cortex-a53", str(binary)])
    assert result.returncode != 0 and "Illegal instruction" in result.stderr, result.stdout + result.stderr


def _x86_cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


# each build names the ISA flags Inductor passes for it (torch._inductor.cpu_vec_isa), so the kernel Inductor
# compiles on such a CPU is the one checked here
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: apt-get install g++")
@pytest.mark.parametrize("flags, needs, isa", [
    (["-march=x86-64"], set(), "portable"),
    (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma"}, "x86_avx2"),
    (["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx512vnni"],
     {"avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "fma"}, "x86_avx512_vnni"),
])
def test_native_builds(tmp_path, flags, needs, isa):
    missing = needs - _x86_cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    if platform.machine() != "x86_64":
        pytest.skip(f"native x86 builds need an x86-64 host, this is {platform.machine()}")
    binary = _build(tmp_path, "g++", [*flags, "-fopenmp"], isa)
    _assert_checked(_run([str(binary)]), isa)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: apt-get install g++")
def test_avx512_float_gemv_every_dot_product(tmp_path):
    """The 4-bit float GEMV takes float32 tokens as 8-bit digits on vpdpbusd; under QCOMPILE_CPU_DIGITS_DOT=0 it
    picks vdpbf16ps where CPUID has AVX512_BF16 (the check's tolerance follows the one it reports) and the
    float-table kernel otherwise or also under QCOMPILE_CPU_BF16_DOT=0: all three are checked here."""
    cpu = _x86_cpu_flags()
    missing = {"avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "fma"} - cpu
    if missing or platform.machine() != "x86_64":
        pytest.skip(f"needs an x86-64 CPU with AVX-512 VNNI (lacks {sorted(missing)})")
    binary = _build(tmp_path, "g++", ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
                                      "-mavx512vnni", "-fopenmp"], "vnni")
    for env, expected in (({}, "digits"),
                          ({"QCOMPILE_CPU_DIGITS_DOT": "0"}, "bf16_pair" if "avx512_bf16" in cpu else "fp32_table"),
                          ({"QCOMPILE_CPU_DIGITS_DOT": "0", "QCOMPILE_CPU_BF16_DOT": "0"}, "fp32_table")):
        result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                                env={**os.environ, **env})
        _assert_checked(result, "x86_avx512_vnni")
        assert result.stdout.splitlines()[1] == f"float_gemv {expected}", result.stdout
