"""Sibling-linear fusion (passes/fuse_siblings.py): which linears become one, why the others stay apart, and that
a fused graph computes exactly what the unfused one does, for every scheme whose weights concatenate along N.
The graphs run eagerly (no Inductor); one Dynamo capture serves every scheme."""
import pytest
import torch
import torch.nn as nn

from conftest import Siblings, run_pass
from qcompile.backend import WeightBinding, quantize_graph
from qcompile.options import QuantOptions
from qcompile.passes import fuse_siblings
from qcompile.passes.quantize_linears import fused_name

# every scheme whose weight format has no tensor-wide parameter (group / row scales only)
FUSING = [{"scheme": "int8_weight_only"}, {"scheme": "int8_dynamic"}, {"scheme": "float8_weight_only"},
          {"scheme": "float8_dynamic"}, {"scheme": "int4_weight_only", "group_size": 32},
          {"scheme": "intx_weight_only", "bits": 3}, {"scheme": "int8_dynamic_intx", "bits": 4},
          {"scheme": "int8_dynamic_int4"}, {"scheme": "float8_dynamic_int4", "group_size": 64}, {"scheme": "mxfp8"}]
EXPECTED_GROUPS = {"{q,k,v}": ["q", "k", "v"], "{gate,up}": ["gate", "up"]}


def capture(model, *args):
    """The Dynamo graph of `model(*args)` and its example inputs."""
    graphs = []

    def backend(gm, example_inputs, **_):
        sources = {n: n.meta["grapharg"] for n in gm.graph.nodes if "grapharg" in n.meta}
        graphs.append((gm, list(example_inputs), sources))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    ((gm, example_inputs, sources),) = graphs
    for node, grapharg in sources.items():  # Dynamo drops them once the backend returns; the pass names weights by them
        node.meta["grapharg"] = grapharg
    return gm, example_inputs


@pytest.fixture(scope="module")
def siblings():
    torch.manual_seed(0)
    model = Siblings()
    return model, capture(model, torch.randn(4, 64))


def run(graph, options, inputs=None):
    """The pass on a captured graph, run eagerly on its example inputs (or `inputs`, same order)."""
    gm, example_inputs = graph
    result, weights, kept = quantize_graph(gm, example_inputs,
                                           QuantOptions.from_dict({**options, "keep_float_weights": True}))
    with torch.no_grad():
        out = result.gm(*[(inputs or example_inputs)[i] for i in kept], *[t for _, t in result.constants])
    return out, result, weights, kept


def constants_by_weight(result) -> dict:
    """{weight name (or fused siblings' name): {role: tensor}}"""
    tensors, found = dict(result.constants), {}
    for n in result.gm.graph.nodes:
        if n.op == "placeholder" and "qcompile" in n.meta:
            found.setdefault(n.meta["qcompile"]["weight"], {})[n.meta["qcompile"]["role"]] = tensors[n.name]
    return found


@pytest.mark.parametrize("options", FUSING, ids=lambda o: "-".join(map(str, o.values())))
def test_fused_siblings_compute_exactly_the_separate_linears(siblings, options):
    _, graph = siblings
    separate, unfused, _, _ = run(graph, {**options, "fuse_siblings": False})
    fused_out, fused, _, _ = run(graph, options)
    assert unfused.fused == {} and fused.fused == EXPECTED_GROUPS
    assert all(r.not_fused is None for r in fused.linears)
    for a, b in zip(fused_out, separate):
        assert torch.equal(a, b)  # same quantized values, same activation quantization: bit-exact
    # the fused tensors are the members' own, concatenated along N
    members = constants_by_weight(unfused)
    for group, fused_tensors in constants_by_weight(fused).items():
        if group.startswith("{"):
            parts = [members[f"{m}.weight"] for m in EXPECTED_GROUPS[group.removesuffix(".weight")]]
            for role, tensor in fused_tensors.items():
                assert torch.equal(tensor, torch.cat([p[role] for p in parts])), f"{group} {role}"


@pytest.mark.parametrize("options", [{"scheme": "float8_dynamic", "granularity": "tensor"}, {"scheme": "nvfp4"},
                                     {"scheme": "codebook"}], ids=lambda o: "-".join(map(str, o.values())))
def test_tensor_wide_weight_parameters_do_not_fuse(siblings, options):
    _, graph = siblings
    _, result, _, _ = run(graph, options)
    assert result.fused == {}
    reasons = {r.module: r.not_fused for r in result.linears}
    assert reasons.pop("down") is None  # it has no sibling
    assert all(reason.startswith("tensor-wide parameters: ") and options["scheme"] in reason
               for reason in reasons.values()), reasons


class Apart(nn.Module):
    """a and b read x and fuse; c reads y (same K, another input); e reads x[:, :32] (another K); d reads x, but
    its output is flattened, which a column slice of a fused output cannot be viewed as."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(64, 16) for _ in range(4))
        self.e = nn.Linear(32, 16)

    def forward(self, x, y):
        return self.a(x) + self.b(x) + self.c(y) + self.e(x[:, :32]), self.d(x).view(-1)


def test_linears_that_cannot_share_one_fused_linear_stay_apart():
    fuse_siblings.COUNTS.clear()
    model = Apart()
    args = (torch.randn(4, 64), torch.randn(4, 64))
    out, (result,) = run_pass(model, args, {"scheme": "int8_weight_only"})
    assert result.fused == {"{a,b}": ["a", "b"]}
    reasons = {r.module: r.not_fused for r in result.linears}
    assert reasons["d"].startswith("output view: ") and reasons["c"] is None and reasons["e"] is None
    assert fuse_siblings.COUNTS["fused groups"] == 1 and fuse_siblings.COUNTS["not fused/output view"] == 1
    separate, _ = run_pass(model, args, {"scheme": "int8_weight_only", "fuse_siblings": False})
    assert all(torch.equal(a, b) for a, b in zip(out, separate))


def test_instances_sharing_one_graph_get_their_own_fused_tensors(siblings):
    """The backend's WeightBinding feeds another instance of the module class (its weights arrive as the graph's
    inputs) the fused tensors of its own weights."""
    _, graph = siblings
    other = Siblings()
    _, result, weights, kept = run(graph, FUSING[1])
    inputs = list(graph[1])
    for i, ref in weights.items():
        inputs[i] = other.get_parameter(ref.name)
    x = next(t for i, t in enumerate(inputs) if i not in weights)
    options = QuantOptions.from_dict({**FUSING[1], "keep_float_weights": True})
    binding = WeightBinding(result, weights, [t for _, t in result.constants], options, sources={})
    with torch.no_grad():
        (out,) = result.gm(*[inputs[i] for i in kept], *binding(inputs))
    expected, _ = run_pass(other, (x,), {**FUSING[1], "fuse_siblings": False})
    assert torch.equal(out, expected)


def test_fused_names_keep_the_common_path():
    assert fused_name(["layers.0.attn.q_proj", "layers.0.attn.k_proj"]) == "layers.0.attn.{q_proj,k_proj}"
    assert fused_name(["a.q.weight", "a.k.weight"]) == "a.{q,k}.weight"
    assert fused_name(["q", "k", "v"]) == "{q,k,v}"


def test_the_option_is_validated():
    assert QuantOptions.from_dict({"scheme": "int8_dynamic"}).fuse_siblings
    with pytest.raises(ValueError, match="'fuse_siblings' must be True or False"):
        QuantOptions.from_dict({"scheme": "int8_dynamic", "fuse_siblings": "no"})


def test_the_cache_holds_one_copy_of_fused_tensors(siblings):
    """Each member's cache entry becomes its rows of the fused tensors (views), so a later unfused graph finds
    them quantized and memory holds the fused copy only."""
    from qcompile import backend

    model, graph = siblings
    options = {"scheme": "int4_weight_only", "group_size": 64}
    _, result, _, _ = run(graph, options)
    fused = constants_by_weight(result)[fused_name([f"{m}.weight" for m in ("q", "k", "v")])]
    key = backend._cache_key(model.k.weight, QuantOptions.from_dict(options), None, True)
    member = backend._QUANTIZED[model.k.weight][key]
    for role, tensor in member.items():
        assert tensor.untyped_storage().data_ptr() == fused[role].untyped_storage().data_ptr(), role
        assert torch.equal(tensor, fused[role][64:96])  # k's rows, after q's 64


def test_exported_programs_fuse_the_same_way():
    from qcompile.export import quantize_exported_program

    model, x = Siblings(), torch.randn(3, 5, 64)
    outputs = []
    for fuse in (True, False):
        options = QuantOptions.from_dict({"scheme": "int8_dynamic", "fuse_siblings": fuse, "keep_float_weights": True})
        program, result = quantize_exported_program(torch.export.export(model, (x,)), options)
        assert result.fused == (EXPECTED_GROUPS if fuse else {})
        outputs.append(program.module()(x))
    assert torch.equal(*outputs)
