"""Tensor parallelism on CPU: two gloo processes run a tiny Llama-like model sharded Megatron-style by
`parallelize_module` (q/k/v and gate/up column-parallel, o/down row-parallel), compiled with backend="qcompile";
their output must match the single-process quantized model's."""
import copy
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import qcompile  # noqa: F401
from qcompile.quant.metrics import sqnr_db

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs a torch build with torch.distributed and its gloo backend")
WORLD = 2
# (options, exact): exact where each rank's groups are exactly the single-process model's groups (only the
# all-reduce's summation order differs). Row-wide weight scales of a row-parallel (K-sharded) linear, and
# per-token activation scales, cover each rank's part of K: other roundings, the same accuracy.
SCHEMES = [
    ({"scheme": "int4_weight_only", "group_size": 32}, True),
    ({"scheme": "int8_weight_only"}, False),
    ({"scheme": "int8_dynamic"}, False),
]


class TinyLlama(nn.Module):
    """Llama's layer structure at toy size: RMSNorm, GQA attention (q/k/v with bias, as Qwen), SwiGLU MLP.
    Head counts come from the projections' local widths, so the same code runs whole or sharded."""

    def __init__(self, vocab=96, dim=128, head_dim=32, heads=4, kv_heads=2, hidden=256):
        super().__init__()
        self.head_dim = head_dim
        self.embed = nn.Embedding(vocab, dim)
        self.attn_norm, self.mlp_norm, self.norm = nn.RMSNorm(dim), nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=True)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        b, s = tokens.shape
        h = self.embed(tokens)
        x = self.attn_norm(h)
        q, k, v = (proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        x = self.mlp_norm(h)
        h = h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.lm_head(self.norm(h))


def tensor_parallel_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
            **{name: RowwiseParallel() for name in ("o_proj", "down_proj")}}


def _tokens():
    return torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))


def _model():
    torch.manual_seed(0)
    return TinyLlama().eval()


def _tp_worker(rank, store_path, out_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    # rendezvous through a file, not a port another process could take first; a rank that fails alone leaves
    # the other waiting in a collective: the timeout fails the test instead of hanging CI
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for options, _ in SCHEMES:
            torch._dynamo.reset()
            model = parallelize_module(_model(), mesh, tensor_parallel_plan())
            with torch.no_grad():
                results[options["scheme"]] = torch.compile(model, backend="qcompile", options=options)(_tokens())
        results["dtensor_outputs"] = _dtensor_outputs(mesh)
        results["lowered_for_cuda"] = _lowered_for_cuda(mesh)
        # o_proj's K = 128 holds whole groups of 128, each rank's half of it does not
        torch._dynamo.reset()
        model = parallelize_module(_model(), mesh, tensor_parallel_plan())
        try:
            torch.compile(model, backend="qcompile", options={"scheme": "int4_weight_only", "group_size": 128})(
                _tokens())
        except Exception as e:  # Dynamo wraps the backend's error
            results["straddle_error"] = str(e)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


MLP_OPTIONS = {"scheme": "int4_weight_only", "group_size": 32, "keep_float_weights": True}


def _mlp_and_inputs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)), [torch.randn(4, 64), torch.randn(6, 64)]


def _dtensor_outputs(mesh):
    """A graph that returns a DTensor (use_local_output=False), at static shapes and then dynamic ones (the
    second batch size recompiles with a symbolic batch): (type, global shape, local shape, placements, value)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch._dynamo.reset()
    mlp, inputs = _mlp_and_inputs()
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(),
                                   "2": RowwiseParallel(output_layouts=Shard(0), use_local_output=False)})
    with torch.no_grad():
        outputs = [torch.compile(mlp, backend="qcompile", options=MLP_OPTIONS)(x) for x in inputs]
    return [(type(o).__name__, tuple(o.shape), tuple(o.to_local().shape), [repr(p) for p in o.placements],
             o.full_tensor().clone()) for o in outputs]


def _lowered_for_cuda(mesh):
    """The MLP's tensor-parallel graph after the pass and the CUDA lowering (kernels in Triton's interpreter):
    (call targets, quantized tensors' shapes, output of the lowered graph, output of the reference graph)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from qcompile.backend import quantize_graph
    from qcompile.distributed import LocalSignature
    from qcompile.options import QuantOptions
    from qcompile.passes import lower_cuda

    torch._dynamo.reset()
    mlp, inputs = _mlp_and_inputs()
    mlp = parallelize_module(mlp.to(torch.bfloat16), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    options = QuantOptions.from_dict(MLP_OPTIONS)
    found = {}

    def backend(gm, example_inputs, **_):
        fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        signature = LocalSignature.of(example_inputs, fakes)
        result, _, kept = quantize_graph(gm, example_inputs, options, signature)
        reference = torch.fx.GraphModule(result.gm, copy.deepcopy(result.gm.graph))
        lower_cuda.lower_quantized_linears_to_triton(result.gm, torch.device("cuda"))
        result.gm.recompile()
        found["targets"] = [str(n.target) for n in result.gm.graph.nodes if n.op == "call_function"]
        found["shapes"] = {name: tuple(t.shape) for name, t in result.constants}

        def run(*args):
            local = signature.flatten(args)
            graph_inputs = [local[i] for i in kept] + [t for _, t in result.constants]
            found["reference"] = reference(*graph_inputs)[0]
            return result.gm(*graph_inputs)
        return run

    with torch.no_grad():
        found["lowered"] = torch.compile(mlp, backend=backend)(inputs[0].to(torch.bfloat16))
    return found


@pytest.fixture(scope="module")
def tp_results():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.pt")
        mp.spawn(_tp_worker, args=(os.path.join(tmp, "store"), path), nprocs=WORLD)
        return torch.load(path, weights_only=True)


@pytest.mark.parametrize("options,exact", SCHEMES, ids=[o["scheme"] for o, _ in SCHEMES])
def test_tensor_parallel_matches_single_process(tp_results, pass_runner, options, exact):
    model = _model()
    with torch.no_grad():
        reference = model(_tokens())
    single, _ = pass_runner(model, (_tokens(),), options)  # the reference ops, eagerly: the numerics to match
    tp = tp_results[options["scheme"]]
    single_error, tp_error = (single - reference).norm(), (tp - reference).norm()
    assert single_error > 0  # the model was quantized at all
    if exact:
        torch.testing.assert_close(tp, single, rtol=1e-4, atol=1e-4)
    else:
        assert 0.5 * single_error <= tp_error <= 1.25 * single_error, (tp_error, single_error)  # quantized too
        assert (tp - single).norm() <= single_error


def test_dtensor_outputs_are_rebuilt(tp_results, pass_runner):
    mlp, inputs = _mlp_and_inputs()
    for (kind, shape, local_shape, placements, full), x in zip(tp_results["dtensor_outputs"], inputs):
        expected, _ = pass_runner(mlp, (x,), MLP_OPTIONS)
        assert (kind, shape, local_shape) == ("DTensor", tuple(expected.shape), (expected.shape[0] // WORLD, 64))
        assert placements == ["Shard(dim=0)"]
        torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)


def test_cuda_lowering_keeps_the_collectives(tp_results):
    found = tp_results["lowered_for_cuda"]
    assert found["targets"] == [
        "aten.view.default", "qcompile.fused_linear.default", "aten.relu.default", "aten.view.default",
        "aten.div.Tensor",  # RowwiseParallel's bias, divided by the ranks that all-reduce it
        "qcompile.fused_linear.default", "_c10d_functional.all_reduce.default", "_c10d_functional.wait_tensor.default"]
    # each rank's shard: up [128 / 2, 64] column-parallel, down [64, 128 / 2] row-parallel, int4 groups of 32
    assert found["shapes"] == {"_0_weight__qweight": (64, 32), "_0_weight__scale": (64, 2), "_0_weight__zero": (64, 2),
                               "_2_weight__qweight": (64, 32), "_2_weight__scale": (64, 2), "_2_weight__zero": (64, 2)}
    assert sqnr_db(found["reference"].float(), found["lowered"].float()) > 40


def test_group_straddling_two_ranks_is_refused(tp_results):
    message = tp_results.get("straddle_error", "")
    assert "'o_proj.weight' (128, 128) is sharded along in_features" in message, message
    assert "K[0:64] of K=128 does not hold whole groups of 128" in message, message
    assert "group_size 32/64 would fit" in message, message
