"""Run as a script, without TRITON_INTERPRET: compile variants of the linear template and of the activation
kernel for sm_90 through Triton's whole pipeline, ptxas included, on a machine without a GPU. The interpreter
runs the kernels' Python, not Triton's compiler: a constexpr reassigned in an unrolled loop, or inline PTX that
ptxas rejects, only shows here. Prints one line per variant: its name and the size of its cubin; then, for the
variants in REGISTER_A, "wgmma_a <name> <dots with A from registers> <from shared memory> <shared stores in the
K loop's SASS>"."""
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks" / "experiments"))
import sass_count  # noqa: E402  (the offline sm_90 variant builder)

VARIANTS = {
    "int4_gemv": dict(weight_format="int4_tinygemm", bits=4, block_m=1, block_n=128, block_k=128),
    "int8_weight_only_gemv": dict(weight_format="int8", bits=8, block_m=1, block_n=128, block_k=256),
    "int8_dynamic_gemv": dict(weight_format="int8", bits=8, block_m=1, block_n=128, block_k=256, activation="int8"),
    "int8_dynamic_int4_gemv": dict(weight_format="intx", bits=4, block_m=1, block_n=128, block_k=128,
                                   activation="int8"),
    "int8_dynamic_int3_gemv": dict(weight_format="intx", bits=3, block_m=1, block_n=64, block_k=256,
                                   activation="int8"),
    "int4_joined_planes": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128,
                               swap_ab=True, planes=True, join_planes=True),
    "int4_pair_decode_tile": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128, block_k=128,
                                  swap_ab=True, pair_decode=True),
    "int4_pair_decode_block_product": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128,
                                           block_k=128, swap_ab=True, pair_decode=True, block_product=True),
    "int4_pair_decode_scale_after_dot": dict(weight_format="int4_tinygemm", bits=4, block_m=16, block_n=128,
                                             block_k=128, swap_ab=True, pair_decode=True, scale_after_dot=True),
    "fp8_dynamic_fused_gemv": dict(weight_format="fp8", bits=8, block_m=1, block_n=2, block_k=4096, activation="fp8",
                                   num_warps=8, fused=True),
    "fp8_weight_only_reduce_each_gemv": dict(weight_format="fp8", bits=8, block_m=1, block_n=16, block_k=512,
                                             reduce_each=True),
    "fp8_dynamic_tile": dict(weight_format="fp8", bits=8, block_m=16, block_n=64, block_k=128, swap_ab=True,
                             activation="fp8"),
}

# variants whose decoded weight must reach wgmma as its register operand, never through shared memory
REGISTER_A = ("int4_pair_decode_tile", "int4_pair_decode_block_product")
# variants whose wgmma ptxas must not serialize (info C7515: a wait after every wgmma, no decode/MMA overlap)
NOT_SERIALIZED = ("int4_pair_decode_block_product", "int4_pair_decode_scale_after_dot")

# the activation kernel's formats with the GPU's e4m3 conversion (HW_FP8) and the integer ones
ACTIVATION_VARIANTS = {"activation_fp8_row": ("fp8_row", "*fp8e4nv"), "activation_fp8_tensor": ("fp8_tensor", "*fp8e4nv"),
                       "activation_int8_asym": ("int8_asym", "*i8")}


def activation_variant(fmt: str, q_type: str):
    from qcompile.kernels.triton.activation import quantize_activation_kernel

    signature = {"x_ptr": "*bf16", "q_ptr": q_type, "scale_ptr": "*fp32", "zero_ptr": "*i32",
                 "tensor_amax_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
    constants = {"FORMAT": fmt, "BLOCK_K": 4096, "DEQUANTIZE": False, "BF16_BY_BITS": False, "HW_FP8": True}
    return quantize_activation_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants, {}, 4


def main():
    variants = {name: sass_count.template_variant(**variant)[:5] for name, variant in VARIANTS.items()}
    variants.update({name: activation_variant(*variant) for name, variant in ACTIVATION_VARIANTS.items()})
    for name, (fn, signature, constants, attrs, warps) in variants.items():
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        options = triton.compiler.make_backend(sass_count.TARGET).parse_options({"num_warps": warps,
                                                                                 "num_stages": 3})
        compiled = triton.compile(src, target=sass_count.TARGET, options=options.__dict__)
        print(name, len(compiled.asm["cubin"]), flush=True)
    for name in REGISTER_A:
        fn, signature, constants, attrs, warps, _ = sass_count.template_variant(**VARIANTS[name])
        sass = sass_count.compile_sass(fn, signature, constants, attrs, warps)
        operands = sass_count.wgmma_a_operands(sass_count.compile_sass.last_ttgir)
        loop_stores = sum(op.startswith("STS") for _, op in sass_count.loop_body(sass))
        print("wgmma_a", name, operands["registers"], operands["shared"], loop_stores, flush=True)
    for name in NOT_SERIALIZED:
        fn, signature, constants, attrs, warps, _ = sass_count.template_variant(**VARIANTS[name])
        sass_count.compile_sass(fn, signature, constants, attrs, warps)
        reason = sass_count.compile_sass.last_wgmma_serialized
        print("serialized", name, "no" if reason is None else reason.replace(" ", "_"), flush=True)


if __name__ == "__main__":
    main()
