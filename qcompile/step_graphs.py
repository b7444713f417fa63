"""One CUDA graph per call of a model: the call's kernels — every compiled block, the eager glue between them, the
LM head — captured once per input signature and replayed afterwards, so a decode step costs one graph launch
however the model was compiled (per block with compile_blocks, or not at all).

    model.forward = StepGraphs(model.forward)     # what compile_blocks(..., {"cudagraphs": True}) does

Why not Inductor's CUDA-graph trees: they replay a graph per compiled function — per decoder block under
per-layer compile — and their host-side bookkeeping per replay (~100 us on the H200) left per-layer decode at 194
against 268 tokens/s whole-model. Capturing the whole call is what the benchmark's own decode loop did by hand;
here it runs under any caller's loop, transformers' generate() included.

Contract (as mode="reduce-overhead"): a call's outputs live in the graphs' memory pool and are overwritten by the
next replayed call — keep what you need (generate() reads the logits before the next step). Per signature:
  - calls run eagerly on the capture stream until one of them compiles nothing (the first compiles the regions
    and warms them up; Dynamo may recompile on the second — a guard on state the first call changed — and a
    compile inside a capture would record its own work, e.g. tuning, into the graph or void it);
  - a call that compiled nothing but synchronized with the host (sync debug mode sees `.item()`, `bool(tensor)`, a
    blocking copy: transformers' mask code does this for some calls) would void a capture: its signature stays
    eager (syncs of a call that compiled are the compile's own — Inductor's pattern matcher, tuning — and ignored);
  - the call after a clean eager one is captured — recorded, then replayed once, so its side effects (a static KV
    cache's write and position counter) happen exactly once — and later calls replay it.
A signature is the call's structure: the shape, dtype, stride and device of each tensor argument (copied into the
graph's own input buffers at every replay), the value of every plain argument (ints, strings, None), and for any
other object argument (a KV-cache object) its identity and the addresses of the tensors it holds: the graph reads
and writes those in place, so a new cache object or re-allocated cache tensors get a new graph. A call that
cannot be captured (it synchronizes with the host, say) stays eager for that signature; the reasons are in
`uncapturable`, and one warning per StepGraphs names the first (a prompt's call that stays eager costs little; a
decode step that does is the slow path users must hear about). Grad-enabled calls and CPU calls always run eagerly.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from . import _compat

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # signatures kept captured (least recently used dropped): decode b1, b128, a few prompt lengths
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_TYPES = frozenset(_PLAIN)


def _held_tensors(obj, depth: int = 4, containers: list | None = None) -> list[torch.Tensor]:
    """The tensors reachable from an object's attributes, lists and dicts (a KV cache's key/value tensors and its
    position counter), in a deterministic order (depth first). `containers`, if given, gets each mutable container
    the walk read (a dict, a list, an object's __dict__) with the identities of its items then (_Holdings checks
    them). Written for speed (an 8B model's StaticCache holds 96 tensors in 33 containers), tensors and plain
    values among the items handled without a call."""
    held: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(o, depth):
        if depth < 0 or id(o) in seen:
            return
        seen.add(id(o))
        kind = type(o)
        if kind is dict:
            items = o.values()
        elif kind is list or kind is tuple:
            items = o
        elif isinstance(o, torch.Tensor):
            held.append(o)
            return
        elif isinstance(o, _PLAIN):
            return
        elif isinstance(o, dict):
            items = o.values()
        elif isinstance(o, (list, tuple)):
            items = o
        elif hasattr(o, "__dict__") and not isinstance(o, (torch.nn.Module, type)):
            o = vars(o)
            items = o.values()
        else:  # a callable or other object without attributes to read
            return
        if containers is not None and not isinstance(o, tuple):  # (a tuple's items cannot change)
            containers.append((o, isinstance(o, dict), tuple(map(id, items))))
        for item in items:
            if type(item) in _PLAIN_TYPES:
                continue
            if isinstance(item, torch.Tensor):
                if depth > 0 and id(item) not in seen:
                    seen.add(id(item))
                    held.append(item)
            else:
                walk(item, depth - 1)

    walk(obj, depth)
    return held


class _Holdings:
    """What an object argument (a KV cache) holds, remembered between calls: its tensors, as _held_tensors finds
    them, and the mutable containers the walk read with the identities of their items. A call walks again only
    when an item changed (an attribute re-assigned, a lazily allocated tensor set, a list grown); otherwise the
    object's part of the signature is read from the remembered tensors (with the flat-call shortcut, signature()
    162 -> 34 us a call for a 32-layer StaticCache on the CI machine): host time between generate()'s per-step
    sync and the replay, while the GPU idles."""

    def __init__(self, obj):
        self.ref = weakref.ref(obj)
        self.containers: list[tuple[object, bool, tuple]] = []  # (container, is a dict, ids of its items)
        self.tensors = _held_tensors(obj, containers=self.containers)

    def current(self, obj) -> bool:
        if self.ref() is not obj:  # a new object at a dead one's address
            return False
        return all(tuple(map(id, container.values() if is_dict else container)) == ids
                   for container, is_dict, ids in self.containers)


_HOLDINGS: dict[int, _Holdings] = {}


def _holdings(obj) -> list[torch.Tensor]:
    """_held_tensors(obj), from _Holdings' memory where it is still current."""
    try:
        memo = _HOLDINGS.get(id(obj))
        if memo is None or not memo.current(obj):
            if memo is None:  # forgotten with the object (one finalizer per object)
                weakref.finalize(obj, _HOLDINGS.pop, id(obj), None)
            memo = _HOLDINGS[id(obj)] = _Holdings(obj)
        return memo.tensors
    except TypeError:  # no weak references to this type: walk every call
        return _held_tensors(obj)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)  # torch.Size hashes and compares as the tuple it is


def signature(args: tuple, kwargs: dict) -> tuple[tuple, list[int]]:
    """(hashable signature of a call, positions of its tensor leaves among pytree's leaves)."""
    return _signature_of_leaves(*_flatten(args, kwargs))


def _flatten(args: tuple, kwargs: dict) -> tuple[list, object]:
    """pytree's leaves of (args, kwargs) and a hashable description of their structure. A flat call (no argument a
    container or a registered pytree node: a decode step's tensors, flags and cache object) takes a shortcut with
    the same leaves in the same order (pytree reads a dict in insertion order): ~1 us against pytree's ~10."""
    leaves = [*args, *kwargs.values()]
    for leaf in leaves:
        kind = type(leaf)
        if kind in _PLAIN_TYPES or kind is torch.Tensor or kind is torch.nn.Parameter:
            continue
        if kind in pytree.SUPPORTED_NODES or isinstance(leaf, (tuple, list, dict)):
            leaves, spec = pytree.tree_flatten((args, kwargs))
            return leaves, str(spec)
    return leaves, (len(args), *kwargs)


def _signature_of_leaves(leaves: list, structure) -> tuple[tuple, list[int]]:
    parts, tensor_positions = [structure], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", *_tensor_key(leaf)))
            tensor_positions.append(i)
        elif isinstance(leaf, _PLAIN):
            parts.append(("value", type(leaf).__name__, leaf))
        else:  # read in place by the graph: same object, same tensors at the same addresses
            # (_holdings finds a re-assigned tensor anew; a held tensor's dtype, device and layout are its own —
            # a tensor resized in place at the same address, which no KV cache does, would go unnoticed)
            parts.append(("object", id(leaf), tuple([t.data_ptr() for t in _holdings(leaf)])))
    return tuple(parts), tensor_positions


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_leaves: list  # the tensor leaves the graph reads (copied into before every replay)
    tensor_positions: list[int]
    output: object
    keep: list = field(default_factory=list)  # the original call's non-tensor leaves (a cache object) stay alive

    def replay(self, leaves: list):
        if self.static_leaves:  # one launch for all the inputs (host time while the GPU waits for the replay)
            torch._foreach_copy_(self.static_leaves, [leaves[position] for position in self.tensor_positions])
        self.graph.replay()
        return self.output


class StepGraphs:
    """Wraps a callable (a model's forward) to replay each call signature as one CUDA graph (module docstring)."""

    def __init__(self, fn, max_graphs: int = MAX_GRAPHS):
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.ready: set[tuple] = set()  # signatures whose last eager call compiled nothing: the next is captured
        self.uncapturable: dict[tuple, str] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.captures = 0  # counters the tests and benchmarks read
        self.replays = 0
        self.eager_calls = 0

    def __call__(self, *args, **kwargs):
        leaves, structure = _flatten(args, kwargs)
        device = _cuda_device(leaves)
        if device is None or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            self.eager_calls += 1
            return self.fn(*args, **kwargs)
        key, tensor_positions = _signature_of_leaves(leaves, structure)
        captured = self.graphs.get(key)
        if captured is not None:
            self.graphs.move_to_end(key)
            self.replays += 1
            return captured.replay(leaves)
        if key in self.uncapturable:
            return self._eager(device, args, kwargs)
        if key not in self.ready:
            return self._eager_until_ready(device, key, args, kwargs)
        return self._capture(device, key, tensor_positions, args, kwargs)

    def _on_stream(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        return self.stream

    def _eager(self, device, args, kwargs):
        """Run on the capture stream, so the libraries' per-stream state (cuBLAS workspaces) the capture will
        need exists before it."""
        self.eager_calls += 1
        stream = self._on_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out = self.fn(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(stream)
        return out

    def _eager_until_ready(self, device, key, args, kwargs):
        """An eager call that also learns whether the signature can be captured: ready once a call compiled nothing
        and did not synchronize with the host, uncapturable once such a call did synchronize."""
        compiles = _compat.dynamo_compile_count()
        with _host_syncs_recorded() as syncs:
            out = self._eager(device, args, kwargs)
        if _compat.dynamo_compile_count() != compiles:
            # compiling synchronizes (Inductor's pattern matcher, autotuning, a first call's lazy checks): these
            # syncs say nothing of later calls; the next call of this signature is asked again
            return out
        if syncs:
            self._give_up(key, f"it synchronizes with the host at {syncs[0]}")
        else:
            self.ready.add(key)
        return out

    def _give_up(self, key, reason: str) -> None:
        self.uncapturable[key] = reason
        message = (f"qcompile: a call of {getattr(self.fn, '__qualname__', self.fn)} could not be captured as a CUDA "
                   f"graph ({reason}); calls of this signature run without CUDA graphs")
        if len(self.uncapturable) == 1:
            warnings.warn(message + " (further signatures that cannot be captured are logged, not warned)",
                          stacklevel=4)
        else:
            log.info(message)

    def _capture(self, device, key, tensor_positions, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        static_leaves = [leaves[i].clone() for i in tensor_positions]
        graph_leaves = list(leaves)
        for position, static in zip(tensor_positions, static_leaves):
            graph_leaves[position] = static
        graph_args, graph_kwargs = pytree.tree_unflatten(graph_leaves, spec)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        stream = self._on_stream(device)
        torch.cuda.synchronize(device)
        gc.collect()  # a dead cycle's CUDA tensors freed mid-capture would be freed into the graph's pool
        graph = torch.cuda.CUDAGraph()
        compiles = _compat.dynamo_compile_count()
        try:
            with torch.cuda.stream(stream):
                # thread-local: CUDA calls of other threads (Inductor's compile workers) must not void the capture
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    output = self.fn(*graph_args, **graph_kwargs)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 (a host sync, an unsupported op: this signature stays eager)
            _recover_from_failed_capture(device, self.pool)
            self.pool = torch.cuda.graph_pool_handle()  # the failed capture's pool may still be marked as recording
            if _compat.dynamo_compile_count() != compiles:  # a recompile voided it: not the call's fault, try again
                self.ready.discard(key)
            else:
                self._give_up(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return self._eager(device, args, kwargs)
        if _compat.dynamo_compile_count() != compiles:
            # Dynamo recompiled inside the capture: the graph holds that compile's own GPU work (random tuning
            # inputs, weight packing) and was never run; drop it and run the call eagerly, capture a later one
            del graph
            self.ready.discard(key)
            return self._eager(device, args, kwargs)
        self.captures += 1
        captured = _Captured(graph, static_leaves, tensor_positions, output,
                             keep=[leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)])
        self.graphs[key] = captured
        self.replays += 1
        return captured.replay(leaves)  # the captured call's work happens here, once

    def reset(self) -> None:
        """Drop every captured graph (their memory pool goes with them)."""
        self.graphs.clear()
        self.ready.clear()
        self.uncapturable.clear()


@contextlib.contextmanager
def _host_syncs_recorded():
    """Yields a list that gets the places (file:line) where the calls inside synchronized with the host, from
    torch's sync debug mode (a warning per sync, recorded here and not shown; other warnings pass through)."""
    syncs: list[str] = []
    previous_mode = torch.cuda.get_sync_debug_mode()
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield syncs
            finally:
                torch.cuda.set_sync_debug_mode(previous_mode)
    finally:  # the call's own warnings are shown, even when it raised
        for w in caught:
            if "called a synchronizing CUDA operation" in str(w.message):
                syncs.append(f"{w.filename}:{w.lineno}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _recover_from_failed_capture(device: torch.device, pool) -> None:
    """Undo what a failed capture left behind: torch's capture_end raises at cudaStreamEndCapture before it tells
    the caching allocator to stop allocating into the graph's pool and before it takes the RNG out of capture
    mode — after which every allocation went to a dead pool and every random op failed ("Offset increment outside
    graph capture")."""
    torch.cuda.synchronize(device)
    try:
        torch._C._cuda_endAllocateToPool(device.index if device.index is not None else torch.cuda.current_device(),
                                         pool)
    except RuntimeError:
        pass  # capture_end got that far
    generator = torch.cuda.default_generators[device.index if device.index is not None else
                                              torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())  # a fresh state object: same seed and offset


def _cuda_device(leaves: list) -> torch.device | None:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
            return leaf.device
    return None


def capture_steps(model: torch.nn.Module, max_graphs: int = MAX_GRAPHS) -> StepGraphs:
    """Replay each call of `model` as one CUDA graph per call signature (module docstring); returns the StepGraphs
    that now serves `model.forward` (its counters say what it did). Calling it again returns the same one."""
    current = model.__dict__.get("forward")
    if isinstance(current, StepGraphs):
        return current
    steps = StepGraphs(model.forward, max_graphs)
    model.forward = steps
    return steps
