"""Inductor lowering of the fused CPU ops: CppTemplates that paste intx_linear.h / decode_attention.h into Inductor's
output code and call them, so the kernels are compiled with the graph (and embedded in AOTInductor packages).

Every Inductor internal this package touches is in this file (CppTemplate, CppTemplateKernel.def_kernel,
register_lowering, the template buffer's epilogue-fusion switch); it is written against torch 2.11-2.14.
"""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler, register_lowering  # first: it imports the codegen modules
from torch._inductor.codegen.cpp import get_export_declaration
from torch._inductor.codegen.cpp_template import CppTemplate
from torch._inductor.codegen.cpp_utils import cexpr_index
from torch._inductor.utils import IndentedBuffer, parallel_num_threads, sympy_product
from torch._inductor.virtualized import V

from . import layout as cpu_layout
from . import ops

log = logging.getLogger(__name__)
KERNEL_DIR = Path(__file__).parent


def inline_includes(text: str, directory: Path = KERNEL_DIR) -> str:
    """A header's text with each `#include "name"` of a file in `directory` replaced by that file's (inlined) text:
    the output code Inductor compiles is one file in its own cache folder, where no include path finds our headers."""
    def replace(match):
        return inline_includes((directory / match[1]).read_text(), directory)
    return re.sub(r'^#include "([\w.]+)"$', replace, text, flags=re.MULTILINE)


KERNEL_SOURCE = inline_includes((KERNEL_DIR / "intx_linear.h").read_text())
ATTENTION_SOURCE = inline_includes((KERNEL_DIR / "decode_attention.h").read_text())
# query rows from which decode_attention.h takes its multi-threaded prefill path (read from the header: one source)
PREFILL_MIN_ROWS = int(re.search(r"QC_PREFILL_MIN_ROWS = (\d+);", ATTENTION_SOURCE)[1])

# op -> (C++ entry point in intx_linear.h, activation dtypes it accepts)
ENTRY_POINTS = {
    ops.intx_linear_dynamic_int8_cpu: "intx_linear_dynamic_int8",
    ops.intx_linear_float_cpu: "intx_linear_float",
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class IntxLinearTemplate(CppTemplate):
    """One instance per lowered linear: y[M, N] = entry<BITS, GROUP, ..., ROWS>(x[M, K], packed, scale, bias)
    (ROWS: packed's row layout, kernels/cpu/layout.py)."""

    def __init__(self, entry: str, input_nodes, layout: ir.Layout, bits: int, group_size: int, has_bias: bool,
                 row_block: int):
        super().__init__(f"qcompile_{entry}_b{bits}_g{group_size}", input_nodes, layout, parallel_num_threads())
        self.entry, self.bits, self.group_size, self.has_bias = entry, bits, group_size, has_bias
        self.row_block = row_block

    def render(self, kernel, template_buffer_node=None, flag_template_buffer_has_other_users=None,
               epilogue_nodes=None, **kwargs) -> str:
        if epilogue_nodes:
            raise NotImplementedError("qcompile intx template: epilogue fusion is switched off for this buffer")
        x, packed, scale = self.input_nodes[:3]
        bias = self.input_nodes[3] if self.has_bias else None
        y = template_buffer_node if template_buffer_node is not None else self.output_node
        inputs = {"X": x, "W": packed, "S": scale}
        if bias is not None:
            inputs["B"] = bias
        signature = kernel.def_kernel(inputs=inputs, outputs={"Y": y})
        N, row_bytes = packed.get_size()
        K = row_bytes * 8 // self.bits  # from the weight: static even where Dynamo made x's dims symbolic
        M, N, K = (cexpr_index(kernel.rename_indexing(e)) for e in (sympy_product(x.get_size()[:-1]), N, K))
        bias_arg = "B" if bias is not None else "static_cast<const float*>(nullptr)"
        bias_type = kernel.dtype(bias) if bias is not None else "float"
        return _kernel_code(self, kernel, signature, KERNEL_SOURCE,
                            f"qcompile_cpu::{self.entry}<{self.bits}, {self.group_size}, {kernel.dtype(x)}, "
                            f"{kernel.dtype(scale)}, {bias_type}, {kernel.dtype(y)}, {self.row_block}>(X, W, S, "
                            f"{bias_arg}, Y, {M}, {N}, {K}, {self.num_threads});")


def _kernel_code(template: CppTemplate, kernel, signature: str, source: str, call: str) -> str:
    """The template's C++: Inductor's header, the kernel source, and an exported function that calls it."""
    code = IndentedBuffer()
    code.splice(template.header())
    code.splice(source)
    code.writeline(f'extern "C" {get_export_declaration()}')
    code.writeline(signature)
    code.writeline("{")
    with code.indent():
        # a profiler event per call under Inductor's cpp.enable_kernel_profile, as its own kernels have
        # (benchmarks/cpu_smollm2.py --split); absent from Inductor versions without the helper
        code.writeline(getattr(kernel, "maybe_codegen_profile", lambda: "")())
        code.writeline(call)
    code.writeline("}")
    return code.getvalue()


def _realized(node):
    return ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(node))


def _unusable(x, packed, scale, bias, bits, group_size, dtype, row_block) -> str | None:
    if x.get_device().type != "cpu":
        return f"device {x.get_device()} is not the CPU"
    dtypes = {"activation": x.get_dtype(), "output": dtype, "scale": scale.get_dtype()}
    if bias is not None:
        dtypes["bias"] = bias.get_dtype()
    bad = {k: v for k, v in dtypes.items() if v not in _FLOAT_DTYPES}
    if bad or packed.get_dtype() != torch.uint8:
        return f"dtypes {bad or packed.get_dtype()} (needs float32/bfloat16/float16, uint8 packed weights)"
    if not (1 <= bits <= 8 and group_size % 32 == 0):
        return f"bits={bits}, group_size={group_size} (needs 1-8 bits, group size a multiple of 32)"
    if row_block not in (1, cpu_layout.row_block(bits)):
        return f"row_block={row_block} for {bits}-bit weights (the kernel reads 1 or {cpu_layout.row_block(bits)})"
    return None


def _lower(op, x, packed, scale, bias, bits, group_size, dtype, row_block=1):
    """Inductor lowering: a CppTemplateBuffer running the generated kernel (CPU, float activations), else the op's
    reference as an extern fallback."""
    reason = _unusable(x, packed, scale, bias, bits, group_size, dtype, row_block)
    if reason is not None:
        log.warning("qcompile: %s runs its reference implementation, not the generated kernel: %s", op, reason)
        return fallback_handler(op, add_to_fallback_set=False)(x, packed, scale, bias, bits, group_size, dtype,
                                                               row_block)
    inputs = [_realized(x), _realized(packed), _realized(scale)] + ([_realized(bias)] if bias is not None else [])
    size = [*x.get_size()[:-1], packed.get_size()[0]]
    layout = ir.FixedLayout(x.get_device(), dtype, size, ir.FlexibleLayout.contiguous_strides(size))
    template = IntxLinearTemplate(ENTRY_POINTS[op], inputs, layout, bits, group_size, bias is not None, row_block)
    node = template.generate().output_node()
    # the kernel writes its output buffer directly; it has no code path for fused pointwise epilogues
    node.data.data.allow_epilogue_fusion = False
    return node


def has_vector_decode_attention() -> bool:
    """Whether Inductor builds CPU kernels here with AVX-512 (decode_attention.h's vector path; without it the
    kernel is scalar, slower than ATen's flash attention)."""
    from torch._inductor import cpu_vec_isa

    return "avx512" in str(cpu_vec_isa.pick_vec_isa())


class DecodeAttentionTemplate(CppTemplate):
    """out = decode_attention(q, k, v, mask) (decode_attention.h): a few query rows against a KV cache (one thread),
    or a prefill's many rows (`num_threads`: Inductor's team)."""

    def __init__(self, input_nodes, layout: ir.Layout, scale: float, has_mask: bool, num_threads: int):
        super().__init__("qcompile_decode_attention", input_nodes, layout, num_threads)
        self.scale, self.has_mask = scale, has_mask

    def render(self, kernel, template_buffer_node=None, flag_template_buffer_has_other_users=None,
               epilogue_nodes=None, **kwargs) -> str:
        if epilogue_nodes:
            raise NotImplementedError("qcompile attention template: epilogue fusion is switched off for this buffer")
        q, k, v = self.input_nodes[:3]
        mask = self.input_nodes[3] if self.has_mask else None
        out = template_buffer_node if template_buffer_node is not None else self.output_node
        inputs = {"Q": q, "K": k, "V": v, **({"MASK": mask} if mask is not None else {})}
        signature = kernel.def_kernel(inputs=inputs, outputs={"OUT": out})
        B, Hq, Lq, D = q.get_size()
        Hkv, Lk = k.get_size()[1], k.get_size()[2]
        MB, MH = (mask.get_size()[0], mask.get_size()[1]) if mask is not None else (1, 1)
        sizes = ", ".join(cexpr_index(kernel.rename_indexing(e)) for e in (B, Hq, Hkv, Lq, Lk, D, MB, MH))
        return _kernel_code(self, kernel, signature, ATTENTION_SOURCE,
                            f"qcompile_cpu::decode_attention(Q, K, V, {'MASK' if mask is not None else 'nullptr'}, "
                            f"OUT, {sizes}, {float(self.scale)!r}f, {self.num_threads});")


def _lower_attention(q, k, v, mask, scale):
    """Inductor lowering of decode_attention_cpu: the template (float32 on the CPU), else the reference."""
    tensors = [q, k, v] + ([mask] if mask is not None else [])
    if any(t.get_device().type != "cpu" or t.get_dtype() != torch.float32 for t in tensors):
        log.warning("qcompile: decode_attention_cpu runs its reference implementation: it needs float32 CPU tensors")
        return fallback_handler(ops.decode_attention_cpu, add_to_fallback_set=False)(q, k, v, mask, scale)
    inputs = [_realized(t) for t in tensors]
    B, H, Lq, D = q.get_size()
    layout = ir.FixedLayout(q.get_device(), torch.float32, [B, H, Lq, D], [Lq * H * D, D, H * D, 1])
    # a decode step's few rows run on one thread (the kernel's one-thread path), a prefill's on Inductor's team
    few = getattr(Lq, "is_number", True) and int(Lq) < PREFILL_MIN_ROWS
    node = DecodeAttentionTemplate(inputs, layout, scale, mask is not None,
                                   1 if few else parallel_num_threads()).generate().output_node()
    node.data.data.allow_epilogue_fusion = False
    return node


@functools.lru_cache(None)
def register_inductor_lowerings() -> None:
    for op in ENTRY_POINTS:
        register_lowering(op, type_promotion_kind=None)(functools.partial(_lower, op))
    register_lowering(ops.decode_attention_cpu, type_promotion_kind=None)(_lower_attention)

