"""The scheme registry: every scheme, one file each, looked up by name or by torchao config name."""
from __future__ import annotations

from .base import Emitter, QuantizedWeight, Scheme  # noqa: F401
from . import (  # noqa: E402  (one module per scheme; each defines SCHEME)
    codebook,
    float8_dynamic,
    float8_dynamic_int4,
    float8_weight_only,
    int4_weight_only,
    int8_dynamic,
    int8_dynamic_int4,
    int8_dynamic_intx,
    int8_weight_only,
    intx_weight_only,
    mxfp8,
    nvfp4,
)

SCHEMES: dict[str, Scheme] = {
    m.SCHEME.name: m.SCHEME
    for m in (int8_weight_only, int8_dynamic, float8_weight_only, float8_dynamic, int4_weight_only,
              float8_dynamic_int4, int8_dynamic_int4, intx_weight_only, int8_dynamic_intx, codebook, mxfp8,
              nvfp4)
}
_ALIASES = {alias: s.name for s in SCHEMES.values() for alias in s.aliases}


def get_scheme(name: str) -> Scheme:
    """The scheme called `name` (or a torchao config class name); ValueError lists the valid names."""
    key = _ALIASES.get(name, name)
    if key not in SCHEMES:
        raise ValueError(
            f"unknown scheme {name!r}; valid schemes: {', '.join(SCHEMES)} "
            f"(torchao config names are accepted too: {', '.join(sorted(_ALIASES))})")
    return SCHEMES[key]
