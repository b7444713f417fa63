"""Numerics: pure-torch quantize / dequantize / pack for every format. The reference every kernel is tested
against; nothing here knows about graphs or devices."""
from . import affine, codebook, float8, metrics, microscaling, packing  # noqa: F401
from .metrics import sqnr_db  # noqa: F401
