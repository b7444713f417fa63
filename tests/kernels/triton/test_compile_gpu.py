"""On the GPU: torch.compile(backend="qcompile") runs every scheme through the Triton kernels — they appear
in Inductor's output code as user-defined kernels — and matches the reference numerics."""
import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

from qcompile.quant.metrics import sqnr_db
from qcompile.schemes import SCHEMES

from conftest import MLP, run_pass


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_compiled_model_runs_generated_kernels(scheme):
    options = {"scheme": scheme, **({"group_size": 128} if SCHEMES[scheme].group_sizes else {}),
               **({"bits": 4} if SCHEMES[scheme].bits else {})}
    model = MLP((512, 1024, 256), torch.nn.functional.gelu).cuda().bfloat16()
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)
    reference, _ = run_pass(model, (x,), options)  # the reference ops, eagerly
    compiled = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    # the template GEMM, or a library GEMM the autotuner preferred, fed by our generated quantize/dequantize kernel
    generated = ("quantized_linear_kernel", "quantize_activation_kernel", "dequantize_weight_kernel")
    assert any(name in code for name in generated), code[-3000:]
    assert sqnr_db(reference.float(), out.float()) > 30
