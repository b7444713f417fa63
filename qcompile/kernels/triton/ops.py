"""`qcompile::fused_linear`: one quantized linear as a `torch.library.triton_op`, so Inductor traces into it and
emits its Triton kernels as user-defined kernels in the output code (and AOTInductor can embed them).

The config is chosen when the op is traced or first run (tuning.select_config); tuning measures candidates on
random tensors of the real shapes, so it also works while Inductor traces with fake tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes

from ... import _compat
from .linear import LinearSpec, run_linear
from .tuning import KernelConfig, select_config

_compat.install_ttir_memo()  # Inductor analyses the template at every call site: once per variant suffices


def _hint(size) -> int:
    """A concrete value for a possibly symbolic size, without adding a guard (tuning only)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 1
    return int(size)


RANDOM_CHUNK_ELEMENTS = 1 << 24  # bounds the float32 / int64 temporaries of _random_like


def _random_like(t: torch.Tensor | None) -> torch.Tensor | None:
    """A real tensor with t's shape, dtype and strides (the kernels read column-major group parameters faster
    than row-major ones: layout.py) and non-trivial values, for timing configs. Filled in blocks of rows: one
    call for an LM head's weight (128256 x 2048 bytes) made an int64 temporary of 2.1 GB, which was the peak
    memory of compiling the whole model."""
    if t is None:
        return None
    shape = [_hint(s) for s in t.shape]
    out = torch.empty_strided(shape, [_hint(s) for s in t.stride()], dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    rows = out.view(-1) if out.dim() == 0 else out
    step = max(1, RANDOM_CHUNK_ELEMENTS // rows[0].numel())  # rows of at most that many elements
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        if t.dtype.is_floating_point:
            block.copy_(torch.rand(block.shape, device=t.device) + 0.5)
        else:
            low, high = (-128, 128) if t.dtype in (torch.int8, torch.int32) else (0, 256)
            block.copy_(torch.randint(low, high, block.shape, device=t.device, dtype=torch.int32))
    return out


def _measure_on_random(tensors, spec: LinearSpec, out_dtype):
    def measure(config: KernelConfig) -> float:
        # outside every mode of the trace that asked (fake tensors, and the proxy / functional modes too): under
        # those, each launch was traced like the model's own (a TTIR build per candidate call, ~100 s of the 8B
        # model's compile) and the timed CUDA graph was captured while tracing
        with unset_fake_temporarily(), _disable_current_modes(), torch.no_grad():
            x, qweight, w_scale, w_zero, w_aux, bias = (_random_like(t) for t in tensors)
            if spec.weight_format == "codebook":
                w_aux = torch.linspace(-1, 1, 16, device=x.device)
            run = lambda: run_linear(x, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype, config)  # noqa: E731
            run()  # compile outside the capture
            try:  # replays of a CUDA graph time the GPU alone; event timing of launches adds CPU overhead
                return triton.testing.do_bench_cudagraph(run, rep=10, return_mode="median")
            except RuntimeError:
                return triton.testing.do_bench(run, warmup=2, rep=10, return_mode="median")
    return measure


def spec_for(activation, weight_format, bits, group_size, w_scale, w_zero, bias) -> LinearSpec:
    return LinearSpec(activation=activation, weight_format=weight_format, bits=bits, group_size=group_size,
                      w_scale_per_tensor=w_scale is not None and w_scale.numel() == 1,
                      has_w_zero=w_zero is not None, has_bias=bias is not None)


@torch.library.triton_op("qcompile::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: Optional[torch.Tensor],
                 w_zero: Optional[torch.Tensor], w_aux: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 activation: str, weight_format: str, bits: int, group_size: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] (bf16/fp16) times a quantized weight [N, K(packed)] -> [..., N] in out_dtype; see linear.py."""
    K = x.shape[-1]
    N = qweight.shape[0]
    x2d = x.reshape(-1, K).contiguous()
    M = x2d.shape[0]
    spec = spec_for(activation, weight_format, bits, group_size, w_scale, w_zero, bias)
    tunable = x.device.type == "cuda"
    device_name = torch.cuda.get_device_name(x.device) if tunable else x.device.type
    measure = _measure_on_random((x2d, qweight, w_scale, w_zero, w_aux, bias), spec, out_dtype) if tunable \
        else None
    config = select_config(spec, _hint(M), N, K, device_name, measure)
    out = run_linear(x2d, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype, config)
    return out.reshape(*x.shape[:-1], N)


