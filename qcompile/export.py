"""AOTInductor export of a quantized model: the backend's pass on a torch.export program, packaged by AOTInductor.

    path = qcompile.export(model, args, options={...}, dynamic_shapes=..., package_path="m.pt2")
    f = torch._inductor.aoti_load_package(path)   # any process with torch; qcompile not needed

The exported program's parameters are placeholders; the pass rewrites the linears exactly as the backend does,
the quantized tensors become the program's buffers (so the package stores them at quantized size), the float
weights they replace leave the program, and the device lowering runs before AOTInductor compiles.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from .backend import device_of, laid_out_constants, quantized_weights
from .options import QuantOptions
from .passes.lower import constant_layouts, lower_for_device
from .passes.quantize_linears import quantize_linears
from .passes.records import PassResult, WeightRef

CONSTANT_PREFIX = "qcompile"


def quantize_exported_program(ep: ExportedProgram, options: QuantOptions) -> tuple[ExportedProgram, PassResult]:
    """A new ExportedProgram with `ep`'s linears rewritten; the quantized tensors become persistent buffers
    `qcompile.<placeholder name>`, the consumed float weights are dropped from the program. `ep` stays usable: the
    pass rewrites a copy of its graph (the copy holds no weights: they are the program's lifted inputs)."""
    gm = copy.deepcopy(ep.graph_module)
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    weight_kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    weights = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        spec = specs[node.name]
        if spec.kind in weight_kinds:
            tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            weights[node] = WeightRef(name=spec.target, tensor=tensor)
    result = quantize_linears(gm, weights, options, lambda uses: quantized_weights(uses, options))

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    constant_values = dict(result.constants)
    first_user_input = next((n for n in placeholders if n.name in specs and specs[n.name].kind == InputKind.USER_INPUT),
                            None)
    for node in placeholders:
        if node.name in constant_values and first_user_input is not None:
            first_user_input.prepend(node)  # the signature lists parameters and buffers before user inputs
        elif node.name not in constant_values and node in weights and not node.users:
            gm.graph.erase_node(node)  # a float weight the quantized graph no longer reads
    lower_for_device(gm, device_of([*ep.state_dict.values(), *ep.constants.values()]), options)
    # e.g. CPU kernels' interleaved rows (held so in the weight cache too); the result reports what the program reads
    result.constants[:] = laid_out_constants(constant_layouts(gm), result.constants)
    constant_values = dict(result.constants)

    state_dict = dict(ep.state_dict)
    constants = dict(ep.constants)
    new_specs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in constant_values:
            target = f"{CONSTANT_PREFIX}.{node.name}"
            state_dict[target] = constant_values[node.name]
            new_specs.append(InputSpec(InputKind.BUFFER, TensorArgument(name=node.name), target, persistent=True))
        else:
            new_specs.append(specs[node.name])
    kept_targets = {s.target for s in new_specs if s.target is not None}
    for key in [k for k in state_dict if k not in kept_targets]:
        del state_dict[key]
    for key in [k for k in constants if k not in kept_targets]:
        del constants[key]
    # the pass renamed the nodes that produce outputs: point the output specs at them
    outputs = gm.graph.output_node().args[0]
    output_specs = [dataclasses.replace(spec, arg=TensorArgument(name=node.name))
                    if isinstance(spec.arg, TensorArgument) else spec
                    for spec, node in zip(ep.graph_signature.output_specs, outputs)]
    signature = ExportGraphSignature(input_specs=new_specs, output_specs=output_specs)
    gm.recompile()
    new_ep = ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
                             range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
                             example_inputs=ep.example_inputs, constants=constants,
                             # the program's own IR (torch.export's default keeps in-place ops such as a static
                             # KV cache's copy_; the default verifier here would reject them)
                             verifiers=ep.verifiers)
    return new_ep, result


def export(model: torch.nn.Module, args: tuple, options: dict[str, Any], kwargs: dict | None = None,
           dynamic_shapes: Any = None, package_path: str | os.PathLike = "model.pt2") -> str:
    """Export `model`, quantize it with `options` as the backend would, and write an AOTInductor package.
    Returns the package path. The model's parameters are not modified."""
    opts = QuantOptions.from_dict(options)
    if not isinstance(args, tuple):
        raise ValueError(f"qcompile.export: args must be a tuple of example inputs, got {type(args).__name__}")
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch.export's own message says which line; add what to change
        raise RuntimeError(
            f"qcompile.export: torch.export could not capture {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Export needs one graph: remove data-dependent Python "
            f"control flow (use torch.cond), avoid .item()/.tolist() on tensors, and mark dynamic dimensions with "
            f"dynamic_shapes=(...) using torch.export.Dim; torch.compile(backend='qcompile') has no such limits."
        ) from e
    quantized_ep, _ = quantize_exported_program(ep, opts)
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(quantized_ep, package_path=os.fspath(package_path))
