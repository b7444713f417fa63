"""StepGraphs: a model's call replayed as one CUDA graph per call signature (qcompile/step_graphs.py)."""
import pytest
import torch

from qcompile.step_graphs import StepGraphs, signature


class _Cache:
    """A static KV cache as transformers keeps one: tensors written in place and a position counter on device."""

    def __init__(self, device="cpu"):
        self.layers = [{"keys": torch.zeros(4, 8, device=device)}]
        self.position = torch.zeros((), dtype=torch.long, device=device)


def test_a_signature_is_the_structure_of_a_call_not_its_values():
    cache = _Cache()
    key, positions = signature((torch.ones(1, 3),), {"cache": cache, "use_cache": True, "mask": torch.ones(1, 1, 8)})
    same, _ = signature((torch.zeros(1, 3),), {"cache": cache, "use_cache": True, "mask": torch.zeros(1, 1, 8)})
    assert key == same and positions == [0, 3]  # the tensors' values are copied in, not part of the key
    nested, nested_positions = signature(((torch.ones(1, 3),),), {"cache": cache, "use_cache": True,
                                                                  "mask": torch.ones(1, 1, 8)})
    assert nested != key and nested_positions == [0, 3]  # a nested argument: pytree's structure, same leaves
    assert signature((torch.ones(1, 4),), {"cache": cache, "use_cache": True, "mask": torch.ones(1, 1, 8)})[0] != key
    assert signature((torch.ones(1, 3),), {"cache": cache, "use_cache": False, "mask": torch.ones(1, 1, 8)})[0] != key
    assert signature((torch.ones(1, 3).long(),), {"cache": cache, "use_cache": True,
                                                  "mask": torch.ones(1, 1, 8)})[0] != key
    assert signature((torch.ones(1, 3),), {"cache": _Cache(), "use_cache": True, "mask": torch.ones(1, 1, 8)})[0] != key
    cache.layers[0]["keys"] = torch.zeros(4, 8)  # re-allocated in place of the old: the graph would write the old
    key = signature((torch.ones(1, 3),), {"cache": cache, "use_cache": True, "mask": torch.ones(1, 1, 8)})[0]
    assert key != same
    cache.layers.append({"keys": torch.zeros(2)})  # a layer added: its tensor too
    assert signature((torch.ones(1, 3),), {"cache": cache, "use_cache": True, "mask": torch.ones(1, 1, 8)})[0] != key


def test_an_objects_tensors_are_walked_again_only_when_its_containers_changed():
    """The walk's result is remembered per object (_Holdings) while the identities of every container's items
    stay the same; a held tensor given new storage in place still changes the signature (its address is read every
    call)."""
    from qcompile import step_graphs

    cache = _Cache()
    signature((), {"cache": cache})
    tensors = step_graphs._HOLDINGS[id(cache)].tensors
    key = signature((), {"cache": cache})[0]
    assert step_graphs._HOLDINGS[id(cache)].tensors is tensors
    cache.position.set_(torch.zeros(3, dtype=torch.long))
    assert signature((), {"cache": cache})[0] != key and step_graphs._HOLDINGS[id(cache)].tensors is tensors
    cache.position = torch.zeros((), dtype=torch.long)
    assert step_graphs._holdings(cache)[1] is cache.position
    address = id(cache)
    del cache
    assert address not in step_graphs._HOLDINGS  # forgotten with its object


def test_held_tensors_are_found_through_objects_lists_and_dicts_once_each_in_order():
    """What a signature keys an object argument on: every tensor within four levels, depth first, a tensor
    reached twice listed once, plain values and modules skipped; a lazily allocated tensor (transformers'
    StaticLayer sets its keys on the first update) changes the signature."""
    from qcompile.step_graphs import _held_tensors

    class Layer:
        def __init__(self):
            self.keys = None
            self.length = torch.zeros(())
            self.size, self.name = 4, "layer"

    shared = torch.ones(2)
    cache = _Cache()
    cache.extra = (shared, {"again": shared, "module": torch.nn.Linear(2, 2)}, [[[[torch.ones(1)]]]])
    cache.lazy = Layer()
    held = _held_tensors(cache)
    assert [id(t) for t in held] == [id(t) for t in (cache.layers[0]["keys"], cache.position, shared,
                                                     cache.lazy.length)]  # the 5-deep tensor and the module not
    before = signature((), {"cache": cache})[0]
    cache.lazy.keys = torch.zeros(3)
    assert any(t is cache.lazy.keys for t in _held_tensors(cache)) and signature((), {"cache": cache})[0] != before


def test_cpu_and_grad_calls_run_eagerly():
    calls = []
    steps = StepGraphs(lambda x: calls.append(1) or x * 2)
    for _ in range(3):
        assert torch.equal(steps(torch.ones(2)), torch.full((2,), 2.0))
    assert (len(calls), steps.eager_calls, steps.captures) == (3, 3, 0)


@pytest.mark.gpu
def test_a_step_with_side_effects_replays_once_per_call():
    """Each call writes the cache at its position and advances it, as a decode step does: replayed calls do it
    exactly once each (the captured call too), with the inputs of that call, and return its outputs."""
    cache = _Cache("cuda")
    weight = torch.randn(8, 8, device="cuda")

    def step(x, cache):
        y = torch.tanh(x @ weight)
        cache.layers[0]["keys"].index_copy_(0, cache.position.view(1), y)
        cache.position.add_(1)
        return {"out": y.sum(-1), "cache": cache}

    steps = StepGraphs(step)
    inputs = [torch.randn(1, 8, device="cuda") for _ in range(4)]
    with torch.no_grad():
        outs = [steps(x, cache)["out"].clone() for x in inputs]
    expected = [torch.tanh(x @ weight) for x in inputs]
    assert (steps.eager_calls, steps.captures, steps.replays) == (1, 1, 3)
    assert int(cache.position) == 4
    torch.testing.assert_close(cache.layers[0]["keys"], torch.cat(expected))
    torch.testing.assert_close(torch.stack(outs), torch.stack([e.sum(-1) for e in expected]))


@pytest.mark.gpu
def test_a_call_that_syncs_with_the_host_stays_eager_with_a_warning_naming_where():
    steps = StepGraphs(lambda x: x * float(x.sum()))
    x = torch.ones(3, device="cuda")
    with torch.no_grad(), pytest.warns(UserWarning, match=r"could not be captured as a CUDA graph \(it synchronizes "
                                                           r"with the host at .*test_step_graphs.py"):
        for _ in range(3):
            torch.testing.assert_close(steps(x), x * 3)
    assert steps.captures == 0 and steps.eager_calls == 3


@pytest.mark.gpu
def test_a_failed_capture_leaves_nothing_behind():
    """A call that only fails inside the capture (an explicit device sync): its signature stays eager, and random
    ops, the allocator and another capture still work."""
    def step(x):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return x * 2

    steps = StepGraphs(step)
    x = torch.ones(3, device="cuda")
    with torch.no_grad():
        steps(x)
        with pytest.warns(UserWarning, match="could not be captured as a CUDA graph"):
            torch.testing.assert_close(steps(x), x * 2)
        torch.testing.assert_close(steps(x), x * 2)
    assert steps.captures == 0 and steps.eager_calls == 3
    assert torch.randn(4, device="cuda").isfinite().all()
    again = StepGraphs(lambda x: x * 2)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(again(x), x * 2)
    assert again.captures == 1


_STATE = {"shifted": False}  # Python state a compiled function guards on (as on a cache's flags)


@pytest.mark.gpu
def test_a_call_that_compiled_is_not_the_one_captured():
    """Captured is only the call after an eager call that compiled nothing: a recompile inside a capture (a guard
    on state the previous call changed) would record the compile's own GPU work, or void the capture."""
    compiled = torch.compile(lambda x: x * 2 + (3 if _STATE["shifted"] else 1), backend="inductor", dynamic=False)

    def step(x):
        out = compiled(x)
        _STATE["shifted"] = True  # the first call's guard fails on the second: it recompiles
        return out

    steps = StepGraphs(step)
    x = torch.randn(4, device="cuda")
    with torch.no_grad():
        outs = [steps(x).clone() for _ in range(5)]
    torch.testing.assert_close(outs[0], x * 2 + 1)
    for out in outs[1:]:
        torch.testing.assert_close(out, x * 2 + 3)
    assert (steps.eager_calls, steps.captures, steps.replays) == (3, 1, 2)
