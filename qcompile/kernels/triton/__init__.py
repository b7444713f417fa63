"""CUDA kernels in Triton: one quantized-linear template family (gemm.py, dequant.py), dynamic activation
quantization (activation.py), their launchers (linear.py), autotuning (tuning.py) and the op (ops.py)."""
from .linear import ACTIVATIONS, WEIGHT_FORMATS, LinearSpec, unsupported_reason  # noqa: F401
from .ops import fused_linear  # noqa: F401
