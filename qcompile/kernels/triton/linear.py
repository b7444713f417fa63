"""Launchers for the Triton linear template: which constexprs a (activation, weight format) pair sets, what
the kernels can take, and one call that quantizes the activation and runs the GEMM with a chosen config."""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch.library import wrap_triton

from .activation import quantize_activation_kernel
from .config import KernelConfig
from .gemm import dequantize_weight_kernel, quantized_linear_kernel

ACTIVATIONS = ("float", "int8_sym", "int8_asym", "fp8_row", "fp8_tensor", "mxfp8", "nvfp4")
WEIGHT_FORMATS = ("int8", "fp8", "int4_tinygemm", "intx", "codebook", "mxfp8", "nvfp4")
# activations the GEMM reads as quantized integers / e4m3; the rest reach it in x's dtype
_GEMM_ACTIVATION = {"int8_sym": "int8", "int8_asym": "int8", "fp8_row": "fp8", "fp8_tensor": "fp8"}
_NATIVE_WEIGHTS = {"int8": ("int8", "intx"), "fp8": ("fp8", "intx")}  # weights a quantized activation multiplies
MIN_BLOCK_K = 32
PLANES_MIN_DOT_K = 16  # each K-plane of a block is one tl.dot: BLOCK_K * bits / 32 >= 16 columns


@dataclass(frozen=True)
class LinearSpec:
    """What one fused linear computes; everything the kernels specialise on except shapes."""
    activation: str
    weight_format: str
    bits: int = 8
    group_size: int = 0  # 0: not group-wise
    w_scale_per_tensor: bool = False
    has_w_zero: bool = False
    has_bias: bool = False
    # the activation arrives quantized (fused_linear_quantized); not in key(): the GEMM and its best config are
    # the same, only the GEMVs that quantize x themselves drop out
    prequantized: bool = False

    @property
    def gemm_activation(self) -> str:
        return _GEMM_ACTIVATION.get(self.activation, "float")

    @property
    def epilogue_w_scale(self) -> str:
        if self.weight_format in ("int8", "fp8", "codebook"):
            return "tensor" if self.w_scale_per_tensor else "row"
        return "none"

    @property
    def takes_planes(self) -> bool:
        """Weights the plane decode handles: tinygemm's int4 and 1-7-bit intx (with any activation: a quantized
        one is multiplied as the exact bf16 of its integers, its scale applied in the epilogue). A 32-bit word of
        the narrowest bit plane lies in one group."""
        return self.group_size > 0 and self.group_size % (32 // (self.bits & -self.bits)) == 0 and (
            self.weight_format == "int4_tinygemm" or (self.weight_format == "intx" and self.bits < 8))

    @property
    def takes_pair_decode(self) -> bool:
        """Weights the pair decode handles (KernelConfig.pair_decode): int4 tinygemm with float activations, a
        32-bit word of 8 values in one group."""
        return (self.weight_format == "int4_tinygemm" and self.gemm_activation == "float" and self.has_w_zero
                and self.group_size % 32 == 0)

    @property
    def planes_min_block_k(self) -> int:
        """One dot per K-plane of the narrowest bit plane (32 / its width of them) needs 16 columns each."""
        return PLANES_MIN_DOT_K * 32 // (self.bits & -self.bits)

    @property
    def elementwise_gemv(self) -> bool:
        """At M=1 the weights take the elementwise GEMV (products summed in a [BLOCK_N, BLOCK_K] tile), not a word
        GEMV (int4 / intx / int8 words decoded per group) — gemm.quantized_linear_kernel's last branch."""
        return self.weight_format in ("fp8", "mxfp8", "nvfp4", "codebook")

    @property
    def gemv_quantizes_activation(self) -> bool:
        """Whether the GEMV can quantize the activation itself (KernelConfig.fuse_activation): e4m3 per row into
        the elementwise GEMV."""
        return self.activation == "fp8_row" and self.elementwise_gemv and not self.prequantized

    @property
    def few_row_gemvs(self) -> bool:
        """Whether GEMVs of a few rows per program cost about what wide ones do per weight: the elementwise GEMV,
        and int8 words (one value per byte: sm_90 SASS per weight at 8-16 rows 6.2-6.7 against 5.0 at 64 through
        float, 0.56 against 0.42 by DP4A), not sub-byte words (int4 at 8 rows 12.6 against 5.9)."""
        return self.elementwise_gemv or self.weight_format == "int8"

    @property
    def scales_per_group_in_loop(self) -> bool:
        return self.gemm_activation != "float" and self.weight_format == "intx"

    def groups_fit(self, block_k: int, planes: bool, gemv: bool = False) -> bool:
        """Whether a K block of `block_k` meets the group rule: where the group scale multiplies a tile's partial
        product in the K loop, a K block lies in one group (the plane decode reads one per 32-bit word instead,
        and the GEMVs split a K block into its groups)."""
        return (not self.scales_per_group_in_loop or planes or self.group_size % block_k == 0
                or (gemv and block_k % self.group_size == 0))

    def key(self) -> str:
        return (f"{self.activation}/{self.weight_format}/b{self.bits}/g{self.group_size}/"
                f"{'t' if self.w_scale_per_tensor else 'r'}{'z' if self.has_w_zero else ''}")


def unsupported_reason(spec: LinearSpec, x_dtype: torch.dtype, out_dtype: torch.dtype, K: int) -> str | None:
    """Why the Triton kernels cannot run this linear (it then keeps the reference ops), or None."""
    if spec.activation not in ACTIVATIONS or spec.weight_format not in WEIGHT_FORMATS:
        return f"no Triton kernel for activation {spec.activation!r} with weight format {spec.weight_format!r}"
    if x_dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x_dtype} (the Triton kernels take bfloat16/float16)"
    if out_dtype != x_dtype:
        return f"output dtype {out_dtype} differs from the activation dtype {x_dtype}"
    if K % MIN_BLOCK_K:
        return f"in_features={K} is not a multiple of {MIN_BLOCK_K}"
    gemm_act = spec.gemm_activation
    if gemm_act != "float" and spec.weight_format not in _NATIVE_WEIGHTS[gemm_act]:
        return f"{spec.activation} activations with {spec.weight_format} weights"
    if spec.scales_per_group_in_loop and spec.group_size < MIN_BLOCK_K:
        return f"group_size {spec.group_size} < {MIN_BLOCK_K} with quantized activations"
    if spec.activation == "int8_asym" and spec.weight_format != "intx":
        return "asymmetric int8 activations need group-wise intx weights"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_activation(x: torch.Tensor, activation: str, dequantize: bool = False):
    """x [M, K] -> (x for the GEMM, row/tensor scale or None, zero or None). dequantize: (x on the activation's
    grid in x's dtype, None, None), in one pass — what a float GEMM multiplies."""
    if activation == "float":
        return x, None, None
    M, K = x.shape
    block_k = triton.next_power_of_2(K)
    scale = zero = tensor_amax = x  # placeholders for pointers the format does not read
    if activation in ("fp8_tensor", "nvfp4"):
        tensor_amax = x.abs().amax().float().reshape(1)
    if activation in ("mxfp8", "nvfp4") or dequantize:
        q = torch.empty_like(x)
    elif activation.startswith("int8"):
        q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    else:
        q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    if activation != "mxfp8" and activation != "nvfp4":
        scale = torch.empty((1 if activation == "fp8_tensor" else M,), dtype=torch.float32, device=x.device)
    if activation == "int8_asym":
        zero = torch.empty((M,), dtype=torch.int32, device=x.device)
    wrap_triton(quantize_activation_kernel)[(M,)](
        x, q, scale, zero, tensor_amax, K, x.stride(0), q.stride(0), FORMAT=activation, BLOCK_K=block_k,
        DEQUANTIZE=dequantize, BF16_BY_BITS=_interpreting(), HW_FP8=not _interpreting(),
        num_warps=4 if block_k <= 4096 else 8)
    if activation in ("mxfp8", "nvfp4") or dequantize:
        return q, None, None
    return q, (scale if activation == "fp8_tensor" else scale.view(M, 1)), (
        zero.view(M, 1) if activation == "int8_asym" else None)


def run_gemm(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec: LinearSpec, out_dtype, config):
    """The template GEMM on an already-quantized activation [M, K] (with config.fuse_activation: x itself, in its
    dtype); returns [M, N] in out_dtype."""
    M, K = xq.shape
    N = qweight.shape[0]
    if config.block_m not in (1, 16, 32, 64, 128, 256):
        raise ValueError(f"Triton linear: BLOCK_M={config.block_m}; the template takes 1 (GEMV) or 16..256")
    if config.swap_ab and config.block_m == 1:
        raise ValueError("Triton linear: swap_ab needs a tensor-core tile (BLOCK_M >= 16)")
    if config.planes and not (spec.takes_planes and config.block_m > 1
                              and config.block_k >= spec.planes_min_block_k):
        raise ValueError(f"Triton linear: the plane decode takes sub-byte group-wise weights with a tensor-core "
                         f"tile and BLOCK_K >= {PLANES_MIN_DOT_K} x values per word; got {spec.key()} with {config}")
    if config.fuse_activation and not (config.block_m == 1 and spec.gemv_quantizes_activation):
        raise ValueError(f"Triton linear: fuse_activation is the elementwise GEMV's (BLOCK_M=1) e4m3 per-row "
                         f"quantization; got {spec.key()} with {config}")
    if config.reduce_each and not (config.block_m == 1 and spec.elementwise_gemv):
        raise ValueError(f"Triton linear: reduce_each is the elementwise GEMV's (BLOCK_M=1; fp8, microscaling, "
                         f"codebook weights); got {spec.key()} with {config}")
    if config.pair_decode and not (spec.takes_pair_decode and config.swap_ab and not config.planes
                                   and config.block_k % 32 == 0):
        raise ValueError(f"Triton linear: pair_decode is the swapped tile's (swap_ab) decode of int4 tinygemm words "
                         f"with float activations, group_size and BLOCK_K multiples of 32; got {spec.key()} with "
                         f"{config}")
    if config.scale_after_dot and not (config.pair_decode and spec.group_size % config.block_k == 0):
        raise ValueError(f"Triton linear: scale_after_dot applies a group's scale to the pair decode's K block "
                         f"product; it needs pair_decode=True and BLOCK_K dividing group_size={spec.group_size} "
                         f"({config})")
    if config.block_product and not (config.pair_decode and not config.scale_after_dot):
        raise ValueError(f"Triton linear: block_product adds each K block's product of the pair decode to its "
                         f"accumulator; it needs pair_decode=True without scale_after_dot (which does that already) "
                         f"({config})")
    if config.join_planes and not config.planes:
        raise ValueError(f"Triton linear: join_planes joins the plane decode's K-planes; it needs planes=True ({config})")
    if K % config.block_k or not spec.groups_fit(config.block_k, config.planes, config.block_m == 1):
        raise ValueError(f"Triton linear: BLOCK_K={config.block_k} must divide K={K}"
                         + (f" and group_size={spec.group_size}" if spec.scales_per_group_in_loop else ""))
    any_tensor = xq
    split_k = config.split_k
    if split_k == 1:
        out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    else:  # one fp32 partial per split, summed below (under Inductor the sum fuses with what follows)
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), split_k)
    wrap_triton(quantized_linear_kernel)[grid](
        xq, any_tensor if x_scale is None else x_scale, any_tensor if x_zero is None else x_zero,
        qweight, any_tensor if w_scale is None else w_scale, any_tensor if w_zero is None else w_zero,
        any_tensor if w_aux is None else w_aux, any_tensor if bias is None else bias, out,
        M, N, K, xq.stride(0), qweight.stride(0), *group_param_strides(w_scale, w_zero), N,
        A_FORMAT=spec.gemm_activation,
        A_SCALE="none" if x_scale is None else ("tensor" if spec.activation == "fp8_tensor" else "row"),
        A_HAS_ZERO=x_zero is not None,
        W_FORMAT=spec.weight_format, BITS=spec.bits, GROUP_SIZE=max(spec.group_size, 1),
        W_HAS_ZERO=w_zero is not None, W_SCALE=spec.epilogue_w_scale, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
        GROUP_M=config.group_m, SWAP_AB=config.swap_ab, PLANES=config.planes, JOIN_PLANES=config.join_planes,
        USE_PTX=not _interpreting(), DOT_FP32=_interpreting(),
        BF16_BY_BITS=_interpreting(), A_FUSED=config.fuse_activation, REDUCE_EACH=config.reduce_each,
        PAIR_DECODE=config.pair_decode, SCALE_AFTER_DOT=config.scale_after_dot,
        BLOCK_PRODUCT=config.block_product, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out if split_k == 1 else out.sum(0).to(out_dtype)  # torch's cast rounds to nearest even


def group_param_strides(w_scale, w_zero) -> tuple[int, int]:
    """(row, group) strides of the per-group weight parameters [N, K / group], which the template reads through
    them: row-major as the numerics produce them, or column-major as layout.py stores them on CUDA. The zero
    point shares the scale's layout (they are laid out together)."""
    if w_scale is None or w_scale.dim() != 2:
        return 0, 0  # none, or one per row / tensor (the epilogue's)
    if w_zero is not None and w_zero.stride() != w_scale.stride():
        raise ValueError(f"Triton linear: the zero point's strides {w_zero.stride()} differ from the scale's "
                         f"{w_scale.stride()}; lay them out alike (kernels/triton/layout.py)")
    return w_scale.stride(0), w_scale.stride(1)


def dequantize_weight(qweight, w_scale, w_zero, w_aux, spec: LinearSpec, K: int, dtype):
    """The weight [N, K] in `dtype` with every scale applied (the template's own decode step)."""
    N = qweight.shape[0]
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    block_n, block_k = 64, 128 if K % 128 == 0 else MIN_BLOCK_K
    any_tensor = qweight
    wrap_triton(dequantize_weight_kernel)[(triton.cdiv(N, block_n), K // block_k)](
        qweight, any_tensor if w_scale is None else w_scale, any_tensor if w_zero is None else w_zero,
        any_tensor if w_aux is None else w_aux, out, N, K, qweight.stride(0), *group_param_strides(w_scale, w_zero),
        W_FORMAT=spec.weight_format, BITS=spec.bits, GROUP_SIZE=max(spec.group_size, 1),
        W_HAS_ZERO=w_zero is not None, W_SCALE=spec.epilogue_w_scale, BLOCK_N=block_n, BLOCK_K=block_k,
        BF16_BY_BITS=_interpreting(), num_warps=4)
    return out


def run_library(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec: LinearSpec, out_dtype,
                library: str):
    """Library GEMMs on the quantized activation the autotuner may pick at large M: `torch._scaled_mm` (e4m3)
    or `torch._int_mm` (int8). (dequant_mm is run_linear's: it never needs the quantized activation.)"""
    M, K = xq.shape
    N = qweight.shape[0]
    if library == "scaled_mm":
        a_scale = x_scale.float().reshape(-1, 1).expand(M, 1).contiguous()
        b_scale = w_scale.float().reshape(1, -1).expand(1, N).contiguous()
        return torch._scaled_mm(xq, qweight.t(), a_scale, b_scale, bias=bias, out_dtype=out_dtype)
    if library == "int_mm":
        out = torch._int_mm(xq, qweight.t()).float() * x_scale.float() * w_scale.float().reshape(1, -1)
        return (out if bias is None else out + bias.float()).to(out_dtype)
    raise ValueError(f"unknown library GEMM {library!r}; known: scaled_mm, int_mm (and run_linear's dequant_mm)")


def run_linear(x, qweight, w_scale, w_zero, w_aux, bias, spec: LinearSpec, out_dtype, config):
    """Quantize x [M, K] as spec.activation says, then multiply by the quantized weight with `config`."""
    if config.library == "dequant_mm":  # cuBLAS on both sides dequantized: the activation's grid in one pass
        # (for quantized activations with group-wise weights, whose group scales no integer GEMM can apply)
        x_grid = quantize_activation(x, spec.activation, dequantize=True)[0]
        return F.linear(x_grid, dequantize_weight(qweight, w_scale, w_zero, w_aux, spec, x.shape[1], x_grid.dtype),
                        bias)
    if config.fuse_activation:  # the GEMV quantizes x itself
        return run_gemm(x, None, None, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype, config)
    xq, x_scale, x_zero = quantize_activation(x, spec.activation)
    return run_linear_quantized(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype, config)


def run_linear_quantized(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec: LinearSpec, out_dtype,
                         config):
    """run_linear from its activation quantized (xq [M, K] int8 / e4m3, x_scale [M] or [1], x_zero [M] or None;
    a float activation with no scale or zero goes through as it is)."""
    if config.library == "dequant_mm":  # the activation's grid, (q - zero) * scale, as run_linear's one pass
        grid = xq.float() if x_zero is None else xq.float() - x_zero.float().reshape(-1, 1)
        x_grid = (grid * x_scale.float().reshape(-1, 1)).to(out_dtype)
        return F.linear(x_grid, dequantize_weight(qweight, w_scale, w_zero, w_aux, spec, xq.shape[1], out_dtype),
                        bias)
    if config.library:
        return run_library(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype,
                           config.library)
    return run_gemm(xq, x_scale, x_zero, qweight, w_scale, w_zero, w_aux, bias, spec, out_dtype, config)


@functools.lru_cache(None)
def planes_verified(device: str, bits: int) -> bool:
    """Whether the plane decode of `bits`-bit weights (inline PTX on CUDA) gives the template's value-by-value
    answer on this device (_decode_matches)."""
    spec = LinearSpec("float", "int4_tinygemm" if bits == 4 else "intx", bits=bits, group_size=256,
                      has_w_zero=bits == 4)
    return _decode_matches(device, spec, KernelConfig(16, 64, spec.planes_min_block_k, swap_ab=True, planes=True),
                           f"the {bits}-bit plane decode")


@functools.lru_cache(None)
def pair_decode_verified(device: str) -> bool:
    """Whether the pair decode of int4 words (inline PTX on CUDA) gives the template's value-by-value answer on
    this device (_decode_matches)."""
    spec = LinearSpec("float", "int4_tinygemm", bits=4, group_size=256, has_w_zero=True)
    return _decode_matches(device, spec, KernelConfig(16, 64, 128, swap_ab=True, pair_decode=True),
                           "the int4 pair decode")


def _decode_matches(device: str, spec: LinearSpec, config, name: str) -> bool:
    """Whether `config` gives the value-by-value decode's answer (a plain 16-row tile) on random weights: checked
    once per process, so a PTX or Triton change that broke it drops the decode's candidates with a warning instead
    of computing wrong outputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    bits = spec.bits
    with unset_fake_temporarily(), torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(0)
        N, K = 64, 1024
        x = torch.randn(16, K, device=device, generator=generator).to(torch.bfloat16)
        qweight = torch.randint(0, 256, (N, K * bits // 8), device=device, generator=generator).to(torch.uint8)
        scale = (torch.rand(N, K // 256, device=device, generator=generator) * 0.1 + 0.01).to(torch.bfloat16)
        zero = torch.randn(N, K // 256, device=device, generator=generator).to(torch.bfloat16) if bits == 4 else None
        args = (x, None, None, qweight, scale, zero, None, None, spec, torch.bfloat16)
        decoded = run_gemm(*args, config).float()
        expected = run_gemm(*args, KernelConfig(16, 64, config.block_k)).float()
        # inside: this runs while Inductor lowers a graph, under its fake mode
        error = ((decoded - expected).norm() / expected.norm()).item()
    if not error < 1e-2:  # NaN fails too
        warnings.warn(f"qcompile: {name} is off by {error:.3g} (relative) on {device}; its Triton configs are left "
                      f"out of autotuning", stacklevel=2)
        return False
    return True
