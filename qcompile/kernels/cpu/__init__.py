"""CPU kernels: the intx linear micro-kernels (intx_linear.h) that Inductor generates into its C++ output code.

Importing this package defines the fused `qcompile::` CPU ops. Their Inductor lowerings (inductor_template.py)
register themselves the first time a graph holding one of the ops is traced, so `import qcompile` does not
import Inductor (2.4 s here).
"""
from . import ops


def _register_inductor_lowerings() -> None:
    from .inductor_template import register_inductor_lowerings  # imports Inductor: only once it is loaded

    register_inductor_lowerings()


ops.on_inductor_trace(_register_inductor_lowerings)
