"""On the GPU: torch.compile(backend="qcompile") runs every scheme through the Triton kernels — they appear
in Inductor's output code as user-defined kernels — and matches the reference numerics."""
import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

from qcompile.quant.metrics import sqnr_db
from qcompile.schemes import SCHEMES

from conftest import run_pass


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(512, 1024)
        self.down = nn.Linear(1024, 256, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_compiled_model_runs_generated_kernels(scheme):
    options = {"scheme": scheme, **({"group_size": 128} if SCHEMES[scheme].group_sizes else {}),
               **({"bits": 4} if SCHEMES[scheme].bits else {})}
    model = MLP().cuda().bfloat16()
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)
    reference, _ = run_pass(model, (x,), options)  # the reference ops, eagerly
    compiled = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    assert "quantized_linear_kernel" in code, code[-3000:]
    assert sqnr_db(reference.float(), out.float()) > 30
