"""`qcompile::fused_linear` (and `fused_linear_quantized`, for an activation the graph quantized): one quantized
linear as a `torch.library.triton_op`, so Inductor traces into it and emits its Triton kernels as user-defined
kernels in the output code (and AOTInductor can embed them).

The config is chosen when the op is traced or first run (tuning.select_config); tuning measures candidates on
random tensors of the real shapes, so it also works while Inductor traces with fake tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes

from . import linear
from .linear import LinearSpec
from .tuning import KernelConfig, select_config


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


def _measure_on_random(tensors, spec: LinearSpec, out_dtype, run):
    """Seconds of `run` (linear.run_linear or run_linear_quantized: its arguments before spec are `tensors`) with
    a config, on random stand-ins of the tensors."""
    def measure(config: KernelConfig) -> float:
        # outside every mode of the trace that asked (fake tensors, and the proxy / functional modes too): under
        # those, each launch was traced like the model's own (a TTIR build per candidate call, ~100 s of the 8B
        # model's compile) and the timed CUDA graph was captured while tracing
        with unset_fake_temporarily(), _disable_current_modes(), torch.no_grad():
            args = [_random_like(t) for t in tensors]
            if spec.weight_format == "codebook":  # w_aux (second to last): the 16 values the codes index
                args[-2] = torch.linspace(-1, 1, 16, device=args[0].device)
            call = lambda: run(*args, spec, out_dtype, config)  # noqa: E731
            call()  # compile outside the capture
            try:  # replays of a CUDA graph time the GPU alone; event timing of launches adds CPU overhead
                return triton.testing.do_bench_cudagraph(call, rep=10, return_mode="median")
            except RuntimeError:
                return triton.testing.do_bench(call, warmup=2, rep=10, return_mode="median")
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
    x2d = x.reshape(-1, K).contiguous()
    spec = spec_for(activation, weight_format, bits, group_size, w_scale, w_zero, bias)
    tensors = (x2d, qweight, w_scale, w_zero, w_aux, bias)
    config = _tuned_config(spec, tensors, qweight.shape[0], out_dtype, linear.run_linear)
    out = linear.run_linear(*tensors, spec, out_dtype, config)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@torch.library.triton_op("qcompile::fused_linear_quantized", mutates_args=())
def fused_linear_quantized(xq: torch.Tensor, x_scale: torch.Tensor, x_zero: Optional[torch.Tensor],
                           qweight: torch.Tensor, w_scale: Optional[torch.Tensor], w_zero: Optional[torch.Tensor],
                           w_aux: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str,
                           weight_format: str, bits: int, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """fused_linear on an activation the graph quantized (activation_quantization='graph': Inductor fuses that
    quantization into the op that produces x): xq [..., K] int8 / e4m3, x_scale [..., 1] per row or [] per
    tensor, x_zero [..., 1] (int8_asym) or None — the reference quantize op's outputs."""
    K = xq.shape[-1]
    xq2d = xq.reshape(-1, K).contiguous()
    scale = x_scale.reshape(-1).float().contiguous()
    zero = None if x_zero is None else x_zero.reshape(-1).to(torch.int32).contiguous()
    spec = dataclasses.replace(spec_for(activation, weight_format, bits, group_size, w_scale, w_zero, bias),
                               prequantized=True)
    tensors = (xq2d, scale, zero, qweight, w_scale, w_zero, w_aux, bias)
    run = linear.run_linear_quantized
    out = run(*tensors, spec, out_dtype, _tuned_config(spec, tensors, qweight.shape[0], out_dtype, run))
    return out.reshape(*xq.shape[:-1], qweight.shape[0])


def _tuned_config(spec: LinearSpec, tensors, N: int, out_dtype, run) -> KernelConfig:
    """The config for `run` on `tensors` (x or xq [M, K] first): tuned on CUDA on random stand-ins, cached; else
    the bucket's first candidate."""
    x2d = tensors[0]
    K = x2d.shape[1]
    tunable = x2d.device.type == "cuda"
    device_name = torch.cuda.get_device_name(x2d.device) if tunable else x2d.device.type
    measure = _measure_on_random(tensors, spec, out_dtype, run) if tunable else None
    return select_config(spec, _hint(x2d.shape[0]), N, K, device_name, measure)


