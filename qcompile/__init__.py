"""qcompile: a quantization compiler for PyTorch inference.

    torch.compile(model, backend="qcompile", options={"scheme": "int4_weight_only", "group_size": 128})
"""
from . import ops  # noqa: F401  (registers the qcompile:: operators)
from .backend import add_pass_observer, qcompile_backend
from .export import export  # noqa: F401
from .prepare import prepare  # noqa: F401
from .per_layer import compile_blocks  # noqa: F401
from .debug import diff, folder as _debug_folder  # noqa: F401
from .options import QuantOptions  # noqa: F401
from .schemes import SCHEMES, get_scheme  # noqa: F401

__version__ = "0.1.0"

# the floors wired where they meet: the backend hands each graph to QCOMPILE_DEBUG's folder (debug builds on it)
add_pass_observer(_debug_folder.PASS_OBSERVER)


def _register_backend_name() -> None:
    """Installed, the torch_dynamo_backends entry point makes backend="qcompile" work; from a source tree
    (PYTHONPATH, no entry point) importing qcompile registers the name instead."""
    from importlib.metadata import entry_points

    if any(ep.name == "qcompile" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "qcompile" not in _COMPILER_FNS:
        register_backend(qcompile_backend, name="qcompile")


_register_backend_name()
__all__ = ["qcompile_backend", "export", "prepare", "compile_blocks", "QuantOptions", "SCHEMES", "get_scheme", "diff"]
