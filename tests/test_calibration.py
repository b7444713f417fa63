"""Calibration for GPTQ through the backend: input statistics against a float64 reference, binding calibration
calls to the compiled frame, the options that enable it, and GPTQ beating RTN end to end."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile import calibration
from qcompile.options import QuantOptions
from qcompile.quant.metrics import sqnr_db


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 32, bias=False)

    def forward(self, x, scale=None):
        h = F.gelu(self.a(x))
        return self.b(h if scale is None else h * scale)


class TiedTwice(nn.Module):
    """One weight read by two linears on different inputs: its statistics are the sum of both."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return F.linear(F.linear(x, self.w).relu(), self.w)


def correlated_inputs(n, batch=2, tokens=24, features=64):
    mix = torch.randn(features, features) / features ** 0.5 + 0.2 * torch.eye(features)
    return [torch.randn(batch, tokens, features) @ mix for _ in range(n)]


def compile_with(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="qcompile", options={"keep_float_weights": True, **options})


def test_statistics_match_float64_reference():
    model = TwoLinears()
    calls = [(x,) for x in correlated_inputs(3)]
    with torch.no_grad():
        compile_with(model, scheme="int4_weight_only", group_size=32, algorithm="gptq",
                     calibration=calls)(calls[0][0])
    xs = torch.cat([c[0].reshape(-1, 64) for c in calls]).double()
    hs = F.gelu(xs @ model.a.weight.double().T + model.a.bias.double())
    for weight, inputs in ((model.a.weight, xs), (model.b.weight, hs)):
        calibration_set, stats = calibration._STATS[weight]
        assert calibration_set is calls and stats.rows == inputs.shape[0]
        expected = inputs.T @ inputs
        assert (stats.xtx.double() - expected).norm() / expected.norm() < 1e-5
        torch.testing.assert_close(stats.hessian().double(), 2 * expected / inputs.shape[0], rtol=1e-4, atol=1e-4)


def test_progress_bar_on_stderr(capsys):
    model = TwoLinears()
    calls = [(x,) for x in correlated_inputs(2)]
    with torch.no_grad():
        compile_with(model, scheme="intx_weight_only", bits=4, algorithm="gptq", calibration=calls)(calls[0][0])
    err = capsys.readouterr().err
    assert "qcompile calibrating 2 linears" in err and "2/2 inputs" in err


def test_tied_weight_sums_both_linears_inputs():
    model = TiedTwice()
    calls = [(x,) for x in correlated_inputs(2)]
    with torch.no_grad():
        compile_with(model, scheme="intx_weight_only", bits=4, algorithm="gptq", calibration=calls)(calls[0][0])
    xs = torch.cat([c[0].reshape(-1, 64) for c in calls]).double()
    hs = (xs @ model.w.double().T).relu()
    _, stats = calibration._STATS[model.w]
    expected = xs.T @ xs + hs.T @ hs
    assert stats.rows == 2 * xs.shape[0]
    assert (stats.xtx.double() - expected).norm() / expected.norm() < 1e-5


@pytest.mark.parametrize("scheme,extra", [("int4_weight_only", {"group_size": 32}),
                                          ("intx_weight_only", {"bits": 3, "group_size": 32}),
                                          ("int8_dynamic_int4", {"group_size": 32})])
def test_gptq_and_hqq_beat_rtn_end_to_end(scheme, extra):
    model = TwoLinears()
    *calibration_inputs, x = correlated_inputs(7)  # one distribution for calibration and evaluation
    calls = [{"x": c} for c in calibration_inputs]  # calls by keyword
    with torch.no_grad():
        ref = model(x)
        sqnr = {alg: sqnr_db(ref, compile_with(model, scheme=scheme, algorithm=alg, **extra,
                                               **({"calibration": calls} if alg == "gptq" else {}))(x=x))
                for alg in ("rtn", "gptq", "hqq")}
    assert sqnr["gptq"] > sqnr["rtn"] + 1.0, sqnr  # measured +3 to +4 dB
    assert sqnr["hqq"] > sqnr["rtn"], sqnr


def test_bind_call_to_frame_arguments():
    module, t0, t1, t2 = nn.Linear(2, 2), torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)

    def forward(self, x, scale=None):
        return x

    current = {"self": module, "x": t0, "scale": None}
    assert calibration.bind_call(forward.__code__, current, (t1,)) == {"self": module, "x": t1, "scale": None}
    assert calibration.bind_call(forward.__code__, current, {"x": t1, "scale": t2}) == \
        {"self": module, "x": t1, "scale": t2}
    assert calibration.bind_call(forward.__code__, current, t1)["x"] is t1

    def wrapped(*args, **kwargs):  # transformers' decorators: the module arrives as args[0]
        return args

    bound = calibration.bind_call(wrapped.__code__, {"args": (module, t0), "kwargs": {}}, {"input_ids": t1})
    assert bound == {"args": (module,), "kwargs": {"input_ids": t1}}
    with pytest.raises(ValueError, match="has no parameter 'mask'"):
        calibration.bind_call(forward.__code__, current, {"mask": t1})
    with pytest.raises(ValueError, match="3 positional args"):
        calibration.bind_call(forward.__code__, current, (t0, t1, t2))


def test_calibration_options_are_validated():
    calls = [(torch.randn(2, 64),)]
    with pytest.raises(ValueError, match="does not apply to scheme 'int8_weight_only'"):
        QuantOptions.from_dict({"scheme": "int8_weight_only", "algorithm": "hqq"})
    with pytest.raises(ValueError, match="needs option 'calibration'"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "gptq"})
    with pytest.raises(ValueError, match="only used by algorithm 'gptq'"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "hqq", "calibration": calls})
    with pytest.raises(ValueError, match="only used by algorithm 'gptq'"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "calibration": calls})
    with pytest.raises(ValueError, match="is empty"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "gptq", "calibration": []})
    with pytest.raises(ValueError, match="item 0 is a str"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "gptq", "calibration": ["text"]})
    with pytest.raises(ValueError, match="'rtn', 'gptq', 'hqq'"):
        QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "awq"})
    gptq = QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "gptq", "calibration": calls})
    rtn = QuantOptions.from_dict({"scheme": "int4_weight_only"})
    assert gptq.calibration is calls and rtn.algorithm == "rtn" and gptq.act_order
    assert gptq.cache_key() != rtn.cache_key() != QuantOptions.from_dict(
        {"scheme": "int4_weight_only", "algorithm": "hqq"}).cache_key()
    hash(gptq)  # the calibration data is not hashed (nor guarded on)
    generator = QuantOptions.from_dict({"scheme": "int4_weight_only", "algorithm": "gptq",
                                        "calibration": (c for c in calls)})
    assert len(generator.calibration) == 1
