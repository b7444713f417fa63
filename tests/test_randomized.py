"""Randomized differential tests (llama.cpp's test-quantize-fns, PyTorch's opcheck as models): every scheme on
seeded random shapes, M values, dtypes and data (outliers, all-zero rows / groups, NaN / inf activations) against
the float64 reference within each scheme's bound; unfit layers stay in float with the warning naming them.
The generator, reference and bounds are in randomized_cases.py; QCOMPILE_FUZZ_SEED=<n> draws another run, and
every failure names its case and seed. Each test is one group (one compile) and reports every failed case.
812 cases at the default seed, ~100 s on 2 cores with a cold Inductor cache (~70% of it Inductor and g++ for the
compiled groups); the session's summary line counts cases and failures.
"""
from __future__ import annotations

import collections
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import randomized_cases as rc
from conftest import pass_backend
from qcompile.schemes import SCHEMES

sys.path.insert(0, str(Path(__file__).parent / "kernels" / "triton"))  # each scheme as the Triton kernels see it
from triton_cases import CASES, bits_of  # noqa: E402

CPU_GROUPS = rc.draw_groups(rc.SEED, "cpu")
GPU_GROUPS = rc.draw_groups(rc.SEED, "cuda")


class Linears(nn.Module):
    """The group's linears side by side: linear i reads input inputs[i] (siblings share one)."""

    def __init__(self, layers, inputs):
        super().__init__()
        self.inputs = inputs
        for i, (w, b) in enumerate(layers):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():  # copies: the backend releases the float weights it quantized
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            setattr(self, f"linear{i}", linear)

    def forward(self, *xs):
        return tuple(getattr(self, f"linear{i}")(xs[j]) for i, j in enumerate(self.inputs))


def _stay_float_warnings(caught, group: rc.Group) -> dict[int, list[str]]:
    """Per linear, what is wrong with the warnings of its compile: an unfit one must be named, a fit one not."""
    texts = [str(w.message) for w in caught]
    problems = {}
    for i, linear in enumerate(group.linears):
        named = [t for t in texts if f"linear 'linear{i}'" in t and "stays in float" in t]
        if linear.fits and named:
            problems[i] = [f"warned although the scheme fits: {named[0]}"]
        elif not linear.fits and not named:
            problems[i] = ["no warning that the unfit layer stays in float"]
    return problems


def _run_graph_group(group: rc.Group, compile_model) -> list[str]:
    """compiled / pass layers: one compile (M dynamic; M = 1 recompiles), every call through it."""
    qoptions = group.quant_options()
    weights = [rc.make_weight(linear, qoptions.group_size, group.device) for linear in group.linears]
    quantized = [SCHEMES[group.scheme].quantize_weight(w, qoptions) if linear.fits else None
                 for linear, (w, _) in zip(group.linears, weights)]
    owners = [i for i, linear in enumerate(group.linears) if linear.input_of is None]
    model = Linears(weights, [owners.index(i if linear.input_of is None else linear.input_of)
                              for i, linear in enumerate(group.linears)])
    compiled = compile_model(model)
    failures = []
    for c, call in enumerate(group.calls):
        inputs = [rc.make_activation(call, group.linears[i], group.device) for i in owners]
        if call.M > 1:
            for x in inputs:
                torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outs, crash = compiled(*inputs), None
            except Exception as e:  # a crash is a failure of every case in the call
                outs, crash = None, f"crashed: {type(e).__name__}: {str(e)[:400]}"
        warning_problems = _stay_float_warnings(caught, group) if c == 0 else {}
        # after the first compile the module itself is a user path too: its released linears run eagerly on the
        # quantized tensors (qcompile/released.py), the unfit ones in float
        runs = [(group.layer, outs, crash)]
        if group.layer == "compiled" and c == 0:
            try:
                with torch.no_grad():
                    runs.append(("eager-after-compile", model(*inputs), None))
            except Exception as e:
                runs.append(("eager-after-compile", None, f"crashed: {type(e).__name__}: {str(e)[:400]}"))
        xs = [inputs[j] for j in model.inputs]
        for i, (linear, x, (w, b), q) in enumerate(zip(group.linears, xs, weights, quantized)):
            expected = rc.expected_output(group.scheme if linear.fits else None, qoptions, q, x, w, b)
            for layer, results, error in runs:
                name = group.case_name(linear, call).replace(f"[{group.layer}-", f"[{layer}-")
                problems = [error] if error else rc.check(results[i], expected, (call.M, linear.N), x.dtype)
                if layer == group.layer:  # the compile's warnings
                    problems += warning_problems.get(i, [])
                rc.record(layer, problems)
                failures += [f"{name} {p}" for p in problems]
    return failures


def _run_triton_group(group: rc.Group) -> list[str]:
    """triton layer: run_linear (the fused op's body) with a config drawn per call from the candidates."""
    from qcompile.kernels.triton.linear import run_linear
    from qcompile.kernels.triton.ops import spec_for
    from qcompile.kernels.triton.tuning import candidates

    options = group.quant_options()
    case = next(c for c in CASES if c.scheme == group.scheme
                and dict(c.options).get("granularity", options.granularity) == options.granularity)
    (linear,) = group.linears
    w, b = rc.make_weight(linear, options.group_size, group.device)
    q = SCHEMES[group.scheme].quantize_weight(w, options)
    weight_args = case.weight_args(q)
    spec = spec_for(case.activation, case.weight_format, bits_of(case, options), options.group_size or 0,
                    weight_args[1], weight_args[2], b)
    failures = []
    for call in group.calls:
        configs = [c for c in candidates(spec, call.M, linear.N, linear.K)
                   if group.device == "cuda" or c.library != "scaled_mm"]  # _scaled_mm needs CUDA
        config = random.Random(call.seed).choice(configs)
        name = f"{group.case_name(linear, call)[:-1]} {config}]"
        x = rc.make_activation(call, linear, group.device)
        try:
            out = run_linear(x, *weight_args, b, spec, x.dtype, config)
            problems = rc.check(out, rc.expected_output(group.scheme, options, q, x, w, b), (call.M, linear.N),
                                x.dtype)
        except Exception as e:
            problems = [f"crashed: {type(e).__name__}: {str(e)[:400]}"]
        rc.record(group.layer, problems)
        failures += [f"{name} {p}" for p in problems]
    return failures


def run_group(group: rc.Group) -> list[str]:
    """Every case of the group, run and checked; the failed ones, each named with its parameters and seed."""
    options = {"scheme": group.scheme, **dict(group.options)}
    if group.layer == "triton":
        return _run_triton_group(group)
    if group.layer == "pass":
        return _run_graph_group(group, lambda model: torch.compile(model, backend=pass_backend(options)))
    return _run_graph_group(group, lambda model: torch.compile(model, backend="qcompile", options=options))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes from the Triton interpreter
@pytest.mark.parametrize("group", CPU_GROUPS, ids=lambda g: g.id)
def test_randomized(group, request):
    before = collections.Counter(rc.STATS)
    failures = run_group(group)
    # the counts travel with the test's report, so the summary adds up under pytest-xdist's workers too
    request.node.user_properties.append(("randomized_stats", dict(rc.STATS - before)))
    assert not failures, f"{len(failures)} failed cases (seed {rc.SEED}):\n" + "\n".join(failures)


def test_generator_covers_the_issue():
    """Every scheme, each layer, all three dtypes, M = 1..17 and larger, unfit layers, every data pattern."""
    assert {g.scheme for g in CPU_GROUPS} == set(SCHEMES)
    assert {g.layer for g in CPU_GROUPS} == {"compiled", "pass", "triton"}
    assert {(g.scheme, lin.dtype) for g in CPU_GROUPS if g.layer != "triton" for lin in g.linears if lin.fits} == {
        (s, d) for s in SCHEMES for d in rc.DTYPES}
    calls = [c for g in CPU_GROUPS for c in g.calls]
    assert {c.pattern for c in calls} == set(rc.X_PATTERNS)
    assert 1 in {c.M for c in calls} and any(2 <= c.M <= 17 for c in calls) and max(c.M for c in calls) > 17
    linears = [lin for g in CPU_GROUPS for lin in g.linears]
    assert any(not lin.fits for lin in linears) and {lin.weight_pattern for lin in linears} == set(rc.W_PATTERNS)
    assert sum(len(g.linears) * len(g.calls) for g in CPU_GROUPS) >= 500


@pytest.mark.gpu
@pytest.mark.parametrize("group", GPU_GROUPS, ids=lambda g: g.id)
def test_randomized_real_shapes_on_gpu(group):
    """The same generator at real shapes on CUDA: compiled groups through the Triton lowering, triton groups
    through run_linear with a drawn candidate config."""
    failures = run_group(group)
    assert not failures, f"{len(failures)} failed cases (seed {rc.SEED}):\n" + "\n".join(failures)
