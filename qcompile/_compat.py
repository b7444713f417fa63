"""Everything that touches PyTorch internals whose shape changes between torch 2.11 and 2.14, in one place."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pathlib
import re
import sys

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx


def source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's source string for a placeholder, e.g. "L['self']._modules['fc']._parameters['weight']"."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None or getattr(grapharg, "source", None) is None:
        return None
    name = grapharg.source.name
    return name() if callable(name) else name


def dynamo_path(text: str) -> str:
    """A Dynamo source or nn_module_stack path as a module path:
    "L['args'][0]._modules['model']._modules['fc']._parameters['weight']" and "L['self'].model.fc.weight"
    both give "model.fc.weight" (the root — the compiled module or function argument — is dropped)."""
    path = re.sub(r"_(modules|parameters|buffers)\['([^']*)'\]", r"\2", text)
    path = re.sub(r"^[LG]\['[^']*'\](\[\d+\])*", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return re.sub(r"\.+", ".", path).strip(".")


def dynamo_frame():
    """(code, locals, globals) of the Python frame Dynamo is compiling when it calls the backend, or None.
    The locals are the frame's real argument values (the module, the call's tensors)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return None
    return tx.f_code, tx.f_locals, tx.f_globals


# "<owner>._parameters['weight']", or attribute style "<owner>.weight"
_PARAMETER_SOURCE = re.compile(r"^(?P<owner>.+?)(\._parameters\['(?P<attr>[^']+)'\]|\.(?P<plain_attr>\w+))$")
# how many frames above the backend's compiled function the frame Dynamo compiled can be (2 in torch 2.13)
CALLER_FRAMES_SEARCHED = 16


@dataclasses.dataclass(frozen=True)
class ParameterSource:
    """Where Dynamo read a parameter input: its owning module, as an expression over the compiled frame's
    `L` (locals) and `G` (globals), and the attribute name. Finds that module again in the compiled frame, or —
    for another module instance that shares the graph — in the Python frame calling the compiled function."""
    owner: object  # the compiled expression
    attr: str
    code_name: str  # the compiled frame's function, to recognise it among the callers
    code_file: str

    @classmethod
    def of(cls, node: torch.fx.Node) -> "ParameterSource | None":
        """For a Dynamo placeholder read as `<module>._parameters['<attr>']` while compiling a frame; else None."""
        match = _PARAMETER_SOURCE.match(source_name(node) or "")
        frame = dynamo_frame()
        if match is None or frame is None:
            return None
        code = frame[0]
        return cls(compile(match["owner"], "<qcompile parameter owner>", "eval"), match["attr"] or match["plain_attr"],
                   code.co_name, code.co_filename)

    def _owner_in(self, frame_locals, frame_globals, tensor: torch.Tensor) -> "torch.nn.Module | None":
        try:
            owner = eval(self.owner, {"__builtins__": {}}, {"L": frame_locals, "G": frame_globals})
        except Exception:  # another frame of the same function that does not hold it
            return None
        held = owner._parameters.get(self.attr) if isinstance(owner, torch.nn.Module) else None
        if held is tensor or (is_dtensor(held) and dtensor_local(held) is tensor):
            return owner
        return None

    def owner_while_compiling(self, tensor: torch.Tensor) -> "torch.nn.Module | None":
        frame = dynamo_frame()
        return None if frame is None else self._owner_in(frame[1], frame[2], tensor)

    def owner_in_callers(self, tensor: torch.Tensor) -> "torch.nn.Module | None":
        """Dynamo runs the compiled function from the original frame (its code rewritten, its locals kept): the
        module is found there, checked by identity with `tensor`."""
        frame = sys._getframe(1)
        for _ in range(CALLER_FRAMES_SEARCHED):
            if frame is None:
                return None
            code = frame.f_code
            if code.co_name == self.code_name and code.co_filename == self.code_file:
                owner = self._owner_in(frame.f_locals, frame.f_globals, tensor)
                if owner is not None:
                    return owner
            frame = frame.f_back
        return None


def dynamo_example_value(node: torch.fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


class _RegionInliner(torch.fx.Interpreter):
    """Runs a Dynamo graph with every `torch.compiler.nested_compile_region` call (the invoke_subgraph HOP) run as
    its subgraph's own ops, so the aten trace inlines them: each call site's linears then match with their own
    weights. Kept as a HOP, the regions' bodies reached Inductor pre-traced to aten, which its invoke_subgraph
    lowering does not take (torch 2.13: "both a fallback and a decomp for same op: aten.t"). Dynamo traces a
    region's body at one call site and reuses it at the others, so the body's nn_module_stack names that site's
    modules: while a site runs, the body's stacks are rewritten to name its own (the pass names nodes by them)."""

    def run_node(self, n):
        self._site = n
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if target is not torch.ops.higher_order.invoke_subgraph:
            return super().call_function(target, args, kwargs)
        subgraph, _identifier, *operands = args
        site_stack = self._site.meta.get("nn_module_stack") or {}
        saved = {node: node.meta.get("nn_module_stack") for node in subgraph.graph.nodes}
        try:
            for node, stack in saved.items():
                if stack and site_stack:
                    node.meta["nn_module_stack"] = _restack(stack, site_stack)
            return _RegionInliner(subgraph).run(*operands)
        finally:
            for node, stack in saved.items():
                if stack is not None:
                    node.meta["nn_module_stack"] = stack


def _restack(stack: dict, site_stack: dict) -> dict:
    """A region body node's nn_module_stack as seen from another call site: the site's own stack, then the body's
    entries below the region's root module with the root's path replaced by the site's."""
    depth = len(site_stack)
    entries = list(stack.items())
    if len(entries) < depth:
        return dict(site_stack)
    root_path = entries[depth - 1][1][0]
    site_path = list(site_stack.values())[-1][0]
    inner = {key.replace(root_path, site_path): (path.replace(root_path, site_path, 1), *rest)
             for key, (path, *rest) in entries[depth:]}
    return {**site_stack, **inner}


def has_compile_regions(gm: torch.fx.GraphModule) -> bool:
    """Whether a Dynamo graph calls `torch.compiler.nested_compile_region` bodies (trace_to_aten inlines them)."""
    return bool(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph))


def trace_to_aten(gm: torch.fx.GraphModule, fake_args: list, wrap=None) -> torch.fx.GraphModule:
    """Trace a Dynamo graph into an aten-level graph on the same fake inputs (same symbolic shapes), without
    functionalization or Inductor's decompositions: linear becomes t + mm/addmm (+ views), as AOTAutograd
    would see it. Node metadata (nn_module_stack, stack traces) is carried over from the Dynamo nodes.
    `wrap(run)`, if given, turns the graph's function into the one to trace (over `fake_args`), e.g.
    `distributed.LocalSignature.traced`: the graph over DTensors' local shards."""
    interpreter = _RegionInliner(gm)

    def run(*args):
        return interpreter.run(*args)

    if wrap is not None:
        run = wrap(run)
    with torch.fx.traceback.preserve_node_meta(), torch.no_grad():
        traced = make_fx(run, tracing_mode="symbolic", record_module_stack=False)(*fake_args)
    # make_fx leaves its ShapeEnv on the module; AOTAutograd's cache key pickles the module's attributes and the
    # ShapeEnv pickles differently every time, so the cache never hit (AOTAutograd retraced every graph, custom
    # ops and Triton kernel analyses included). Nothing downstream reads it: AOTAutograd traces its own.
    traced.__dict__.pop("shape_env", None)
    return traced


@functools.lru_cache(None)
def _kernel_sources_hash() -> bytes:
    """Hash of every source whose code ends up inside compiled graphs: the kernels, and the reference ops and
    numerics that Inductor traces through (their decompositions are not part of a cached graph's key), and
    lower_cuda's tables of them, which the Triton ops' backward is built from (registered there)."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    package = pathlib.Path(__file__).parent
    sources = [p for p in (package / "kernels").rglob("*") if p.suffix in (".py", ".h")]
    sources += [package / "ops.py", *(package / "quant").rglob("*.py"), package / "passes" / "lower_cuda.py"]
    return get_hash_for_files(tuple(sorted(str(p) for p in sources)))


def _kernel_stamp_pass(wrapped):
    """A post-grad pass that only runs the user's own (if any) and whose uuid() is the hash of qcompile's kernel
    and reference-op sources. Inductor's caches key on it, so editing a kernel — the C++ header that a template
    renders into the output code, a Triton kernel — or a reference op's decomposition invalidates cached graphs
    built from the old one. Whether the autotuner measures is in the key too: a cached graph keeps the configs
    chosen when it was compiled, so one compiled with tuning off (each bucket's first candidate) must not serve a
    compile that tunes (it did on the H200: a GPU test found no tuning done)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from .kernels.triton.tuning import autotune_enabled

    class KernelSourceStamp(CustomGraphPass):
        def __call__(self, graph):
            if wrapped is not None:
                wrapped(graph)

        def uuid(self):
            if wrapped is not None and not hasattr(wrapped, "uuid"):
                return None  # an unhashable user pass disables caching, as in Inductor
            return (_kernel_sources_hash(), autotune_enabled(), wrapped.uuid() if wrapped is not None else None)

    return KernelSourceStamp()


def mark_static_inputs(gm: torch.fx.GraphModule, dynamo_gm: torch.fx.GraphModule, static: list[bool]) -> None:
    """Tell AOTAutograd which of gm's inputs keep their address from call to call (weights, buffers such as a
    KV cache, quantized tensors), so that Inductor's CUDA-graph trees read them in place instead of copying
    them into the graph's own buffers at every replay. AOTAutograd takes this only from Dynamo's metadata
    (_functorch/_aot_autograd/frontend_utils.py, _try_get_metadata_from_dynamo), which our own aten trace
    lacks: the graph's meta["dynamo_compile_id"] and _param_name_to_source, and per placeholder a unique
    _dynamo_source and meta["tensor_dict"]["_dynamo_static_input_type"]."""
    from torch._dynamo.source import LocalSource

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(static):
        raise AssertionError(f"{len(placeholders)} placeholders, {len(static)} static flags")
    gm.meta["dynamo_compile_id"] = dynamo_gm.meta.get("dynamo_compile_id")
    attrs = [name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]]
    gm._param_name_to_source = {name: LocalSource(f"__qcompile_attr_{name}") for name in attrs}
    for i, (node, is_static) in enumerate(zip(placeholders, static)):
        node._dynamo_source = LocalSource(f"__qcompile_input_{i}")
        tensor_dict = node.meta.setdefault("tensor_dict", {})
        if is_static:
            tensor_dict["_dynamo_static_input_type"] = "unguarded"
        else:
            tensor_dict.pop("_dynamo_static_input_type", None)


def compiled_call(module: torch.nn.Module):
    """What Module.compile() installed: the compiled call that Module.__call__ runs instead of its own (or None)."""
    return getattr(module, "_compiled_call_impl", None)


def set_compiled_call(module: torch.nn.Module, call) -> None:
    module._compiled_call_impl = call


def dynamo_compile_count() -> int:
    """Graphs Dynamo has compiled in this process (grows by one per compile or recompile of a frame)."""
    from torch._dynamo.utils import counters
    return counters["stats"].get("unique_graphs", 0)


def is_static_address(t) -> bool:
    """Whether Dynamo marked the tensor as keeping its address (module parameters/buffers, mark_static_address)."""
    return getattr(t, "_dynamo_static_input_type", None) is not None


def compile_fx(gm: torch.fx.GraphModule, example_inputs: list, cudagraphs: bool = False,
               size_asserts: bool = True, exact_casts: bool = False):
    """Inductor's compile_fx with qcompile's kernel-source stamp in its cache key; `cudagraphs` replays CUDA
    graphs (CUDA-graph trees, as mode="reduce-overhead"; mark_static_inputs first); `size_asserts=False` drops
    the output code's per-call size/stride check of each tensor it is handed (config.size_asserts);
    `exact_casts` rounds every fused intermediate to its dtype as eager does (config.emulate_precision_casts)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    stamp = _kernel_stamp_pass(config.post_grad_custom_post_pass)
    patches = {"post_grad_custom_post_pass": stamp}
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    if not size_asserts:
        patches["size_asserts"] = False
    if exact_casts and hasattr(config, "emulate_precision_casts"):
        patches["emulate_precision_casts"] = True
    with _no_unlogged_graph_repro():
        return inductor_compile_fx(gm, example_inputs, config_patches=patches)


@contextlib.contextmanager
def _no_unlogged_graph_repro():
    """Inductor (2.11-2.14) writes a runnable repro of every graph it compiles into a string that only structured
    tracing (TORCH_TRACE / tlparse) reads; with user Triton kernels that repro walks the source AST of every kernel
    the process has registered, for every graph — seconds per compiled layer of an 8B model (seen in H100 stack
    samples of the cold compile). While no structured-trace handler listens, that call writes nothing; any other
    call (a save_dir, a file, tracing on) goes through unchanged."""
    try:
        from torch._dynamo.repro import after_aot
        from torch._logging._internal import trace_log
    except ImportError:
        yield
        return
    original = getattr(after_aot, "save_graph_repro", None)
    if original is None:
        yield
        return

    def listening() -> bool:  # torch's lazy handler without a TORCH_TRACE folder removes itself at its first record
        return any(getattr(handler, "root_dir", "") is not None for handler in trace_log.handlers)

    def save_graph_repro(fd, *args, **kwargs):
        if kwargs.get("save_dir", "unset") is None and isinstance(fd, io.StringIO) and not listening():
            return None
        return original(fd, *args, **kwargs)

    after_aot.save_graph_repro = save_graph_repro
    try:
        yield
    finally:
        after_aot.save_graph_repro = original


# --- DTensor (tensor parallelism): torch 2.11 flattens a DTensor to its local tensor with the mesh in the
# spec; 2.13 flattens it to the local tensor and the mesh (an opaque object). The __tensor_flatten__ protocol
# covers both.

def is_dtensor(value) -> bool:
    if not isinstance(value, torch.Tensor) or not torch.distributed.is_available():  # builds without distributed
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def is_opaque_object(value) -> bool:
    """A non-tensor graph input that Dynamo passes as an object (the DeviceMesh in torch >= 2.13)."""
    if isinstance(value, torch.ScriptObject):
        return True
    try:
        from torch._library.opaque_object import is_opaque_value
    except ImportError:  # torch 2.11: no opaque objects
        return False
    return is_opaque_value(value)


def dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, without the autograd function to_local() goes through."""
    return t._local_tensor


def dtensor_rebuilder(t: torch.Tensor):
    """A function (local shard, global size = t's, global stride = t's) -> a DTensor with `t`'s mesh and
    placements."""
    attrs, ctx = t.__tensor_flatten__()
    others = {name: getattr(t, name) for name in attrs if name != "_local_tensor"}

    def rebuild(local, size=t.size(), stride=t.stride()):
        return type(t).__tensor_unflatten__({"_local_tensor": local, **others}, ctx, size, stride)

    return rebuild


def shard_ranges(t: torch.Tensor, dim: int) -> list[tuple[int, int]]:
    """[start, stop) along `dim` of every rank's shard of the DTensor `t`, as Shard(dim) splits it (torch.chunk:
    ceil(n / ranks) per rank, the last ones shorter or empty), for each mesh dimension sharding `dim` in turn."""
    from torch.distributed.tensor.placement_types import Shard

    ranges = [(0, t.shape[dim])]
    for mesh_dim, placement in enumerate(t.placements):
        if not placement.is_shard(dim):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"qcompile: placement {placement} of a linear weight is not supported; "
                                      f"tensor-parallel linears take Shard(0) or Shard(1) weights")
        ranks = t.device_mesh.size(mesh_dim)
        split = []
        for start, stop in ranges:
            chunk = -(-(stop - start) // ranks)
            split += [(min(start + r * chunk, stop), min(start + (r + 1) * chunk, stop)) for r in range(ranks)]
        ranges = split
    return ranges


# --- Inductor's analysis of user Triton kernels -------------------------------------------------------------

TTIR_CACHE_ENTRIES = 256


def _ttir_arg_key(value):
    """What of one kernel argument reaches the TTIR that torch's generate_ttir builds, or None when unknown:
    it replaces fake tensors / TensorBoxes by empty(2) of their dtype and symbolic values by 2; a real tensor
    is specialised on its dtype and 16-byte alignment, a plain value on itself."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbolic",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    if type(value).__name__ == "TensorBox":
        return ("tensor", value.get_dtype())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return ("value", type(value).__name__, value)
    return None


# TTIR modules built for qcompile's kernels, by id, kept alive so that an id is never reused while listed
_OUR_TTIR: dict[int, object] = {}


def _ours(ttir_module):
    if len(_OUR_TTIR) >= TTIR_CACHE_ENTRIES and id(ttir_module) not in _OUR_TTIR:
        _OUR_TTIR.pop(next(iter(_OUR_TTIR)))
    _OUR_TTIR[id(ttir_module)] = ttir_module
    return ttir_module


def memoized_generate_ttir(original):
    """`original` (torch's triton_kernel_wrap.generate_ttir) memoized for qcompile's kernels. Inductor builds a
    user kernel's TTIR to find which tensors it writes at every call site, more than once per site (~0.2 s for
    the linear template): the 8B model's 129 linears spent most of the int4 model's Inductor time there. The
    TTIR module owns its MLIR context (Triton: `module.context = context`), so keeping it is safe; the
    analyses only read it."""
    cache: dict = {}

    @functools.wraps(original)
    def generate_ttir(kernel, kwargs, tma_descriptor_metadata):
        fn = getattr(kernel, "fn", None)
        if not getattr(fn, "__module__", "").startswith("qcompile."):
            return original(kernel, kwargs, tma_descriptor_metadata)
        keys = [_ttir_arg_key(kwargs[name]) for name in sorted(kwargs)]
        if tma_descriptor_metadata or any(k is None for k in keys):
            ttir_module, arg_names = original(kernel, kwargs, tma_descriptor_metadata)
            return _ours(ttir_module), arg_names
        key = (kernel, tuple(zip(sorted(kwargs), keys)))
        if key not in cache:
            if len(cache) >= TTIR_CACHE_ENTRIES:
                cache.pop(next(iter(cache)))
            cache[key] = original(kernel, kwargs, tma_descriptor_metadata)
        ttir_module, arg_names = cache[key]
        return _ours(ttir_module), list(arg_names)

    generate_ttir.qcompile_memoized = True
    return generate_ttir


def prefetch_aware_ttir_to_functions(original):
    """`original` (torch's ttir_to_functions) with qcompile's non-pure inline asm read as writing no memory.
    Torch's analysis gives up on a non-pure `tt.elementwise_inline_asm` and then assumes the kernel writes every
    input, weights included: CUDA graphs are skipped ("mutated inputs") and the scheduler orders around phantom
    writes. qcompile's only non-pure asm is the L1 prefetch (kernels/triton/dequant.py), non-pure only so that
    the compiler keeps an instruction whose result nobody reads; tests/test_compat_ttir.py holds it to that."""

    @functools.wraps(original)
    def ttir_to_functions(ttir_module, *args, **kwargs):
        functions = original(ttir_module, *args, **kwargs)
        if _OUR_TTIR.get(id(ttir_module)) is not ttir_module:
            return functions
        return {name: {result: [dataclasses.replace(op, is_pure=True)
                                if op.name == "tt.elementwise_inline_asm" else op for op in ops]
                       for result, ops in body.items()}
                for name, body in functions.items()}

    ttir_to_functions.qcompile_prefetch_aware = True
    return ttir_to_functions


def install_ttir_memo() -> bool:
    """Put memoized_generate_ttir in place of torch's generate_ttir and prefetch_aware_ttir_to_functions in place
    of its ttir_to_functions (torch 2.11-2.14 call both by their module globals from the analysis of which
    tensors a user kernel writes). False if this torch has no such functions with those signatures (then nothing
    changes)."""
    import inspect

    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:
        return False
    generate, to_functions = getattr(wrap, "generate_ttir", None), getattr(wrap, "ttir_to_functions", None)
    op_class = getattr(wrap, "Op", None)
    if generate is None or to_functions is None or op_class is None \
            or "is_pure" not in getattr(op_class, "__dataclass_fields__", {}):
        return False
    if getattr(generate, "qcompile_memoized", False):
        return True
    if list(inspect.signature(generate).parameters) != ["kernel", "kwargs", "tma_descriptor_metadata"] \
            or list(inspect.signature(to_functions).parameters)[:1] != ["ttir_module"]:
        return False
    wrap.generate_ttir = memoized_generate_ttir(generate)
    wrap.ttir_to_functions = prefetch_aware_ttir_to_functions(to_functions)
    return True
