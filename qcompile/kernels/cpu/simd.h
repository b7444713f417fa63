// Helpers shared by the qcompile CPU kernel headers (intx_linear.h, decode_attention.h). Inductor pastes each header
// into its output code with this file's text in place of its #include (kernels/cpu/inductor_template.py); standalone
// builds (the benchmarks' harnesses, the ARM check under qemu) find it by -I.
#ifndef QCOMPILE_CPU_SIMD_H
#define QCOMPILE_CPU_SIMD_H

namespace qcompile_cpu {

#if defined(__x86_64__) || defined(__i386__)
// v, loaded once into a register. Under Inductor's -march=native GCC otherwise folds the load into every instruction
// that reads v, and zmm loads issue one a cycle on this project's Zen 4: the int8 GEMM tile's weights went into each
// token's vpdpbusd (the tile ran 85 GMAC/s a core, 170 pinned), a prefill attention tile row into each query row's
// FMA (1.66x pinned), the weight-only GEMV's digits into each row's vpdpbusd.
template <typename T>
inline T qc_in_register(T v) {
  asm("" : "+v"(v));
  return v;
}
#endif

}  // namespace qcompile_cpu

#endif  // QCOMPILE_CPU_SIMD_H
