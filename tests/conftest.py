"""Shared test setup: deterministic seeds, Inductor's caches on, Dynamo reset between tests."""
import os

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402,F401  (registers the qcompile:: ops)


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
