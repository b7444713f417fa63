"""AOTInductor export: the package holds the quantized weights, loads without qcompile, matches the compiled model."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.quant.metrics import sqnr_db


class MLP(nn.Module):
    def __init__(self, dim=1024):
        super().__init__()
        self.up = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_int8_dynamic_intx_4bit_package_loads_without_qcompile(tmp_path):
    model = MLP().eval()
    x = torch.randn(3, 5, 1024)
    options = {"scheme": "int8_dynamic_intx", "bits": 4}
    path = qcompile.export(model, (x,), options, dynamic_shapes=({0: torch.export.Dim("batch")},),
                           package_path=tmp_path / "mlp.pt2")
    with torch.no_grad():
        compiled_out = torch.compile(model, backend="qcompile", options={**options, "keep_float_weights": True})(x)
        float_out = model(x)
    x2 = torch.randn(6, 5, 1024)
    torch.save((x, x2), tmp_path / "inputs.pt")
    runner = ("import sys, torch\n"
              "f = torch._inductor.aoti_load_package(sys.argv[1])\n"
              "x, x2 = torch.load(sys.argv[2], weights_only=True)\n"
              "torch.save((f(x), f(x2)), sys.argv[3])\n"
              "assert 'qcompile' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", runner, path, tmp_path / "inputs.pt", tmp_path / "out.pt"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out, out2 = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out2.shape == (6, 5, 1024)  # dynamic batch
    assert sqnr_db(compiled_out, out) > 60  # the same numerics as the compiled model
    assert 15 < sqnr_db(float_out, out) < 40  # and a 4-bit model, not the float one
    # 4-bit packed weights + float32 group scales; the rest of the package is the compiled code
    quantized_bytes = 2 * 1024 * 1024 // 2 + 2 * 1024 * (1024 // 32) * 4
    float_bytes = 2 * 1024 * 1024 * 4
    size = os.path.getsize(path)
    assert quantized_bytes < size < quantized_bytes + 3_000_000 and size < float_bytes / 2


def test_export_errors_say_what_to_change():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return self.fc(x)
            return x

    with pytest.raises(RuntimeError, match="torch.export could not capture DataDependent.*torch.cond"):
        qcompile.export(DataDependent(), (torch.randn(2, 32),), {"scheme": "int8_dynamic"})
    with pytest.raises(ValueError, match="unknown scheme"):
        qcompile.export(MLP(64), (torch.randn(2, 64),), {"scheme": "int2"})


class CachedStep(nn.Module):
    """A decode step that writes a static cache in place (as a transformers StaticCache does: index_copy_ into a
    buffer), then reads the whole cache."""
    def __init__(self, dim=64, length=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.register_buffer("cache", torch.zeros(length, dim))

    def forward(self, x, position):
        self.cache.index_copy_(0, position, self.fc(x))
        return self.cache.sum(0)


def test_a_program_that_writes_its_buffers_in_place_is_quantized():
    """torch.export keeps the cache's in-place write; the rewritten program keeps the export's IR (its verifier), so
    it runs and writes its own copy of the buffer as the model writes its own; the exported program it came from
    is left as it was."""
    from qcompile.export import quantize_exported_program
    from qcompile.options import QuantOptions

    model = CachedStep().eval()
    x, position = torch.randn(1, 64), torch.tensor([3])
    with torch.no_grad():
        ep = torch.export.export(model, (x, position))
        quantized, result = quantize_exported_program(ep, QuantOptions.from_dict({"scheme": "int8_dynamic"}))
        out = quantized.module()(x, position)
        expected = model(x, position)
        torch.testing.assert_close(ep.module()(x, position), expected)  # the input program still runs, in float
    assert len(result.quantized) == 1
    assert sqnr_db(expected, out) > 30
    assert int((model.cache != 0).any(-1).sum()) == 1  # the model's own cache got the one row it wrote
