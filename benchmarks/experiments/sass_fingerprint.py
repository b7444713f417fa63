"""Lab: a hash of the sm_90 SASS of the template's variants (sass_count.VARIANTS and the elementwise GEMVs the
tuner picks at M=1), compiled offline — to show that a kernel-source edit left every existing variant's machine
code as it was. Then the H200 tuning seed still holds for them: re-key it (benchmarks/h200_seed.py --rekey-from
<old hash>) instead of tuning everything again.

    python benchmarks/experiments/sass_fingerprint.py > before.txt   # edit the kernels, then:
    python benchmarks/experiments/sass_fingerprint.py > after.txt && diff before.txt after.txt
"""
from __future__ import annotations

import hashlib

import sass_count

VARIANTS = dict(sass_count.VARIANTS)
for fmt, bits in (("fp8", 8), ("mxfp8", 8), ("nvfp4", 4), ("codebook", 4)):
    for block_n, block_k in ((16, 512), (4, 2048), (32, 256), (2, 4096)):
        VARIANTS[f"{fmt}_gemv_{block_n}x{block_k}"] = dict(weight_format=fmt, bits=bits, block_m=1, block_n=block_n,
                                                           block_k=block_k)
VARIANTS["fp8dyn_gemv_16x512"] = dict(weight_format="fp8", bits=8, block_m=1, block_n=16, block_k=512,
                                      activation="fp8")
VARIANTS["fp8_fused_gemv_16x512"] = dict(weight_format="fp8", bits=8, block_m=1, block_n=16, block_k=512, fused=True)


def fingerprint(variant: dict) -> str:
    fn, signature, constants, attrs, warps, _ = sass_count.template_variant(**variant)
    sass = sass_count.compile_sass(fn, signature, constants, attrs, warps)
    instructions = "\n".join(m.group(3) + m.group(4) for line in sass.splitlines()
                             for m in [sass_count.INSTRUCTION.search(line)] if m)
    return hashlib.sha256(instructions.encode()).hexdigest()[:12]


def main() -> None:
    for name, variant in sorted(VARIANTS.items()):
        print(name, fingerprint(variant), flush=True)


if __name__ == "__main__":
    main()
