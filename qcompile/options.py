"""The options dict that `torch.compile(..., options=...)` hands to the backend, validated into a frozen object.

Every error names the key, the bad value and what would be valid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .schemes import SCHEMES, Scheme, get_scheme

_KEYS_DOC = {
    "scheme": "which quantization to apply (required): " + ", ".join(SCHEMES),
    "group_size": "group size along K for group-wise schemes (32/64/128/256)",
    "bits": "weight bit width for intx schemes (1-8)",
    "granularity": "'row' (default) or 'tensor' scales for float8_dynamic",
    "include": "glob pattern(s) on module names: only these linears are quantized (default: all)",
    "exclude": "glob pattern(s) on module names: these linears stay in float",
    "keep_float_weights": "keep the float weights of quantized linears alive (default False: their storage "
                          "is released after compiling, see README)",
}


@dataclass(frozen=True)
class QuantOptions:
    scheme: str
    group_size: int | None = None
    bits: int | None = None
    granularity: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_float_weights: bool = False

    @property
    def scheme_def(self) -> Scheme:
        return SCHEMES[self.scheme]

    def cache_key(self) -> tuple:
        """What decides the quantized weights (not which layers are picked)."""
        return (self.scheme, self.group_size, self.bits, self.granularity)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "QuantOptions":
        if isinstance(options, QuantOptions):
            return options
        if not options:
            raise ValueError("qcompile needs options={'scheme': ...}; valid schemes: " + ", ".join(SCHEMES))
        if not isinstance(options, Mapping):
            raise ValueError(f"qcompile options must be a dict, got {type(options).__name__}")
        unknown = [k for k in options if k not in _KEYS_DOC]
        if unknown:
            valid = "\n".join(f"  {k}: {doc}" for k, doc in _KEYS_DOC.items())
            raise ValueError(f"unknown qcompile option(s) {', '.join(map(repr, unknown))}; valid options:\n{valid}")
        if "scheme" not in options:
            raise ValueError("qcompile options need 'scheme'; valid schemes: " + ", ".join(SCHEMES))
        if not isinstance(options["scheme"], str):
            raise ValueError(f"option 'scheme' must be a string, got {options['scheme']!r}")
        scheme = get_scheme(options["scheme"])
        return cls(
            scheme=scheme.name,
            group_size=_choice(options, "group_size", scheme.group_sizes, scheme.default_group_size, scheme),
            bits=_choice(options, "bits", scheme.bits, scheme.default_bits, scheme),
            granularity=_choice(options, "granularity", scheme.granularities,
                                scheme.granularities[0] if scheme.granularities else None, scheme),
            include=_patterns(options, "include"),
            exclude=_patterns(options, "exclude"),
            keep_float_weights=_bool(options, "keep_float_weights"),
        )

    def replace(self, **changes) -> "QuantOptions":
        return dataclasses.replace(self, **changes)


def _choice(options, key, allowed, default, scheme):
    if key not in options or options[key] is None:
        return default
    value = options[key]
    if not allowed:
        raise ValueError(f"option {key!r} does not apply to scheme {scheme.name!r}; "
                         f"schemes that take it: {', '.join(s.name for s in SCHEMES.values() if _takes(s, key))}")
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"option {key}={value!r} is not valid for scheme {scheme.name!r}; "
                         f"valid: {', '.join(map(repr, allowed))}")
    return value


def _takes(scheme: Scheme, key: str) -> bool:
    return bool({"group_size": scheme.group_sizes, "bits": scheme.bits, "granularity": scheme.granularities}[key])


def _patterns(options, key) -> tuple[str, ...]:
    value = options.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"option {key!r} must be a glob pattern string or a list of them, got {value!r}")


def _bool(options, key) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be True or False, got {value!r}")
    return value
