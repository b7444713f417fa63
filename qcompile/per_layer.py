"""Per-layer compile: each decoder block of a model compiled on its own with backend="qcompile" — a block's
compile instead of the whole model's — and each linear outside the blocks (the LM head) on its own.

    qcompile.compile_blocks(model, {"scheme": "int4_weight_only", "group_size": 128})

One graph serves every block where the blocks differ only in their weights (they are graph inputs; qcompile feeds
each block its own quantized weights). Blocks whose code reads an int attribute that differs between them —
transformers' `layer_idx`, which picks the block's KV-cache slot — would get a graph per block (Dynamo specializes
on the int): block_views makes `layer_idx` read 0 inside a compiled block and hands the block a one-layer view of
the cache, so one trace serves all again. Where that does not apply (no per-layer cache in the call), Dynamo keeps
at most `recompile_limit` (8) graphs per code object and runs the frame eagerly past it — the blocks after the 8th
would stay in float — so compile_blocks raises the limit to hold a graph per block and input shape.

With options {"cudagraphs": True} (or mode="reduce-overhead" for a float baseline) the blocks compile without
CUDA graphs of their own and each call of the model is captured whole as one CUDA graph per call signature
(qcompile.step_graphs): a decode step under transformers' generate() is one graph launch — every block, the glue
between them and the LM head. Inductor's CUDA-graph trees per block cost ~100 us of host work per block and replay
(194 against 268 tokens/s on the H200), and freed each block's output before the next read it unless steps were
marked. A transformers model also gets decode_masks' one-op decode-step mask (generate() builds it on the host
between its per-step sync and the replay) and deferred_stop's one-step-late stop check on CUDA (transformers' own
DeferredStopCheck: the host queues the next step while the GPU runs this one, instead of idling the GPU through
generate()'s per-step host work).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .backend import keep_float_weight, shared_parameters
from .block_views import share_block_traces
from .decode_masks import install_decode_step_masks
from .deferred_stop import install_deferred_stop_check
from .options import QuantOptions
from .step_graphs import capture_steps

SHAPES_PER_BLOCK = 4  # input shapes a block meets (prompt, decode step, ...), each a graph where blocks specialize


def compile_units(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str, nn.Linear]]]:
    """The blocks (the model's longest nn.ModuleList: decoder or encoder layers) and every nn.Linear outside them
    as (parent, attribute, linear): an LM head, a pooler."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no nn.ModuleList of blocks; pass blocks=, or "
                         f"compile the whole model with torch.compile(model, backend=\"qcompile\", ...)")
    blocks = list(max(lists, key=len))
    return blocks, linears_outside(model, blocks)


def linears_outside(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, str, nn.Linear]]:
    inside = {id(m) for block in blocks for m in block.modules()}
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and id(child) not in inside]


def allow_graph_per_block(blocks: int, shapes_per_block: int = SHAPES_PER_BLOCK) -> None:
    """Raise Dynamo's recompile limits (never lower them) to hold a graph per block and input shape."""
    needed = blocks * shapes_per_block + 8
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)


def compile_blocks(model: nn.Module, options: dict, blocks: list[nn.Module] | nn.ModuleList | None = None,
                   shapes_per_block: int = SHAPES_PER_BLOCK, **compile_kwargs) -> nn.Module:
    """Compile each of `blocks` (default: the model's longest nn.ModuleList) with backend="qcompile" and `options`,
    and each nn.Linear outside them (wrapped in place: Module.compile() on torch.nn's own classes compiles
    nothing, the head would stay in float). `compile_kwargs` go to torch.compile (dynamic=False, say). Returns
    the model."""
    QuantOptions.from_dict(options)  # bad options fail here, not at the first call
    blocks = compile_units(model)[0] if blocks is None else list(blocks)
    return compile_regions(model, blocks, shapes_per_block, backend="qcompile", options=options, **compile_kwargs)


def compile_regions(model: nn.Module, blocks: list[nn.Module], shapes_per_block: int = SHAPES_PER_BLOCK,
                    **compile_kwargs) -> nn.Module:
    """compile_blocks for any torch.compile arguments (benchmarks compile their bf16 baseline the same way): each
    block compiled, each nn.Linear outside them wrapped, the recompile limits raised, and each call of the model
    captured as one CUDA graph where the arguments ask for CUDA graphs (qcompile's option, or
    mode="reduce-overhead"): the blocks then compile without graphs of their own."""
    for block in blocks:
        if type(block).__module__.startswith("torch.nn."):
            raise TypeError(f"compile_blocks: a block is torch.nn.{type(block).__name__}, whose forward torch.compile "
                            f"does not trace (torch's own code); pass the model's decoder layers as blocks")
    allow_graph_per_block(len(blocks), shapes_per_block)
    options = compile_kwargs.get("options") or {}
    if options.get("cudagraphs") or compile_kwargs.get("mode") == "reduce-overhead":
        compile_kwargs = {**compile_kwargs, "mode": None}
        if options:
            compile_kwargs["options"] = {k: v for k, v in options.items() if k != "cudagraphs"}
        devices = {p.device.type for p in model.parameters()}
        if "cuda" not in devices:
            warnings.warn(f"qcompile: option cudagraphs applies to CUDA graphs only; {type(model).__name__}'s "
                          f"parameters are on {', '.join(sorted(devices)) or 'no device'}: its calls run without "
                          f"them", stacklevel=3)
        capture_steps(model)
        install_decode_step_masks(model)  # generate()'s per-step mask in one op (host time the GPU waits for)
        install_deferred_stop_check(model)  # ... and the host's step work overlapped with the GPU's previous step
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "disable_compile"):
        # transformers' generate() would torch.compile the whole model again (its own recipe under a static
        # cache), tracing through these compiled blocks — whose float weights are released — in float
        generation_config.disable_compile = True
    for shared in shared_parameters(model):  # a tied embedding runs outside every compile: it reads the float copy
        keep_float_weight(shared)
    linears = linears_outside(model, blocks)
    for block in blocks:
        block.compile(**compile_kwargs)
    share_block_traces(blocks)  # transformers' blocks differ by layer_idx alone: one Dynamo trace for all
    for parent, name, linear in linears:
        setattr(parent, name, torch.compile(linear, **compile_kwargs))
    return model
