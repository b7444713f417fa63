"""The `qcompile` torch.compile backend: Dynamo graph -> aten graph -> linear pass -> device lowering -> Inductor.

    torch.compile(model, backend="qcompile", options={"scheme": "int4_weight_only"})

Per graph Dynamo hands us: trace it to aten; find which inputs are parameters/buffers (and their names);
quantize each matched linear's weight once (cached per tensor, so tied weights and recompiles reuse it);
rewrite the graph; let the device lowering swap patterns for fused kernels; compile with Inductor. The
compiled function receives the quantized tensors as extra inputs, never the float weights they replace.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _compat, calibration, released
from .distributed import LocalSignature
from .graph_key import structure_key
from .kernels.cpu import layout as cpu_layout
from .options import QuantOptions
from .passes.lower import constant_layouts, lower_for_device
from .passes.lower_cpu import is_decode_graph
from .passes.quantize_linears import quantize_linears
from .passes.records import PassResult, WeightRef, WeightUse

# tensor -> {(options key, cast dtype, layout, version): quantized tensors}; the first weight of fused siblings
# -> also {("siblings", options key, members' keys): (weak references to the other members, fused tensors)}. A
# packed tensor a lowering laid out for its kernels is held in that layout only (`_hold_laid_out`)
_QUANTIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# float weights whose storage qcompile released -> (name, options that released it), and weights some compiled
# graph still reads in float (tensor-identity maps: a WeakSet would compare tensors with ==)
_RELEASED = WeakIdKeyDictionary()
_READ_IN_FLOAT = WeakIdKeyDictionary()
# (graph structure, options) -> the first compiled run of that structure (qcompile/graph_key.py); weak: an entry
# lives as long as Dynamo keeps that run
_COMPILED_BY_STRUCTURE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# tensors a lowering laid out that `_hold_laid_out` has looked up in the cache already
_LOOKED_UP = WeakIdKeyDictionary()


@dataclass(frozen=True)
class PassObserver:
    """Looks at each graph right after the pass, while its float weights are still there (QCOMPILE_DEBUG's report
    folder, debug/folder.py: the debug tools build on this module, so they are handed in, never imported)."""
    active: Callable[[], bool]  # asked at each compile; a graph it observes compiles on its own (no reuse)
    # observe(Dynamo graph, example inputs, options, PassResult, LocalSignature or None)
    observe: Callable[..., None]


_PASS_OBSERVERS: list[PassObserver] = []


def add_pass_observer(observer: PassObserver) -> None:
    if observer not in _PASS_OBSERVERS:
        _PASS_OBSERVERS.append(observer)


def _active_observers() -> list[PassObserver]:
    return [o for o in _PASS_OBSERVERS if o.active()]


def find_weight_inputs(gm: torch.fx.GraphModule, example_inputs) -> dict[int, WeightRef]:
    """Graph inputs that are parameters or buffers (Dynamo lifts them as inputs), by position."""
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        source = _compat.source_name(node) or ""
        if isinstance(value, torch.Tensor) and (
                isinstance(value, torch.nn.Parameter) or "_parameters[" in source or "_buffers[" in source):
            found[i] = WeightRef(name=_compat.dynamo_path(source) if source else node.name, tensor=value)
    return found


def quantized_weight(ref: WeightRef, options: QuantOptions, cast_dtype, weight_is_nk: bool,
                     hessian: torch.Tensor | None = None) -> dict:
    """The scheme's quantized tensors for one weight, computed once per (tensor, options), with their rows in
    order (the numerics' layout: a copy of what the cache holds laid out for the CPU kernels). `hessian`: the
    calibration statistics of the weight's inputs, for algorithm "gptq"."""
    return _in_order(_held_weight(ref, options, cast_dtype, weight_is_nk, hessian))


def _in_order(tensors: dict) -> dict:
    return {name: cpu_layout.laid_out(t, rows=1) for name, t in tensors.items()}


def _held_weight(ref: WeightRef, options: QuantOptions, cast_dtype, weight_is_nk: bool,
                 hessian: torch.Tensor | None = None) -> dict:
    """`quantized_weight` as the cache holds it (some tensors may be laid out for the kernels)."""
    tensor = ref.tensor
    key = _cache_key(tensor, options, cast_dtype, weight_is_nk)
    per_tensor = _QUANTIZED.setdefault(tensor, {})
    if key not in per_tensor:
        # released, or sharing the storage of a tensor that was: no values to quantize (reading them would crash)
        if tensor in _RELEASED or (tensor.untyped_storage().nbytes() == 0 and tensor.numel() > 0):
            cast = f", read as {cast_dtype}" if cast_dtype is not None else ""
            raise released.float_weights_released(
                f"quantizing them again (scheme {options.scheme!r}{cast}: not as the earlier compile did)", [ref.name])
        with torch.no_grad():
            w = tensor.detach()
            w = w if weight_is_nk else w.t()
            w = w.to(cast_dtype) if cast_dtype is not None else w
            extra = () if options.algorithm != "gptq" else (hessian,)
            quantized = _quantize_in_row_blocks(w.contiguous(), options, extra)
            if w.is_cuda:  # the Triton template's layout (same values); imported here: CPU runs need no Triton
                from .kernels.triton import layout
                quantized = layout.for_kernels(quantized)
            per_tensor[key] = quantized
    return per_tensor[key]


def _cache_key(tensor: torch.Tensor, options: QuantOptions, cast_dtype, weight_is_nk: bool) -> tuple:
    return options.cache_key(), cast_dtype, weight_is_nk, tensor._version


def quantized_weights(uses: tuple[WeightUse, ...], options: QuantOptions, hessians: dict | None = None) -> dict:
    """The quantized tensors one linear reads, rows in order: one weight's (`quantized_weight`), or for sibling
    linears fused into one, the members' tensors concatenated along N — quantized one by one, so bit-exact the
    separate linears. Cached for the group; each member's own cache entry then becomes its rows of the fused
    tensors (views: one copy in memory, and a later unfused graph still finds its weight quantized). `hessians`:
    by id of the weight tensor, for algorithm "gptq"."""
    return _in_order(_held_weights(uses, options, hessians))


def _held_weights(uses: tuple[WeightUse, ...], options: QuantOptions, hessians: dict | None = None) -> dict:
    """`quantized_weights` as the cache holds them: what a graph's binding feeds without a copy."""
    def member(use: WeightUse) -> dict:
        hessian = (hessians or {}).get(id(use.weight.tensor))
        return quantized_weight(use.weight, options, use.cast_dtype, use.weight_is_nk, hessian)

    if len(uses) == 1:
        use = uses[0]
        return _held_weight(use.weight, options, use.cast_dtype, use.weight_is_nk,
                            (hessians or {}).get(id(use.weight.tensor)))
    first, others = uses[0].weight.tensor, [u.weight.tensor for u in uses[1:]]
    key = ("siblings", *(_cache_key(u.weight.tensor, options, u.cast_dtype, u.weight_is_nk) + (id(u.weight.tensor),)
                         for u in uses))
    per_tensor = _QUANTIZED.setdefault(first, {})
    cached = per_tensor.get(key)
    if cached is not None and all(ref() is t for ref, t in zip(cached[0], others)):
        return cached[1]
    parts = [member(u) for u in uses]
    fused = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    if first.is_cuda:  # torch.cat writes row-major: the Triton template's layout again (kernels/triton/layout.py)
        from .kernels.triton import layout
        fused = layout.for_kernels(fused)
    offsets = dict.fromkeys(fused, 0)
    for use, part in zip(uses, parts):  # the member's entry: views of its rows, releasing its own copy
        views = {name: fused[name].narrow(0, offsets[name], t.shape[0]) for name, t in part.items()}
        _QUANTIZED[use.weight.tensor][_cache_key(use.weight.tensor, options, use.cast_dtype, use.weight_is_nk)] = views
        offsets = {name: offsets[name] + t.shape[0] for name, t in part.items()}
    per_tensor[key] = ([weakref.ref(t) for t in others], fused)  # weak: the others are keys of this cache too
    return fused


def quantized_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """The quantized tensors qcompile holds for `weight` (under any options; for fused siblings, the fused
    tensors its rows are views of): what the CLI counts as a quantized linear's bytes."""
    found = []
    for entry in _QUANTIZED.get(weight, {}).values():
        found.extend((entry[1] if isinstance(entry, tuple) else entry).values())  # ([weakrefs], fused) for siblings
    return found


# elements per block of rows when a large weight is quantized: float32 temporaries stay ~0.25 GB each, where the
# whole LM head of an 8B model (525 M weights) took ~10 GB of them at once
ROW_BLOCK_ELEMENTS = 1 << 26


def _quantize_in_row_blocks(w: torch.Tensor, options: QuantOptions, extra: tuple) -> dict:
    """scheme.quantize_weight(w), in blocks of rows when the weight is large and the scheme quantizes rows
    independently (RTN only: the same tensors as one call, concatenated along the rows)."""
    scheme = options.scheme_def
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[-1]))
    if w.shape[0] <= rows or options.algorithm != "rtn" or not scheme.rows_independent(options):
        return dict(scheme.quantize_weight(w, options, *extra))
    blocks = [dict(scheme.quantize_weight(w[i:i + rows], options, *extra)) for i in range(0, w.shape[0], rows)]
    return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}


def _drop_unused_weight_inputs(result: PassResult, weight_indices) -> list[int]:
    """Remove float-weight placeholders the rewritten graph no longer reads; return kept input positions."""
    kept = []
    placeholders = [n for n in result.gm.graph.nodes if n.op == "placeholder"]
    n_original = len(placeholders) - len(result.constants)
    for i, node in enumerate(placeholders[:n_original]):
        if i in weight_indices and not node.users:
            result.gm.graph.erase_node(node)
        else:
            kept.append(i)
    result.gm.recompile()
    return kept


def _release_float_weights(weights: dict[int, WeightRef], kept: list[int], options: QuantOptions,
                            sources: dict[int, _compat.ParameterSource | None]) -> None:
    """Release the float weights the graph no longer reads, during its compile (the modules holding them, found
    through `sources` in the frame Dynamo compiles, get the eager path)."""
    kept_set = set(kept)
    for i, ref in weights.items():
        t = ref.tensor
        if i in kept_set:
            _READ_IN_FLOAT[t] = True
            if t in _RELEASED:
                raise released.float_weights_released("compiling a graph that reads them in float", [ref.name])
            continue
        if t not in _READ_IN_FLOAT:
            release_float_weight(t, ref.name, options)
        if t in _RELEASED and sources.get(i) is not None:  # released now, or by an earlier compile or prepare()
            owner = sources[i].owner_while_compiling(t)
            if owner is not None:
                released.attach(owner, released_weight)


def shared_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters more than one module holds (a tied embedding and LM head)."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(p)
    return [held[0] for held in owners.values() if len(held) > 1]


def keep_float_weight(t: torch.Tensor) -> None:
    """Never release t's float storage: code no compile sees reads it (the embedding tied to a compiled head)."""
    _READ_IN_FLOAT[t] = True


def release_float_weight(t: torch.Tensor, name: str, options: QuantOptions) -> bool:
    """Free a quantized weight's float storage; whether it was freed now. Shape, dtype and strides stay, so
    Dynamo's guards hold and a recompile finds the cached quantized tensors; a tensor sharing its storage with
    others, or mapped from a file, is left alone. The module holding it gets `released.attach`'s eager path."""
    storage = t.untyped_storage()
    # a storage mapped from a file (safetensors mmap) cannot be resized; its pages are the file's, not ours
    if storage.resizable() and storage.nbytes() == t.numel() * t.element_size() and storage.nbytes() > 0:
        storage.resize_(0)
        _RELEASED[t] = (name, options)
        return True
    return False


def released_weight(t: torch.Tensor) -> released.ReleasedWeight | None:
    """How a released float weight was quantized, for its module's eager calls; None if it was not released.
    Eager calls find their quantized tensors through here only."""
    if t not in _RELEASED:
        return None
    name, options = _RELEASED[t]
    return released.ReleasedWeight(name, options, lambda cast_dtype: quantized_weight(
        WeightRef(name, t), options, cast_dtype, weight_is_nk=True))


def released_names(weights) -> list[str]:
    """The names of the WeightRefs in `weights` whose float storage qcompile released."""
    return [ref.name for ref in weights if ref.tensor in _RELEASED]


def parameter_sources(gm: torch.fx.GraphModule, signature: LocalSignature | None
                      ) -> dict[int, _compat.ParameterSource | None]:
    """By input position, where the Dynamo graph's parameters live (the modules that get the released weights'
    eager path); none for tensor-parallel graphs, whose weight positions are the local shards'."""
    if signature is not None:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {i: _compat.ParameterSource.of(node) for i, node in enumerate(placeholders)}


def quantize_graph(gm: torch.fx.GraphModule, example_inputs, options: QuantOptions,
                   signature: LocalSignature | None = None):
    """Dynamo graph -> rewritten aten graph, without compiling it. Returns (PassResult, weights by input
    position, kept input positions): the rewritten graph takes `example_inputs[i] for i in kept` followed by
    the PassResult's constants. For a tensor-parallel graph, pass its `LocalSignature`: positions then refer to
    `signature.flatten(example_inputs)`, the DTensors' local shards."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_args = [_compat.dynamo_example_value(n) for n in placeholders]
    weights = find_weight_inputs(gm, example_inputs)
    if signature is not None:
        if options.algorithm == "gptq":
            raise NotImplementedError("qcompile: algorithm 'gptq' does not run on tensor-parallel (DTensor) "
                                      "graphs: its calibration replays the float graph on one process")
        fake_args = signature.fake_inputs(fake_args)
        weights = signature.local_weights(weights)
        example_inputs = signature.flatten(example_inputs)
    if _compat.has_compile_regions(gm):
        warnings.warn("qcompile: the graph calls torch.compiler.nested_compile_region regions; they are inlined and "
                      "compiled at every call site (each site's linears have their own quantized weights), so "
                      "the region saves no compile time here", stacklevel=2)
    aten_gm = _compat.trace_to_aten(gm, fake_args, wrap=signature.traced if signature is not None else None)
    aten_placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(aten_placeholders) != len(example_inputs):
        raise RuntimeError(f"qcompile: traced graph has {len(aten_placeholders)} inputs, Dynamo gave "
                           f"{len(example_inputs)}")
    weight_nodes = {aten_placeholders[i]: ref for i, ref in weights.items()}
    if signature is not None:
        signature.check_shard_groups(aten_gm, weight_nodes, options)
    hessians = {}
    if options.algorithm == "gptq":  # run the calibration inputs through the float graph first
        hessians = calibration.weight_hessians(gm, aten_gm, example_inputs, weights, options.calibration)
    result = quantize_linears(aten_gm, weight_nodes, options, lambda uses: quantized_weights(uses, options, hessians))
    kept = _drop_unused_weight_inputs(result, weights)
    return result, weights, kept


def compile_quantized(gm: torch.fx.GraphModule, example_inputs, options: QuantOptions):
    """Run the pass and Inductor on one Dynamo graph; returns (compiled callable, PassResult). A graph with the
    structure of one compiled before (another decoder layer's) reuses that compile with its own weights."""
    signature = LocalSignature.of(example_inputs, [_compat.dynamo_example_value(n) for n in gm.graph.nodes
                                                   if n.op == "placeholder"])
    key = _reuse_key(gm, example_inputs, options, signature)
    first = _COMPILED_BY_STRUCTURE.get(key) if key is not None else None
    sources = parameter_sources(gm, signature)
    if first is not None:
        return first.qcompile_rebind(example_inputs, sources), first.qcompile_result
    run, result = _compile_quantized(gm, example_inputs, options, signature, sources)
    if key is not None:
        _COMPILED_BY_STRUCTURE[key] = run
    return run, result


def _reuse_key(gm, example_inputs, options: QuantOptions, signature) -> tuple | None:
    """The structure key of a graph whose compile may be reused (graph_key.py), or None: tensor-parallel graphs,
    GPTQ (its statistics are per weight, collected in the graph's own calibration run), a pass observer
    (QCOMPILE_DEBUG: a report per compile) and CUDA-graph trees always compile."""
    if signature is not None or options.algorithm == "gptq" or _active_observers() or options.cudagraphs:
        return None  # (CUDA-graph trees would re-record one graph per weight set: no gain)
    names = {i: ref.name for i, ref in find_weight_inputs(gm, example_inputs).items()}
    structure = structure_key(gm, example_inputs, names)
    # every option, not only those deciding the weights: fuse_siblings, include/exclude, activation_quantization
    # change the compiled graph (the options hash without the calibration data); and the grad mode: a graph compiled
    # for inference has no backward, so reused for a grad-mode call its outputs would carry no gradient
    return None if structure is None else (options, structure, torch.is_grad_enabled())


def _compile_quantized(gm: torch.fx.GraphModule, example_inputs, options: QuantOptions, signature, sources):
    result, weights, kept = quantize_graph(gm, example_inputs, options, signature)
    for observer in _active_observers():
        observer.observe(gm, example_inputs, options, result, signature)
    if signature is not None:  # tensor parallel: the compiled graph takes the local shards
        example_inputs = signature.flatten(example_inputs)
    device = device_of(example_inputs)
    lower_for_device(result.gm, device, options)
    layouts = constant_layouts(result.gm)  # e.g. CPU kernels' interleaved rows
    lay_out = [layouts.get(name) for name, _ in result.constants]
    constants = _laid_out(lay_out, [t for _, t in result.constants])
    # what the lowered graph reads (and no longer the row-major tensors the cache has let go)
    result.constants[:] = [(name, t) for (name, _), t in zip(result.constants, constants)]
    inputs = [example_inputs[i] for i in kept] + constants
    cudagraphs = options.cudagraphs and device.type == "cuda"
    if options.cudagraphs and not cudagraphs:
        warnings.warn(f"qcompile: option cudagraphs applies to CUDA graphs only; this graph runs on {device.type}, "
                      f"without them", stacklevel=2)
    if cudagraphs:  # weights, buffers and quantized tensors are read in place at every replay, never copied
        _compat.mark_static_inputs(result.gm, gm, [i in weights or _compat.is_static_address(example_inputs[i])
                                                   for i in kept] + [True] * len(constants))
    decode_on_cpu = device.type == "cpu" and is_decode_graph(result.gm)
    # a CPU decode step's wrapper re-checked the size and stride of ~400 tensors per call (0.4 ms of SmolLM2's 10 ms
    # step): its inputs, which Dynamo's guards have checked already, and its extern kernels' outputs
    # a graph that will be differentiated rounds its fused intermediates as eager does: the backward of an
    # activation quantization's amax finds the saved max among the saved (rounded) activation only then; Inductor's
    # fused forward took the max of a producer's float32 values (a GELU's, before its bf16 cast), the backward
    # matched none of them and divided by a count of zero — NaN gradients for every dynamic scheme
    differentiated = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    compiled = _compat.compile_fx(result.gm, inputs, cudagraphs=cudagraphs, size_asserts=not decode_on_cpu,
                                  exact_casts=differentiated)
    if decode_on_cpu:
        compiled = _on_one_intra_op_thread(compiled)
    if not options.keep_float_weights:
        _release_float_weights(weights, kept, options, sources)

    return _bound_run(compiled, result, weights, kept,
                      WeightBinding(result, weights, constants, options, sources, lay_out), signature), result


def _laid_out(lay_out: list, constants: list) -> list:
    """Each constant in the layout its lowering asked for (`lay_out`: a function, or None for rows in order, per
    constant); the weight cache then holds the laid-out tensors in place of those they were laid out from."""
    laid = [f(t) if f is not None else cpu_layout.laid_out(t, rows=1) for f, t in zip(lay_out, constants)]
    _hold_laid_out([(t, new) for t, new in zip(constants, laid) if new is not t])
    return laid


def laid_out_constants(layouts: dict, constants: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of each constant in the layout `layouts` (`constant_layouts` of the lowered graph) asks for,
    held so in the weight cache: for export, whose program stores them."""
    laid = _laid_out([layouts.get(name) for name, _ in constants], [t for _, t in constants])
    return [(name, t) for (name, _), t in zip(constants, laid)]


def _hold_laid_out(replaced: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The weight cache keeps each packed tensor once: where a lowering laid a cached tensor out for its kernels
    (the same bytes in another order), the cache holds the laid-out tensor instead, and readers that need rows in
    order get a copy (`quantized_weight`). Fused siblings' member entries (views of the fused tensor's rows)
    become views of the laid-out one where its blocks allow (`layout.rows_view`); where one cannot, or where the
    old tensor is not the cache's, the cache keeps what it has. A graph that reads the old tensor (a reference op,
    not lowered) keeps it alive itself."""
    by_storage = {before.untyped_storage().data_ptr(): (before, after) for before, after in replaced
                  if before.device.type == "cpu" and before.numel() and before not in _LOOKED_UP}
    if not by_storage:
        return
    for before, _ in by_storage.values():  # once per tensor: a graph's binding lays out at every call
        _LOOKED_UP[before] = True
    plans: dict[int, list] = {}  # storage -> [(cache entry, name, replacement or None)]
    for per_tensor in list(_QUANTIZED.values()):
        for entry in per_tensor.values():
            tensors = entry[1] if isinstance(entry, tuple) else entry  # ([weakrefs], fused) for siblings
            for name, t in tensors.items():
                storage = t.untyped_storage().data_ptr()
                if storage in by_storage:
                    plans.setdefault(storage, []).append((tensors, name, _rows_of(t, *by_storage[storage])))
    for plan in plans.values():
        if all(new is not None for _, _, new in plan):
            for tensors, name, new in plan:
                tensors[name] = new


def _rows_of(t: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """`t` (`before` or a view of some of its rows) as the same rows of `after`, `before` laid out; else None."""
    if t is before:
        return after
    offset = t.storage_offset() - before.storage_offset()
    if (t.dim() != 2 or t.stride() != before.stride() or t.shape[1:] != before.shape[1:]
            or offset % before.stride(0) or not 0 <= offset // before.stride(0) <= before.shape[0] - t.shape[0]):
        return None
    return cpu_layout.rows_view(after, offset // before.stride(0), t.shape[0])


def _on_one_intra_op_thread(compiled):
    """`compiled` run with torch's intra-op threads set to 1. A CPU decode step is ~400 kernels of a few
    microseconds each (norms, RoPE, cache writes, SDPA) whose OpenMP teams cost more to wake than they save;
    SmolLM2-135M decode on 2 shared cores: 1.17x tokens/s. The GEMVs choose their own threads (intx_linear.h:
    an explicit team only for the largest, the LM head)."""
    def run(*args):
        threads = torch.get_num_threads()
        if threads == 1:
            return compiled(*args)
        torch.set_num_threads(1)
        try:
            return compiled(*args)
        finally:
            torch.set_num_threads(threads)
    return run


def _bound_run(compiled, result: PassResult, weights: dict[int, WeightRef], kept: list[int],
               constants_for: "WeightBinding", signature: LocalSignature | None):
    """The function Dynamo calls: the compiled graph fed the kept inputs and the quantized tensors of the call's
    weights. Its `qcompile_rebind(example_inputs)` serves another graph of the same structure with that graph's
    weights (quantized now; their float storage released as this graph's was)."""
    if signature is None:
        def run(*args):
            return compiled(*[args[i] for i in kept], *constants_for(args))
    else:  # tensor parallel: DTensors in, their local shards to the compiled graph
        def run(*args):
            local = signature.flatten(args)
            return signature.wrap_outputs(compiled(*[local[i] for i in kept], *constants_for(local)))

    def rebind(example_inputs, sources):
        own = {i: WeightRef(name=ref.name, tensor=example_inputs[i]) for i, ref in weights.items()}
        binding = constants_for.bound_to(example_inputs, sources)
        if not constants_for.options.keep_float_weights:
            _release_float_weights(own, kept, constants_for.options, sources)
        return _bound_run(compiled, result, own, kept, binding, signature)

    run.qcompile_result = result  # for debugging tools and tests
    run.qcompile_float_weights_read = [weights[i] for i in kept if i in weights]  # the CLI's byte counts
    run.qcompile_rebind = rebind
    return run


class WeightBinding:
    """The quantized tensors a compiled graph runs with, for the weights it is called with. Dynamo reuses one
    graph for every instance of a module class (their parameters are graph inputs, not constants), so a call
    can bring weights other than those the graph was compiled with; those get their own quantized tensors
    (quantized on first use, from the same cache), never the first instance's."""

    def __init__(self, result: PassResult, weights: dict[int, WeightRef], constants: list, options: QuantOptions,
                 sources: dict[int, _compat.ParameterSource | None], lay_out: list | None = None):
        position = {id(ref): i for i, ref in weights.items()}
        # per constant group (one linear's tensors): the input position of each weight it was quantized from
        self.groups = [(tuple(position[id(u.weight)] for u in g.uses), g) for g in result.constant_groups]
        self.compiled_with = [(i, u.weight.tensor) for positions, g in self.groups for i, u in zip(positions, g.uses)]
        self.constants = constants
        self.options = options
        self.sources = sources
        self.lay_out = lay_out or [None] * len(constants)  # per constant: the lowering's layout function, or None

    def bound_to(self, args, sources: dict[int, _compat.ParameterSource | None]) -> "WeightBinding":
        """This binding with `args`' weights (another graph's, whose parameters `sources` locates) as the ones its
        fast path serves (quantized now)."""
        bound = copy.copy(self)
        bound.constants = self(args)
        bound.compiled_with = [(i, args[i]) for i, _ in self.compiled_with]
        bound.sources = sources
        return bound

    def __call__(self, args) -> list:
        # the fast path: the weights the graph was compiled with (identity checks only)
        if all(args[i] is t for i, t in self.compiled_with):
            return self.constants
        if self.options.algorithm == "gptq":
            raise RuntimeError(
                "qcompile: a graph quantized with algorithm 'gptq' was called with the weights of another module "
                "instance (Dynamo shares one graph between instances of a module class), whose calibration "
                "statistics were never collected; compile the whole model in one torch.compile call, or use "
                "algorithm 'rtn' / 'hqq'")
        constants = []
        for positions, group in self.groups:
            uses = tuple(WeightUse(WeightRef(u.weight.name, args[i]), u.cast_dtype, u.weight_is_nk)
                         for i, u in zip(positions, group.uses))
            tensors = _held_weights(uses, self.options)
            if len(tensors) != group.count:
                raise AssertionError(f"{'+'.join(u.weight.name for u in uses)}: {len(tensors)} quantized tensors, "
                                     f"the graph takes {group.count}")
            constants.extend(tensors.values())
            for i, use in zip(positions, uses):
                if (not self.options.keep_float_weights and args[i] not in _READ_IN_FLOAT
                        and release_float_weight(args[i], use.weight.name, self.options)
                        and self.sources.get(i) is not None):
                    owner = self.sources[i].owner_in_callers(args[i])  # this instance's module, in the caller
                    if owner is not None:
                        released.attach(owner, released_weight)
        return _laid_out(self.lay_out, constants)


def device_of(values) -> torch.device:
    """The first non-CPU device among the tensors in `values` (graph inputs, a program's weights), else CPU."""
    for t in values:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def qcompile_backend(gm: torch.fx.GraphModule, example_inputs, options=None, **kwargs):
    """The Dynamo backend registered as "qcompile" (entry point torch_dynamo_backends)."""
    if kwargs:
        warnings.warn(f"qcompile: ignoring backend arguments {sorted(kwargs)}", stacklevel=2)
    opts = QuantOptions.from_dict(options)
    run, _ = compile_quantized(gm, example_inputs, opts)
    return run
