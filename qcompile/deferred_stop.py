"""generate() without a host sync per decode step: transformers' own DeferredStopCheck, enabled on CUDA for models
whose decode step is one CUDA graph (compile_blocks with cudagraphs).

generate() reads `unfinished_sequences.max() == 0` on the host after every step: the host waits for the step's
GPU work, then prepares the next step (inputs, masks, the graph's input copies) while the GPU idles — ~1 ms a step
on the device's host against a 3.6 ms int4 8B step (session 15/16 profiles). transformers has the fix,
`DeferredStopCheck` (the flag copied asynchronously and read one step late, so the host queues step n + 1 while
the GPU runs step n; a stop that only the device knows, an EOS, costs one extra forward that generate() undoes),
but enables it on mps only ("we should enable it for cuda if we observe perf gains"). For a model installed here,
generate() runs with it on CUDA where transformers' own safety rule holds — no cache, a croppable one, or one not
handed back — and also for a cache of plain StaticLayers (full attention) handed back, which transformers 5.17
cannot crop: there a rolled-back step is its `cumulative_length` one lower, the slot it wrote lying past the cache's
length, hidden by every mask and overwritten by the next step (transformers 5.2x's own StaticLayer.crop does the
same). Stops at max_length are decided on the host: no extra step.
Everywhere else (other devices, other models, other caches) generate() behaves exactly as transformers ships it.
"""
from __future__ import annotations

import contextvars
import functools

import torch
from torch import nn

# the device types generate() defers on, set for the duration of an installed model's generate() call
_DEFER_ON: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcompile_defer_on", default=())


def _plain_static_cache(cache) -> bool:
    """Every layer is transformers' StaticLayer itself (full attention; no sliding window), holding its length as a
    tensor — what the rollback in finish() decrements."""
    from transformers.cache_utils import StaticLayer
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is StaticLayer and isinstance(getattr(layer, "cumulative_length", None),
                                                                         torch.Tensor) for layer in layers)


@functools.cache
def _deferred_stop_check() -> type | None:
    """transformers' DeferredStopCheck replaced, once, by a subclass that also defers inside an installed model's
    generate() on the device types it names (and otherwise decides as transformers does); None where this
    transformers has no DeferredStopCheck (before 5.17) — generate() then syncs per step, as it always did."""
    try:
        from transformers.generation import utils as generation_utils
    except ImportError:
        return None
    base = getattr(generation_utils, "DeferredStopCheck", None)
    if base is None or not isinstance(base.__dict__.get("is_supported"), staticmethod):
        return None

    class QcompileDeferredStopCheck(base):
        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            if torch.device(device).type in _DEFER_ON.get() and not is_assistant:
                return (cache is None or cache.is_croppable or not cache_is_returned
                        or _plain_static_cache(cache))
            return base.is_supported(device, cache, cache_is_returned, is_assistant)

        def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
            # a plain static cache handed back: rolled back here (finish), not through crop(), which it lacks
            self.static_cache = (cache if cache is not None and cache_is_returned and not cache.is_croppable
                                 and _plain_static_cache(cache) else None)
            super().__init__(input_ids, max_length, cache, cache_is_returned and self.static_cache is None, streamer)

        def finish(self) -> int:
            steps_to_undo = super().finish()
            if steps_to_undo and self.static_cache is not None:
                for layer in self.static_cache.layers:
                    layer.cumulative_length.sub_(steps_to_undo)
            return steps_to_undo

    generation_utils.DeferredStopCheck = QcompileDeferredStopCheck
    return QcompileDeferredStopCheck


def install_deferred_stop_check(model: nn.Module, device_types: tuple[str, ...] = ("cuda",)) -> bool:
    """Make `model.generate()` defer its stop check on `device_types` (module docstring); returns whether it
    applies (a transformers model, a transformers with DeferredStopCheck)."""
    generate = getattr(model, "generate", None)
    if generate is None or not hasattr(model, "prepare_inputs_for_generation") or _deferred_stop_check() is None:
        return False
    if getattr(generate, "qcompile_defer_on", None) is not None:
        return True  # installed already

    @functools.wraps(generate)
    def deferred_generate(*args, **kwargs):
        token = _DEFER_ON.set(tuple(device_types))
        try:
            return generate(*args, **kwargs)
        finally:
            _DEFER_ON.reset(token)

    deferred_generate.qcompile_defer_on = tuple(device_types)
    model.generate = deferred_generate
    return True
