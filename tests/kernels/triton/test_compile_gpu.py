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


@pytest.mark.gpu
def test_autotuning_inside_a_compile(tmp_path, monkeypatch):
    """With the autotuner on (the other GPU tests turn it off) a compile tunes each new linear on real stand-in
    tensors outside the trace: the compiled graph launches one kernel per linear, the numerics hold, and the
    choices land in the cache file. Tuning under Inductor's trace once traced every timed launch (a TTIR build
    each, and a CUDA graph captured while tracing)."""
    import json
    import re

    from qcompile.kernels.triton import tuning

    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache(tmp_path / "configs.json"))
    options = {"scheme": "float8_dynamic", "granularity": "row"}
    model = MLP((512, 1024, 256), torch.nn.functional.gelu).cuda().bfloat16()
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)  # M = 28: the 64-row bucket, 9 candidates
    reference, _ = run_pass(model, (x,), options)
    compiled = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    template_launches = len(re.findall(r"quantized_linear_kernel\w*\.run\(", code))
    # two linears: two template launches, or fewer where the tuner picked _scaled_mm — no timed candidate left in
    # the graph
    assert template_launches <= 2 and (template_launches == 2 or "_scaled_mm" in code), code[-3000:]
    assert sqnr_db(reference.float(), out.float()) > 30
    keys = json.loads((tmp_path / "configs.json").read_text())
    for shape in ("|M64|N1024|K512", "|M64|N256|K1024"):  # the 28 rows' bucket, both linears
        assert any(key.endswith(shape) for key in keys), keys


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if SCHEMES[s].activation_in_graph])
def test_activation_quantized_in_the_graph(scheme):
    """activation_quantization='graph': Inductor generates the activation's quantization (fused with what
    produces it) and the template GEMM takes its output; numerics as the reference."""
    options = {"scheme": scheme, "activation_quantization": "graph",
               **({"group_size": 128} if SCHEMES[scheme].group_sizes else {}),
               **({"bits": 4} if SCHEMES[scheme].bits else {})}
    model = MLP((512, 1024, 256), torch.nn.functional.gelu).cuda().bfloat16()
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)
    reference, _ = run_pass(model, (x,), options)
    compiled = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    assert "quantize_activation_kernel" not in code
    assert "quantized_linear_kernel" in code or "scaled_mm" in code or "_int_mm" in code, code[-3000:]
    assert sqnr_db(reference.float(), out.float()) > 30
