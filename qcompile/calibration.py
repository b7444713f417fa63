"""Calibration for GPTQ: run the example inputs through a graph's float aten graph (real weights) and collect,
for every matched linear's weight, the statistics of its input X: X^T X and the number of rows.

The example inputs are calls of the compiled callable (a tuple of args or a dict of kwargs). Each Dynamo graph
input is recovered from a call by evaluating its Dynamo source ("L['kwargs']['input_ids']") against the frame's
arguments rebound to that call, so this works for every graph Dynamo makes from the compiled frame (recompiles
for new shapes too); a graph of a resume frame after a graph break has inputs no call names, and is refused.
Statistics are cached per weight tensor and calibration set: each weight is calibrated once, and a tied weight
read by several linears sums their inputs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _compat
from .passes.match_linear import match_linear
from .progress import Progress

# weight tensor -> (the calibration set, InputStats); holding the set keeps its id (in cache keys) unique
_STATS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class InputStats:
    xtx: torch.Tensor  # float32 [K, K], the sum of x^T x over every row x that reached the linear
    rows: int

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / n."""
        return self.xtx * (2.0 / max(self.rows, 1))


def weight_hessians(gm: torch.fx.GraphModule, aten_gm: torch.fx.GraphModule, example_inputs, weights: dict,
                    calibration) -> dict[int, torch.Tensor]:
    """{id(weight tensor): Hessian} for every weight a linear of `aten_gm` reads. `weights` maps input position
    to WeightRef (as backend.find_weight_inputs); `gm` is the Dynamo graph `aten_gm` was traced from."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    weight_of = {placeholders[i]: ref for i, ref in weights.items()}
    linears = [m for n in aten_gm.graph.nodes if (m := match_linear(n, lambda x: x in weight_of)) is not None]
    missing = [m for m in linears if _STATS.get(weight_of[m.weight].tensor, (None,))[0] is not calibration]
    if missing:
        stats = collect_input_stats(aten_gm, linears, graph_inputs_for_calls(gm, example_inputs, weights,
                                                                              calibration))
        for weight_node, s in stats.items():
            _STATS[weight_of[weight_node].tensor] = (calibration, s)
    hessians = {}
    for m in linears:
        ref = weight_of[m.weight]
        s = _STATS[ref.tensor][1]
        if s.rows == 0:
            raise ValueError(f"GPTQ: no calibration input reached the linear reading {ref.name!r}; give calibration "
                             f"inputs that run through it, or exclude it (option 'exclude')")
        hessians[id(ref.tensor)] = s.hessian()
    return hessians


def collect_input_stats(aten_gm: torch.fx.GraphModule, linears, calls) -> dict[torch.fx.Node, InputStats]:
    """Run `aten_gm` on each list of graph inputs in `calls`; InputStats per weight placeholder of `linears`."""
    inputs_of: dict[torch.fx.Node, list[torch.fx.Node]] = {}  # weight -> the activations it multiplies
    for m in linears:
        inputs_of.setdefault(m.weight, []).append(m.x)
    by_input: dict[torch.fx.Node, InputStats] = {m.x: InputStats(torch.zeros(()), 0) for m in linears}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in by_input:  # q/k/v projections share one input node: one product for all three
                x = value.detach().reshape(-1, value.shape[-1]).float()
                by_input[n].xtx = by_input[n].xtx + x.T @ x
                by_input[n].rows += x.shape[0]
            return value

    recorder = Recorder(aten_gm)
    progress = Progress(len(calls))
    label = f"inputs: qcompile calibrating {len(linears)} linears"
    progress.show(label)
    with torch.no_grad():
        for args in calls:
            recorder.run(*args)
            progress.advance(label)
    progress.close()
    stats = {}
    for w, xs in inputs_of.items():
        xs = list(dict.fromkeys(xs))
        if len(xs) == 1:
            stats[w] = by_input[xs[0]]
        else:  # a tied weight read by several linears: GPTQ minimises the error over all their inputs
            stats[w] = InputStats(sum(by_input[x].xtx for x in xs), sum(by_input[x].rows for x in xs))
    return stats


def graph_inputs_for_calls(gm: torch.fx.GraphModule, example_inputs, weights: dict, calibration) -> list[list]:
    """For each calibration call, the inputs of Dynamo graph `gm`: weights as compiled, the rest evaluated from
    their Dynamo sources against the frame's arguments rebound to that call."""
    frame = _compat.dynamo_frame()
    if frame is None:
        raise RuntimeError("qcompile: GPTQ calibration runs inside torch.compile's backend call; no Dynamo frame "
                           "is being compiled")
    code, current_locals, frame_globals = frame
    if code.co_name.startswith("torch_dynamo_resume_in_"):
        raise ValueError(f"GPTQ calibration: this graph starts after a graph break ({code.co_name}), so its inputs "
                         f"cannot be derived from the calibration inputs; compile with fullgraph=True to find "
                         f"and remove the break")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    calls = []
    for number, call in enumerate(calibration):
        frame_locals = bind_call(code, current_locals, call)
        inputs = []
        for i, node in enumerate(placeholders):
            if i in weights:
                inputs.append(example_inputs[i])
                continue
            source = _compat.source_name(node)
            try:
                inputs.append(eval(source, {"__builtins__": {}}, {"L": frame_locals, "G": frame_globals}))
            except Exception as e:  # a name the call does not give, or a source we cannot evaluate
                raise ValueError(f"GPTQ calibration: cannot derive graph input {source or node.name!r} from "
                                 f"calibration input {number} ({type(e).__name__}: {e}); the calibration inputs "
                                 f"must be calls of the compiled callable, like the call being compiled") from e
        calls.append(inputs)
    return calls


def bind_call(code, current_locals: dict, call) -> dict:
    """The locals a call of the compiled frame would start with: the leading module arguments (`self`, or the
    module a wrapper receives) as in the current call, then the call's args / kwargs. A parameter the call
    leaves out takes its value from the current call (its default there)."""
    args, kwargs = ((tuple(call), {}) if isinstance(call, (tuple, list)) else
                    ((), dict(call)) if isinstance(call, Mapping) else ((call,), {}))
    n_pos, n_kwonly = code.co_argcount, code.co_kwonlyargcount
    names = list(code.co_varnames[:n_pos])
    kwonly = list(code.co_varnames[n_pos:n_pos + n_kwonly])
    rest = n_pos + n_kwonly
    varargs = code.co_varnames[rest] if code.co_flags & 0x04 else None
    varkw = code.co_varnames[rest + (varargs is not None)] if code.co_flags & 0x08 else None

    current_positional = [current_locals[n] for n in names] + list(current_locals.get(varargs, ()) if varargs else ())
    modules = []
    for value in current_positional:
        if not isinstance(value, torch.nn.Module):
            break
        modules.append(value)
    positional = modules + list(args)
    bound = {n: current_locals[n] for n in names + kwonly if n in current_locals}
    for name, value in zip(names, positional):
        bound[name] = value
    extra = positional[len(names):]
    if extra and varargs is None:
        raise ValueError(f"GPTQ calibration: a calibration input has {len(args)} positional args, more than "
                         f"{code.co_name}() takes")
    if varargs is not None:
        bound[varargs] = tuple(extra)
    if varkw is not None:
        bound[varkw] = {}
    for name, value in kwargs.items():
        if name in names or name in kwonly:
            bound[name] = value
        elif varkw is not None:
            bound[varkw][name] = value
        else:
            raise ValueError(f"GPTQ calibration: {code.co_name}() has no parameter {name!r}")
    return bound

