"""One Dynamo graph as the debugger sees it: the float aten graph, the same graph after the linear pass, and
ways to run a mix of the two — every linear in float, quantized, or fed its float input (teacher forcing).

The pass keeps the names of the nodes it does not replace, and tracing is deterministic, so a node of the
rewritten graph and its twin in a fresh float trace share a name; that is how values cross between them.
"""
from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .. import _compat, released
from ..backend import find_weight_inputs, quantize_graph, released_names
from ..options import QuantOptions
from ..passes.fuse_siblings import activation_key
from ..passes.match_linear import LinearMatch, match_linear
from ..passes.records import LinearRecord, PassResult, WeightRef


@dataclass
class LinearSite:
    """One matched linear: its pass record, its match in the float graph, and (when quantized) the inserted
    nodes of the rewritten graph that compute its output, in graph order."""
    record: LinearRecord
    match: LinearMatch
    weight: WeightRef
    inserted: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # kept nodes the inserted ones read (x, bias)
    x: str = ""  # the input among them that is x (for fused siblings: the first sibling's view of x)
    # float values seen by the recording run, one entry per execution of the graph: {input name: value}
    float_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    float_outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.record.scheme is not None


def readable(gm: GraphModule) -> str:
    """The graph as Python with shapes, without the `;  x = None` frees that make diffs noisy."""
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return "\n".join(re.sub(r";  (\w+ = )+None$", "", line) for line in text.splitlines())


def unified_diff(before: str, after: str) -> str:
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before the pass",
                                          "after the pass", lineterm=""))


class GraphCapture:
    """A Dynamo graph traced to aten twice: `float_gm` untouched, `result.gm` rewritten by the pass."""

    def __init__(self, index: int, float_gm: GraphModule, result: PassResult, weights: dict[int, WeightRef],
                 options: QuantOptions):
        self.index, self.float_gm, self.result, self.options = index, float_gm, result, options
        self.before = readable(float_gm)
        self.after = readable(result.gm)
        self.diff = unified_diff(self.before, self.after)
        self.float_nodes = {n.name: n for n in float_gm.graph.nodes}
        self._constants = dict(result.constants)
        # inserted nodes that read only constants (dequantized weights): computed once, then reused
        self._folded: dict[Node, Any] = {}
        # constant placeholder -> {float weight it quantizes: its share of the rows} (several for fused siblings)
        self.constant_owners = {n.name: _row_shares(n.meta["qcompile"]) for n in result.gm.graph.nodes
                                if n.op == "placeholder" and "qcompile" in n.meta}
        placeholders = [n for n in float_gm.graph.nodes if n.op == "placeholder"]
        weight_nodes = {placeholders[i]: ref for i, ref in weights.items()}
        self.released = released_names(weights.values())  # float weights an earlier compile freed: no float run
        matches = [m for n in float_gm.graph.nodes if (m := match_linear(n, lambda w: w in weight_nodes))]
        if len(matches) != len(result.linears):
            raise RuntimeError(f"qcompile.debug: graph {index}: the float trace has {len(matches)} linears, the "
                               f"pass recorded {len(result.linears)}; the two traces differ")
        after_nodes = {n.name: n for n in result.gm.graph.nodes}
        same_value: dict = {}  # activation_key's memo
        self.sites = []
        for match, record in zip(matches, result.linears):
            ref = weight_nodes[match.weight]
            if ref.name != record.weight:
                raise RuntimeError(f"qcompile.debug: graph {index}: linear {record.module!r} reads {record.weight!r} "
                                   f"in the pass but {ref.name!r} in the float trace")
            site = LinearSite(record, match, ref)
            site.inputs, site.x = [match.x.name], match.x.name
            if site.quantized:
                site.inserted = self._inserted_nodes(after_nodes[record.output_node])
                site.inputs = list(dict.fromkeys(i.name for n in site.inserted for i in n.all_input_nodes
                                                 if i.name in self.float_nodes))
            if site.quantized and record.fused_into is not None:
                key = activation_key(match.x, same_value)
                site.x = next(name for name in site.inputs
                              if activation_key(self.float_nodes[name], same_value) == key)
            self.sites.append(site)
        self.site_of_node = {s.match.node: s for s in self.sites}

    def constant_share(self, constant: str, weight: str) -> float:
        """The part of a constant that holds `weight`: 1 for its own, N_i / N for a fused sibling's rows."""
        return self.constant_owners.get(constant, {}).get(weight, 0.0)

    def _inserted_nodes(self, output: Node) -> list[Node]:
        """The nodes the pass added that `output` depends on; their other inputs exist in the float graph."""
        found, stack = set(), [output]
        while stack:
            n = stack.pop()
            if n in found or n.name in self.float_nodes:
                continue
            found.add(n)
            stack.extend(n.all_input_nodes)
        order = {n: i for i, n in enumerate(output.graph.nodes)}
        return sorted(found, key=order.__getitem__)

    # --- evaluation -------------------------------------------------------------------------------------

    def quantized_linear(self, site: LinearSite, value_of: Callable[[str], Any]) -> torch.Tensor:
        """The linear's quantized output, reading every node the pass kept through `value_of(name)`."""
        env: dict[Node, Any] = {}

        def lookup(n: Node):
            return env[n] if n in env else value_of(n.name)

        for n in site.inserted:
            if n in self._folded:
                env[n] = self._folded[n]
            elif n.op == "placeholder":
                env[n] = self._folded[n] = self._constants[n.name]
            else:
                env[n] = n.target(*map_arg(n.args, lookup), **map_arg(n.kwargs, lookup))
                if all(i in self._folded for i in n.all_input_nodes):
                    self._folded[n] = env[n]
        return env[site.inserted[-1]]

    def effective_weight(self, site: LinearSite) -> torch.Tensor:
        """The [N, K] weight the quantized linear applies: its output for the identity as input and no bias.
        Exact for every activation format here: a one-hot row quantizes without error. Needs a recorded call."""
        values = dict(site.float_inputs[0])
        x = values[site.x]
        values[site.x] = torch.eye(site.record.in_features, dtype=x.dtype, device=x.device)
        if site.record.fused_into is not None:  # the fused siblings' biases, concatenated: all zero
            for name in site.inputs:
                if name != site.x and isinstance(values[name], torch.Tensor):
                    values[name] = torch.zeros_like(values[name])
        elif site.match.bias is not None:
            values[site.match.bias.name] = None
        return self.quantized_linear(site, values.__getitem__).t()

    def float_weight(self, site: LinearSite) -> torch.Tensor:
        w = site.weight.tensor.detach()
        w = w if site.match.weight_is_nk else w.t()
        return w.to(site.match.cast_dtype) if site.match.cast_dtype is not None else w

    def run(self, args, quantized: Callable[[LinearSite], bool], record: bool = False):
        """Run the float graph, replacing the linears `quantized(site)` picks by their quantized form on the
        current (not float) input. record=True keeps each linear's input and output on its site."""
        if self.released:
            raise released.float_weights_released("running the float graph (qcompile.diff, QCOMPILE_DEBUG)",
                                                  self.released)
        return _MixedInterpreter(self, quantized, record).run(*args)


class _MixedInterpreter(torch.fx.Interpreter):
    def __init__(self, capture: GraphCapture, quantized: Callable[[LinearSite], bool], record: bool):
        super().__init__(capture.float_gm, garbage_collect_values=False)
        self.capture, self.quantized, self.record = capture, quantized, record

    def run_node(self, n: Node):
        site = self.capture.site_of_node.get(n)
        if site is not None and site.quantized and self.quantized(site):
            nodes = self.capture.float_nodes
            return self.capture.quantized_linear(site, lambda name: self.env[nodes[name]])
        value = super().run_node(n)
        if site is not None and self.record:
            nodes = self.capture.float_nodes
            site.float_inputs.append({name: self.env[nodes[name]] for name in site.inputs})
            site.float_outputs.append(value)
        return value


def _row_shares(meta: dict) -> dict[str, float]:
    members = meta.get("members")
    if not members:
        return {meta["weight"]: 1.0}
    total = sum(members.values())
    return {weight: rows / total for weight, rows in members.items()}


def capture_graph(index: int, gm: GraphModule, example_inputs: list, options: QuantOptions,
                  result: PassResult | None = None) -> GraphCapture:
    """Trace `gm` (a Dynamo graph) to aten and, unless the caller already has it, run the pass on a second
    trace as the backend does (the quantized weights come from the backend's cache)."""
    fake_args = [_compat.dynamo_example_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    float_gm = _compat.trace_to_aten(gm, fake_args)
    if result is None:
        with warnings.catch_warnings():  # the report lists the linears left in float, and why
            warnings.filterwarnings("ignore", message="qcompile: linear")
            result, _, _ = quantize_graph(gm, example_inputs, options)
    return GraphCapture(index, float_gm, result, find_weight_inputs(gm, example_inputs), options)


class CapturingBackend:
    """A torch.compile backend that captures each graph and runs it eagerly in the mode set on it:
    `quantized` None = float (and record each linear's float input/output), else a predicate on sites."""

    def __init__(self, options: QuantOptions):
        self.options = options
        self.graphs: list[GraphCapture] = []
        self.quantized: Callable[[LinearSite], bool] | None = None

    def __call__(self, gm: GraphModule, example_inputs, **kwargs):
        capture = capture_graph(len(self.graphs), gm, list(example_inputs), self.options)
        self.graphs.append(capture)

        def run(*args):
            if self.quantized is None:
                return capture.run(args, lambda site: False, record=True)
            return capture.run(args, self.quantized)
        return run
