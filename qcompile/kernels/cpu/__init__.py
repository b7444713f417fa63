"""CPU kernels: the intx linear micro-kernels (intx_linear.h) that Inductor generates into its C++ output code.

Importing this package defines the fused `qcompile::` CPU ops. Their Inductor lowerings (inductor_template.py)
register themselves the first time a graph holding one of the ops is traced, so `import qcompile` does not
import Inductor (2.4 s here).
"""
from . import ops  # noqa: F401  (defines the ops)
