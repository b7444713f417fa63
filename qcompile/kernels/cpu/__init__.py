"""CPU kernels: the intx linear micro-kernels (intx_linear.h) that Inductor generates into its C++ output code.

Importing this package defines the fused `qcompile::` CPU ops and registers their Inductor lowerings.
"""
from . import ops  # noqa: F401  (defines the ops)
from . import inductor_template  # noqa: F401  (registers the Inductor lowerings)
