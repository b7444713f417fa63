"""Lab: count the SASS instructions of a Triton linear variant for the H200 (sm_90) without a GPU — Triton's
bundled ptxas compiles, cuobjdump disassembles. The inner loop of a GEMV / small-M kernel is where the time goes
at decode sizes (benchmarks: ~6.5 instructions per weight bound the current kernels), so the loop body's
instructions per weight (per thread) is the figure to drive down.

  python benchmarks/experiments/sass_count.py                  # the template's int4/int8 variants
  python benchmarks/experiments/sass_count.py --dump int4_gemv # + that variant's loop SASS
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from qcompile.kernels.triton.gemm import quantized_linear_kernel

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# pointer args, int args (all 16-divisible, as Triton specializes them at these shapes)
POINTERS = ["x_ptr", "x_scale_ptr", "x_zero_ptr", "w_ptr", "w_scale_ptr", "w_zero_ptr", "w_aux_ptr", "bias_ptr",
            "out_ptr"]
INTS = ["M", "N", "K", "stride_xm", "stride_wn", "stride_pg", "stride_om"]


def template_variant(weight_format: str, bits: int, block_m: int, block_n: int, block_k: int, swap_ab=False,
                     activation="float", num_warps=4, planes=False, join_planes=False, fused=False,
                     reduce_each=False, pair_decode=False, scale_after_dot=False, block_product=False):
    """The kernel, its signature, constexprs and attributes for one variant (the KernelConfig fields by name), its
    warps and the weights one program decodes per K block."""
    types = {"x_ptr": {"float": "*bf16", "int8": "*i8", "fp8": "*fp8e4nv"}[activation], "x_scale_ptr": "*fp32", "x_zero_ptr": "*i32",
             "w_ptr": {"int8": "*i8", "fp8": "*fp8e4nv"}.get(weight_format, "*u8"), "w_scale_ptr": "*bf16" if weight_format == "int4_tinygemm" else "*fp32",
             "w_zero_ptr": "*bf16" if weight_format == "int4_tinygemm" else "*u8", "w_aux_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    constants = dict(A_FORMAT=activation, A_SCALE="none" if activation == "float" else "row",
                     A_HAS_ZERO=activation == "int8" and weight_format == "intx",
                     W_FORMAT=weight_format, BITS=bits, GROUP_SIZE=256 if bits in (2, 3) else 128 if bits < 8 else 1,
                     W_HAS_ZERO=weight_format == "int4_tinygemm" or (activation == "int8" and weight_format == "intx"),
                     W_SCALE="row" if weight_format in ("int8", "fp8") else "none", HAS_BIAS=False, BLOCK_M=block_m,
                     BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, GROUP_M=8, SWAP_AB=swap_ab, PLANES=planes, JOIN_PLANES=join_planes,
                     USE_PTX=True, DOT_FP32=False,
                     BF16_BY_BITS=False, A_FUSED=fused, REDUCE_EACH=reduce_each, PAIR_DECODE=pair_decode,
                     SCALE_AFTER_DOT=scale_after_dot, BLOCK_PRODUCT=block_product)
    if fused:  # x arrives in bf16 and the GEMV applies the scale it computes
        types["x_ptr"], constants["A_SCALE"] = "*bf16", "none"
    constants["stride_pn"] = 1  # group parameters column-major (layout.py): Triton specializes the 1
    signature = {**types, **{name: "i32" for name in INTS}, **{name: "constexpr" for name in constants}}
    if block_m == 1:  # M is a guarded 1 at decode (Triton specializes ints equal to 1)
        pass
    names = quantized_linear_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS + INTS if n != "M"}
    weights = block_n * block_k  # weights one program decodes per loop iteration
    return (quantized_linear_kernel, signature, constants, attrs, num_warps, weights)


def compile_sass(fn, signature, constants, attrs, num_warps) -> str:
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    backend = triton.compiler.make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": 3})
    compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    compile_sass.last_ttgir = compiled.asm["ttgir"]
    compile_sass.last_wgmma_serialized = wgmma_serialized(compiled.asm["ptx"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
        compile_sass.last_registers = (int(found.group(1)), int(found.group(2))) if found else (None, None)
        return subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def wgmma_serialized(ptx: str) -> str | None:
    """ptxas's reason when it serializes the kernel's wgmma instructions (info C7515: each one waited for before the
    next issues — the decode never overlaps the tensor cores), else None. Session 15 found every int4 pair-decode
    tile of 16 tokens serialized ("non wgmma instructions defining accumulator registers"): block_product avoids it."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch=sm_{TARGET.arch}a", "-v", str(source), "-o",
                              str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
    found = re.search(r"serialized due to (.*?) in the function", out.stdout + out.stderr)
    return found.group(1) if found else None


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_body(sass: str) -> list[tuple[int, str]]:
    """The instructions of the longest backward branch's range (the main K loop), as (address, opcode)."""
    instructions = [(int(m.group(1), 16), m.group(3), m.group(4)) for line in sass.splitlines()
                    for m in [INSTRUCTION.search(line)] if m]
    best: list[tuple[int, str]] = []
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [(a, o) for a, o, _ in instructions if start <= a <= address]
            if len(body) > len(best):
                best = body
    return best


WGMMA_A = re.compile(r"ttng\.warp_group_dot [^{]*\{[^}]*\} : (tensor<[^*]*#ttg\.dot_op<\{opIdx = 0|!ttg\.memdesc)")


def wgmma_a_operands(ttgir: str) -> dict:
    """Where the first operand of each wgmma (ttng.warp_group_dot) comes from in Triton's TTGIR: "registers" (a
    tensor in the dot_op layout: the decoded weight never goes through shared memory) or "shared" (a memdesc:
    stored to shared memory first); mma_sync counts tt.dot left for mma.sync (tiles under 64 rows per warpgroup)."""
    sources = [m.group(1) for m in WGMMA_A.finditer(ttgir)]
    return {"registers": sum(s.startswith("tensor") for s in sources),
            "shared": sum(s.startswith("!ttg.memdesc") for s in sources),
            "mma_sync": len(re.findall(r"= tt\.dot ", ttgir))}


def summarize(name, sass, weights_per_iteration, threads) -> dict:
    body = loop_body(sass)
    counts = collections.Counter(op.split(".")[0] for _, op in body)
    per_weight = len(body) / (weights_per_iteration / threads) if body else float("nan")
    registers, local_bytes = getattr(compile_sass, "last_registers", (None, None))
    return {"variant": name, "registers": registers, "local_bytes": local_bytes, "loop_instructions": len(body), "weights_per_thread": weights_per_iteration / threads,
            "instructions_per_weight": round(per_weight, 2), "loop_shared_stores": counts["STS"],
            "wgmma_a": wgmma_a_operands(getattr(compile_sass, "last_ttgir", "")),
            "wgmma_serialized": getattr(compile_sass, "last_wgmma_serialized", None), "top": counts.most_common(12)}


VARIANTS = {
    "int4_gemv": dict(weight_format="int4_tinygemm", bits=4, block_m=1, block_n=32, block_k=128),
    "int4_swap16": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=64, block_k=128, swap_ab=True),
    "int4_planes16": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128, swap_ab=True,
                          planes=True),
    "int4_joined16": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128, swap_ab=True,
                          planes=True, join_planes=True),
    "int4_planes16_n256": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=256, block_k=128,
                               swap_ab=True, planes=True),
    "int8dyn_int4_planes16": dict(weight_format="intx", bits=4, block_m=16, block_n=128, block_k=128, swap_ab=True,
                                  planes=True, activation="int8"),
    "int8dyn_int4_swap16": dict(weight_format="intx", bits=4, block_m=16, block_n=64, block_k=128, swap_ab=True,
                                activation="int8"),
    "int8dyn_gemv": dict(weight_format="int8", bits=8, block_m=1, block_n=128, block_k=256, activation="int8"),
    "int8dyn_int4_gemv": dict(weight_format="intx", bits=4, block_m=1, block_n=256, block_k=128, activation="int8"),
    "int8dyn_swap16": dict(weight_format="int8", bits=8, block_m=16, block_n=64, block_k=128, swap_ab=True,
                           activation="int8"),
    "fp8dyn_swap16": dict(weight_format="fp8", bits=8, block_m=16, block_n=64, block_k=128, swap_ab=True,
                          activation="fp8"),
    "fp8_wo_swap16": dict(weight_format="fp8", bits=8, block_m=16, block_n=64, block_k=128, swap_ab=True),
    "fp8_wo_gemv": dict(weight_format="fp8", bits=8, block_m=1, block_n=32, block_k=256),
    "int2_planes16": dict(weight_format="intx", bits=2, block_m=16, block_n=128, block_k=256, swap_ab=True,
                          planes=True),
    "int2_swap16": dict(weight_format="intx", bits=2, block_m=16, block_n=64, block_k=128, swap_ab=True),
    "int3_planes16": dict(weight_format="intx", bits=3, block_m=16, block_n=64, block_k=512, swap_ab=True,
                          planes=True),
    "int3_swap16": dict(weight_format="intx", bits=3, block_m=16, block_n=64, block_k=128, swap_ab=True),
    "int4_pairs16": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=64, block_k=128, swap_ab=True,
                         pair_decode=True),
    "int4_pairs16_n128": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128,
                              swap_ab=True, pair_decode=True),
    "int4_pairs16_n128_after": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128,
                                    swap_ab=True, pair_decode=True, scale_after_dot=True),
    "int4_pairs128_n128_after": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=128, block_k=128,
                                     swap_ab=True, pair_decode=True, num_warps=8, scale_after_dot=True),
    "int4_pairs128": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=64, block_k=128, swap_ab=True,
                          pair_decode=True),
    "int4_pairs16_n128_product": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128,
                                      swap_ab=True, pair_decode=True, block_product=True),
    "int4_pairs64_n128_product": dict(weight_format="int4_tinygemm", bits=4, block_m=64, block_n=128, block_k=128,
                                      swap_ab=True, pair_decode=True, block_product=True),
    "int4_pairs128_n256_k64_product": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=256,
                                           block_k=64, swap_ab=True, pair_decode=True, block_product=True,
                                           num_warps=8),
    "int4_pairs16_k256": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=64, block_k=256,
                              swap_ab=True, pair_decode=True),
    "int4_pairs16_n128_k256": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=256,
                                   swap_ab=True, pair_decode=True),
    "int4_pairs128_n128": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=128, block_k=128,
                               swap_ab=True, pair_decode=True, num_warps=8),
    "int4_gemv_n128": dict(weight_format="int4_tinygemm", bits=4, block_m=1, block_n=128, block_k=128),
    "int4_gemv_n64_w1": dict(weight_format="int4_tinygemm", bits=4, block_m=1, block_n=64, block_k=128, num_warps=1),
    "int4_gemv_n64_k512": dict(weight_format="int4_tinygemm", bits=4, block_m=1, block_n=64, block_k=512),
    "int4_joined64": dict(weight_format="int4_tinygemm", bits=4, block_m=64, block_n=64, block_k=128, planes=True,
                          join_planes=True),
    "int4_swap128": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=64, block_k=128, swap_ab=True),
    "int4_tile128": dict(weight_format="int4_tinygemm", bits=4, block_m=128, block_n=128, block_k=64, num_warps=8),
    "int4_tile16": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=64, block_k=128),
    "int8_gemv": dict(weight_format="int8", bits=8, block_m=1, block_n=32, block_k=256),
    "fp8_wo_rows16": dict(weight_format="fp8", bits=8, block_m=1, block_n=16, block_k=512),
    "fp8_wo_rows16_reduce_each": dict(weight_format="fp8", bits=8, block_m=1, block_n=16, block_k=512,
                                      reduce_each=True),
    "int8_swap16": dict(weight_format="int8", bits=8, block_m=16, block_n=64, block_k=128, swap_ab=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dump", default="")
    args = ap.parse_args()
    for name in args.variants.split(","):
        fn, signature, constants, attrs, warps, weights = template_variant(**VARIANTS[name])
        sass = compile_sass(fn, signature, constants, attrs, warps)
        print(summarize(name, sass, weights, 32 * warps))
        if name == args.dump:
            for address, opcode in loop_body(sass):
                print(f"  {address:05x} {opcode}")


if __name__ == "__main__":
    main()
