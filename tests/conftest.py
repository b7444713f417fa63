"""Shared test setup: deterministic seeds, Inductor's caches on, Dynamo reset between tests."""
import collections
import os

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels are tested in Triton's interpreter on CPU; triton.jit reads this when triton is imported,
    # which `import qcompile` already does
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # each kernel test would otherwise tune its shape over every candidate (minutes per test at real shapes):
    # tests take each bucket's first candidate; benchmarks/linear_h200.py exercises the autotuner
    os.environ.setdefault("QCOMPILE_AUTOTUNE", "0")

import qcompile  # noqa: E402,F401  (registers the qcompile:: ops)
from qcompile import _compat  # noqa: E402

# The kernel tests compile qcompile's ops under plain torch.compile, outside the backend that stamps Inductor's cache
# keys with the kernel sources: stamp them here too, or an edited kernel's test is served the old kernel's graph
torch._inductor.config.post_grad_custom_post_pass = _compat._kernel_stamp_pass(
    torch._inductor.config.post_grad_custom_post_pass)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the H200)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


class MLP(torch.nn.Module):
    """up (with bias) -> activation -> down (no bias): the small model of the graph and kernel tests."""

    def __init__(self, dims=(64, 128, 32), activation=torch.relu):
        super().__init__()
        self.up = torch.nn.Linear(dims[0], dims[1])
        self.down = torch.nn.Linear(dims[1], dims[2], bias=False)
        self.activation = activation

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


class Projection(torch.nn.Module):
    """One linear and a ReLU: a module class whose instances Dynamo serves from one graph."""

    def __init__(self, features=128):
        super().__init__()
        self.proj = torch.nn.Linear(features, features)

    def forward(self, x):
        return torch.relu(self.proj(x))


class Siblings(torch.nn.Module):
    """Sibling linears: q (with bias) / k / v read x, gate / up read h, down reads their product."""

    def __init__(self, dim=64, kv=32, hidden=128):
        super().__init__()
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, kv, bias=False)
        self.v = torch.nn.Linear(dim, kv, bias=False)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = torch.relu(self.q(x) * torch.cat([self.k(x), self.v(x)], -1))
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def pass_backend(options, results=None):
    """A torch.compile backend that runs qcompile's pass (no Inductor) and executes the rewritten aten graph
    eagerly, on the reference ops; appends each Dynamo graph's PassResult to `results`."""
    from qcompile.backend import quantize_graph
    from qcompile.options import QuantOptions

    opts = QuantOptions.from_dict({**options, "keep_float_weights": True})

    def backend(gm, example_inputs, **_):
        result, _, kept = quantize_graph(gm, example_inputs, opts)
        if results is not None:
            results.append(result)
        constants = [t for _, t in result.constants]
        return lambda *a: result.gm(*[a[i] for i in kept], *constants)
    return backend


def run_pass(model, args, options, kwargs=None):
    """Compile `model` with pass_backend and call it once. Returns (outputs, [PassResult per Dynamo graph])."""
    results = []
    with torch.no_grad():
        out = torch.compile(model, backend=pass_backend(options, results))(*args, **(kwargs or {}))
    return out, results


@pytest.fixture
def pass_runner():
    return run_pass


_RANDOMIZED_STATS = collections.Counter()  # case and failure counts of the randomized suite, from each report


def pytest_runtest_logreport(report):
    for name, value in getattr(report, "user_properties", ()):
        if name == "randomized_stats" and report.when == "call":
            _RANDOMIZED_STATS.update(value)


def pytest_terminal_summary(terminalreporter):
    """The randomized differential suite's count of cases and failures (tests/test_randomized.py)."""
    if _RANDOMIZED_STATS:
        import randomized_cases

        terminalreporter.write_line(randomized_cases.summary(_RANDOMIZED_STATS))
