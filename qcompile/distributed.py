"""Tensor-parallel graphs: Dynamo graphs of a model sharded by `parallelize_module` (DTensor parameters, the
DeviceMesh as an opaque input), brought down to the plain local shards the linear pass and Inductor work on.

The aten trace runs over the local tensors: each DTensor input is rebuilt around its local shard inside the
traced function, so DTensor's own dispatch turns every op into local aten ops plus the functional collectives
it emits (`_c10d_functional.all_reduce` + `wait_tensor`), exactly as AOTAutograd's subclass desugaring does.
The pass then sees a column-parallel linear as an [N/tp, K] weight and a row-parallel one as [N, K/tp], and
quantizes each rank's shard; a group of K values never straddles two ranks (`LocalSignature.check_shard_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule

from . import _compat
from .options import QuantOptions
from .passes.match_linear import match_linear
from .passes.records import WeightRef


@dataclass(frozen=True)
class _Input:
    kind: str  # "tensor": passed as is; "dtensor": its local shard is passed; "constant": bound at trace time
    value: object = None  # "constant": the object (the DeviceMesh); "dtensor": the fake DTensor Dynamo traced


class LocalSignature:
    """How one Dynamo graph's inputs map onto the inputs of its local-shard aten graph, and back for outputs.

    Dynamo input i is, in the aten graph: a plain tensor or SymInt (unchanged), a DTensor's local shard, or
    nothing (an opaque object such as the DeviceMesh, bound into the graph as a constant: the collectives
    name their process group)."""

    def __init__(self, inputs: list[_Input]):
        self.inputs = inputs
        self.flat_position = {}  # Dynamo input position -> aten graph input position
        for i, entry in enumerate(inputs):
            if entry.kind != "constant":
                self.flat_position[i] = len(self.flat_position)
        self._constants = [(i, entry.value) for i, entry in enumerate(inputs) if entry.kind == "constant"]
        # per Dynamo input: True = pass its local shard, False = pass it as is, None = not an input of ours
        self._dtensor_flags = [None if entry.kind == "constant" else entry.kind == "dtensor" for entry in inputs]
        self._output_rebuilds: list[Callable | None] | None = None  # set when traced
        self._dtensor_of_shard: dict[int, torch.Tensor] = {}  # id(local shard) -> its DTensor parameter

    @classmethod
    def of(cls, example_inputs: list, fake_inputs: list) -> "LocalSignature | None":
        """The signature of a graph with DTensor or opaque inputs; None for a graph of plain tensors."""
        inputs = []
        for real, fake in zip(example_inputs, fake_inputs):
            if _compat.is_dtensor(real):
                inputs.append(_Input("dtensor", fake))
            elif _compat.is_opaque_object(real):
                inputs.append(_Input("constant", real))
            else:
                inputs.append(_Input("tensor"))
        if all(entry.kind == "tensor" for entry in inputs):
            return None
        return cls(inputs)

    def flatten(self, args) -> list:
        """Dynamo's call arguments as the aten graph's inputs (DTensors -> local shards, mesh dropped). Called
        once per step of the compiled model: one pass, no per-input function calls beyond the shard lookup."""
        for i, expected in self._constants:
            if args[i] is not expected and args[i] != expected:
                raise RuntimeError(f"qcompile: this graph was compiled for {expected!r}, called with {args[i]!r}; "
                                   f"its collectives are bound to the first one's process group")
        local = _compat.dtensor_local
        return [local(arg) if is_dtensor else arg for arg, is_dtensor in zip(args, self._dtensor_flags)
                if is_dtensor is not None]

    def fake_inputs(self, fake_args: list) -> list:
        return [_compat.dtensor_local(fake) if entry.kind == "dtensor" else fake
                for fake, entry in zip(fake_args, self.inputs) if entry.kind != "constant"]

    def traced(self, run: Callable) -> Callable:
        """`run` (over Dynamo's inputs) as a function over the local inputs, for make_fx: DTensors are rebuilt
        around the traced local shards, DTensor outputs are returned as their local shards (rewrapped by
        `wrap_outputs` at run time)."""
        rebuilds = [_compat.dtensor_rebuilder(entry.value) if entry.kind == "dtensor" else None
                    for entry in self.inputs]

        def run_local(*flat):
            args = []
            for i, entry in enumerate(self.inputs):
                if entry.kind == "constant":
                    args.append(entry.value)
                else:
                    value = flat[self.flat_position[i]]
                    args.append(rebuilds[i](value) if rebuilds[i] is not None else value)
            outputs = run(*args)
            # a DTensor output leaves as its local shard, followed at the end by its global size and stride
            # (SymInts where shapes are dynamic: the compiled graph computes them) for `wrap_outputs`
            self._output_rebuilds = [_compat.dtensor_rebuilder(o) if _compat.is_dtensor(o) else None
                                     for o in outputs]
            shapes = [v for o in outputs if _compat.is_dtensor(o) for v in (*o.size(), *o.stride())]
            return [_compat.dtensor_local(o) if _compat.is_dtensor(o) else o for o in outputs] + shapes

        return run_local

    def wrap_outputs(self, outputs):
        """The compiled graph's outputs as Dynamo's graph returns them: DTensors rebuilt around local shards."""
        if self._output_rebuilds is None or not any(self._output_rebuilds):
            return outputs
        n = len(self._output_rebuilds)
        shapes = iter(outputs[n:])
        wrapped = []
        for output, rebuild in zip(outputs[:n], self._output_rebuilds):
            if rebuild is not None:
                size = [next(shapes) for _ in range(output.dim())]
                output = rebuild(output, torch.Size(size), tuple(next(shapes) for _ in range(output.dim())))
            wrapped.append(output)
        return type(outputs)(wrapped)

    def local_weights(self, weights: dict[int, WeightRef]) -> dict[int, WeightRef]:
        """Weights by Dynamo position -> by aten input position, a DTensor parameter as its local shard."""
        local = {}
        for i, ref in weights.items():
            if i in self.flat_position:
                tensor = ref.tensor
                if _compat.is_dtensor(tensor):
                    tensor = _compat.dtensor_local(ref.tensor)
                    self._dtensor_of_shard[id(tensor)] = ref.tensor
                local[self.flat_position[i]] = WeightRef(name=ref.name, tensor=tensor)
        return local

    def check_shard_groups(self, aten_gm: GraphModule, weights: dict, options: QuantOptions) -> None:
        """Refuse a linear whose weight is sharded along K (row-parallel) at a point that is not a group
        boundary: every shard of K, on every rank, must start at and hold a multiple of the scheme's group size,
        so that each rank's groups are exactly the single-process model's groups. `weights`: aten placeholder ->
        WeightRef (from `local_weights`). Every rank checks all shards, so all ranks fail together instead of
        one waiting in a collective for another that raised."""
        scheme = options.scheme_def
        group = options.group_size if scheme.group_sizes else (scheme.k_multiple if scheme.k_multiple > 1 else None)
        if group is None:  # row- or tensor-wide scales: on a K shard they cover that rank's part of the row
            return
        for node in aten_gm.graph.nodes:
            match = match_linear(node, lambda n: n in weights)
            if match is None:
                continue
            ref = weights[match.weight]
            param = self._dtensor_of_shard.get(id(ref.tensor))
            if param is None or not options.selects(ref.name.rsplit(".", 1)[0]):
                continue
            k_dim = 1 if match.weight_is_nk else 0
            ranges = _compat.shard_ranges(param, k_dim)
            bad = [(start, stop) for start, stop in ranges if start % group or (stop - start) % group]
            if bad:
                fits = [g for g in scheme.group_sizes if all(a % g == 0 and (b - a) % g == 0 for a, b in ranges)]
                hint = (f"group_size {'/'.join(map(str, fits))} would fit" if fits else
                        f"shard K in multiples of {group}")
                raise ValueError(
                    f"qcompile: linear weight {ref.name!r} {tuple(param.shape)} is sharded along in_features "
                    f"(placements {tuple(param.placements)}); its shard K[{bad[0][0]}:{bad[0][1]}] of "
                    f"K={param.shape[k_dim]} does not hold whole groups of {group} for scheme {scheme.name!r}, so a "
                    f"group would straddle two ranks ({hint}, or exclude the layer)")

