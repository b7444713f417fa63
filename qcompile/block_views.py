"""One Dynamo trace for every decoder block of a transformers model, where there were one per block.

transformers' attention reads `self.layer_idx` to pick its slot of the KV cache (`cache.update(k, v,
self.layer_idx)`); Dynamo specializes on the int, so each of an 8B model's 32 blocks was traced again for the
prompt and again for the decode step (64 traces: 18 s of a 64 s first generate() on the H200, and all of a warm
start's floor, since Dynamo's work is never cached across processes).

Here, inside a compiled block, every `layer_idx` reads 0 and the cache argument is a one-layer view of the cache
— a shallow copy whose `layers` is [the block's own layer] — so the blocks' traces are identical and the first
serves all (each block still runs on its own weights and its own cache layer). Outside a compiled block's call
(an eager call of the attention module, `model.layers[3].self_attn.layer_idx`) the real index reads as before.

Applied where each block holds modules with an int `layer_idx` equal to the block's position and a call passes a
cache with one entry in `layers` per block (transformers 5's Cache classes); any other call runs the block as
compiled before (per-block traces), so nothing changes for models this does not fit.
"""
from __future__ import annotations

import copy
import threading

from torch import nn

from . import _compat

_SHARED = {"active": False}  # read by the layer_idx property under Dynamo: a guard on the value, two traces at most
_LOCK = threading.Lock()
_PROPERTY_CLASSES: dict[type, type] = {}
_MISSING = object()


def _layer_idx_class(cls: type) -> type:
    """cls with `layer_idx` a property: 0 inside a shared-trace call, the module's own index elsewhere."""
    with _LOCK:
        if cls not in _PROPERTY_CLASSES:
            def get(self):
                return 0 if _SHARED["active"] else self.__dict__["_qcompile_layer_idx"]

            def set_(self, value):
                self.__dict__["_qcompile_layer_idx"] = value

            _PROPERTY_CLASSES[cls] = type(cls.__name__, (cls,), {"layer_idx": property(get, set_),
                                                                 "__module__": cls.__module__,
                                                                 "__qualname__": cls.__qualname__})
        return _PROPERTY_CLASSES[cls]


def _indexed_modules(block: nn.Module, position: int) -> list[nn.Module]:
    return [m for m in block.modules() if type(m.__dict__.get("layer_idx")) is int
            and m.__dict__["layer_idx"] == position]


def _is_layered_cache(value, blocks: int) -> bool:
    layers = getattr(value, "layers", None)
    return (isinstance(layers, list) and len(layers) == blocks and callable(getattr(value, "update", None))
            and not getattr(value, "offloading", False))


def _call_with_view(compiled, position: int, blocks: int):
    def call(*args, **kwargs):
        names = [k for k, v in kwargs.items() if _is_layered_cache(v, blocks)]
        if len(names) != 1:  # no cache (a prompt without one), or not a per-layer one: the block's own trace
            return compiled(*args, **kwargs)
        cache = kwargs[names[0]]
        view = copy.copy(cache)
        view.layers = [cache.layers[position]]
        before = dict(vars(view))
        _SHARED["active"] = True
        try:
            return compiled(*args, **{**kwargs, names[0]: view})
        finally:
            _SHARED["active"] = False
            for name, value in vars(view).items():  # an attribute the cache rebound (a counter): back on the cache
                if name != "layers" and before.get(name, _MISSING) is not value:
                    setattr(cache, name, value)
    call.__wrapped__ = compiled
    return call


def share_block_traces(blocks: list[nn.Module]) -> bool:
    """After each block was compiled (Module.compile): make one trace serve them all where they differ only by
    their `layer_idx` (module docstring). Returns whether it applied."""
    indexed = [_indexed_modules(block, position) for position, block in enumerate(blocks)]
    if len(blocks) < 2 or not all(indexed):
        return False
    for position, (block, modules) in enumerate(zip(blocks, indexed)):
        for module in modules:
            index = module.__dict__.pop("layer_idx")
            module.__class__ = _layer_idx_class(type(module))
            module.layer_idx = index
        compiled = _compat.compiled_call(block)
        if compiled is None:
            raise RuntimeError(f"share_block_traces: block {position} ({type(block).__name__}) is not compiled")
        _compat.set_compiled_call(block, _call_with_view(compiled, position, len(blocks)))
    return True
