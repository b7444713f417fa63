"""The "cudagraphs" option: Inductor's CUDA-graph trees replay the compiled model, reading weights, buffers and
quantized tensors in place (static inputs) and copying only the other inputs."""
import pytest
import torch

from qcompile.options import QuantOptions

from conftest import MLP


class CachedDecoder(torch.nn.Module):
    """A linear whose output is written into a persistent buffer at a position given as a tensor, like a KV cache
    in a decode step: the buffer must be updated in place by every replay."""

    def __init__(self, dim=512):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.register_buffer("cache", torch.zeros(8, dim))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, self.proj(x))
        return self.cache.sum(0, keepdim=True)


def test_cudagraphs_on_cpu_warns_and_runs():
    model = MLP()
    x = torch.randn(3, 64)
    compiled = torch.compile(model, backend="qcompile", options={"scheme": "int8_weight_only", "cudagraphs": True,
                                                                 "keep_float_weights": True})
    with pytest.warns(UserWarning, match="cudagraphs applies to CUDA graphs only"), torch.no_grad():
        out = compiled(x)
    assert torch.isfinite(out).all()


def test_cudagraphs_option_must_be_bool():
    with pytest.raises(ValueError, match="'cudagraphs' must be True or False"):
        QuantOptions.from_dict({"scheme": "int8_weight_only", "cudagraphs": 1})


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int4_weight_only", "float8_dynamic"])
def test_cudagraphs_replay_reads_weights_in_place(scheme):
    dim = 2048
    model = CachedDecoder(dim).cuda().bfloat16()
    weight_bytes = model.proj.weight.numel() * 2
    eager = CachedDecoder(dim).cuda().bfloat16()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="qcompile", options={"scheme": scheme, "cudagraphs": True})
    reference = torch.compile(eager, backend="qcompile", options={"scheme": scheme})
    torch.cuda.synchronize()
    with torch.no_grad():
        for step in range(4):  # warm-up, recording, then replays
            torch.compiler.cudagraph_mark_step_begin()
            x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
            pos = torch.tensor([step], device="cuda")
            if step == 2:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
            out = compiled(x, pos).clone()
            expected = reference(x, pos)
            torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < weight_bytes // 8  # replays allocate nothing weight-sized
    torch.testing.assert_close(model.cache, eager.cache, rtol=2e-2, atol=2e-2)  # the buffer mutated in place
    from torch._dynamo.utils import counters
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
