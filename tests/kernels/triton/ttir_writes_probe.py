"""Run as a script, without TRITON_INTERPRET: torch's own analysis of which tensors the linear template writes,
for the int4 group-sum GEMV variant with its inline PTX (decode + L1 prefetch), compiled for sm_90 TTIR on a
machine without a GPU. Prints the written argument names as torch's analysis alone finds them, then as it finds
them with qcompile's patch of it (_compat.install_ttir_memo), one line each."""
import dataclasses

import torch
import triton
from triton.backends.compiler import GPUTarget

from qcompile import _compat
from qcompile.kernels.triton import linear
from qcompile.kernels.triton.tuning import KernelConfig

from triton_cases import CASES, quantized


class _Hopper:  # the active driver's only part generate_ttir asks for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def launched_kernels(run):
    calls = []

    def capture(kernel):
        def at_grid(grid):
            def launch(*args, **kwargs):
                calls.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}))
            return launch
        return type("Launcher", (), {"__getitem__": lambda self, grid: at_grid(grid)})()

    linear.wrap_triton, original = capture, linear.wrap_triton
    linear._interpreting = lambda: False  # the GPU's variant: USE_PTX
    try:
        run()
    finally:
        linear.wrap_triton = original
    return calls


def written(kernel, kwargs):
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
        return {dep.name for dep in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
    return set(wrap.identify_mutated_tensors(kernel, kwargs, {}))


def main():
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    assert _compat.install_ttir_memo()
    triton.runtime.driver.set_active(_Hopper())
    case = next(c for c in CASES if c.scheme == "int4_weight_only")
    w = torch.randn(64, 256, dtype=torch.bfloat16) * 0.05
    q, options = quantized(dataclasses.replace(case, options=(("group_size", 128),)), w)
    weight_args = case.weight_args(q)
    spec = linear.LinearSpec(case.activation, case.weight_format, 4, 128, has_w_zero=True)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    calls = launched_kernels(lambda: linear.run_gemm(x, None, None, *weight_args, None, spec, torch.bfloat16,
                                                      KernelConfig(1, 32, 128, 1)))
    (kernel, kwargs), = calls
    assert kwargs["USE_PTX"] and kwargs["BLOCK_M"] == 1
    patched = wrap.ttir_to_functions
    wrap.ttir_to_functions = patched.__wrapped__
    print(" ".join(sorted(written(kernel, kwargs))))
    wrap.ttir_to_functions = patched
    print(" ".join(sorted(written(kernel, kwargs))))


if __name__ == "__main__":
    main()
