"""prepare(): weights quantized layer by layer onto the device before compiling; compile reuses them."""
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.quant.metrics import sqnr_db


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def test_prepare_then_compile_matches_compile_alone(capfd):
    options = {"scheme": "int4_weight_only", "group_size": 32}
    ids = torch.randint(0, 100, (2, 9))
    reference = TiedLM().eval()
    prepared = TiedLM().eval()
    prepared.load_state_dict(reference.state_dict())
    with torch.no_grad():
        float_out = reference(ids)
        expected = torch.compile(reference, backend="qcompile", options=options)(ids)
        torch._dynamo.reset()
        qcompile.prepare(prepared, options, device="cpu")
        assert "qcompile: quantized mlp.2" in capfd.readouterr().err  # a progress bar on stderr
        assert prepared.mlp[0].weight.untyped_storage().nbytes() == 0  # float copy gone before compiling
        assert prepared.embed.weight.untyped_storage().nbytes() > 0  # tied to the embedding: kept float
        out = torch.compile(prepared, backend="qcompile", options=options)(ids)
    assert torch.equal(out, expected)
    assert 12 < sqnr_db(float_out, out) < 40


def test_prepare_twice_reuses_the_quantized_weights_and_other_options_are_an_error():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
        options = {"scheme": "int8_weight_only"}
        qcompile.prepare(model, options, progress=False)
        qcompile.prepare(model, options, progress=False)  # a no-op for weights already quantized
        out = torch.compile(model, backend="qcompile", options=options)(x)
    assert sqnr_db(expected, out) > 35
    with pytest.raises(RuntimeError, match="quantizing them again \\(scheme 'int4_weight_only'.*keep_float_weights"):
        qcompile.prepare(model, {"scheme": "int4_weight_only", "group_size": 32}, progress=False)
