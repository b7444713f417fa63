"""A Dynamo graph's structure as a key: equal for graphs that compile to the same thing given the same options.

transformers' decoder layers reach the backend as one Dynamo graph each (Dynamo specializes on `layer_idx`, which
picks the layer's KV-cache slot but appears in no op), identical but for their inputs: an 8B model's per-layer
compile traced, quantized-pass and Inductor-cache-loaded 64 copies of one graph (26 of its 68 s on the H200 in our
backend, 22 s in Inductor's cache loads). The backend compiles the first and binds the others to it, each with its
own quantized weights. What the key holds: every node's op, target and arguments (other nodes by position,
constants by value), the module path it came from (the pass names nodes and applies include/exclude by it), and
every input's tensor metadata, parameter name and static-address mark. Graphs holding what it cannot compare
(attributes, submodules, unhashable constants) get no key and compile on their own.
"""
from __future__ import annotations

import torch
from torch.fx.node import Node, map_aggregate

from . import _compat


class _Unkeyable(Exception):
    pass


def structure_key(gm: torch.fx.GraphModule, example_inputs, weight_names: dict[int, str]) -> tuple | None:
    """The key of `gm` called with `example_inputs`; `weight_names`: input position -> parameter name."""
    position: dict[Node, int] = {}
    parts = []
    try:
        placeholder = 0
        for i, node in enumerate(gm.graph.nodes):
            position[node] = i
            if node.op == "placeholder":
                parts.append(("input", _input_key(example_inputs[placeholder]), weight_names.get(placeholder)))
                placeholder += 1
            elif node.op in ("call_function", "call_method", "output"):
                stack = tuple(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
                parts.append((node.op, _hashable(node.target), _arguments(node.args, position),
                              _arguments(node.kwargs, position), stack))
            else:  # get_attr / call_module: state of the graph module the key cannot see
                return None
        return tuple(parts)
    except _Unkeyable:
        return None


def _input_key(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", type(value), tuple(value.shape), tuple(value.stride()), value.dtype, value.device,
                value.requires_grad, isinstance(value, torch.nn.Parameter), _compat.is_static_address(value))
    if isinstance(value, (int, float, bool)) or isinstance(value, torch.SymInt):
        return ("scalar", type(value).__name__, str(value))
    raise _Unkeyable


def _arguments(args, position: dict[Node, int]):
    def key(a):
        if isinstance(a, Node):
            return ("node", position[a])
        return (type(a).__name__, _hashable(a))  # typed: 1, 1.0 and True hash alike but promote differently
    return _freeze(map_aggregate(args, key))


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    return value


def _hashable(value):
    if isinstance(value, torch.Tensor):
        raise _Unkeyable  # a tensor constant: its values are not in the key
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable from None
    return value
