"""The options dict that `torch.compile(..., options=...)` hands to the backend, validated into a frozen object.

Every error names the key, the bad value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

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
    "cudagraphs": "replay CUDA graphs, as mode='reduce-overhead' (default False; CUDA only): weights, buffers and "
                  "quantized tensors are read in place, only the other inputs are copied",
    "algorithm": "how weights are rounded: 'rtn' (default), 'gptq' (needs 'calibration') or 'hqq' (data-free); "
                 "gptq/hqq for schemes " + ", ".join(s.name for s in SCHEMES.values() if len(s.algorithms) > 1),
    "calibration": "for algorithm 'gptq': an iterable of example inputs to the compiled callable, each a tuple "
                   "of positional args or a dict of keyword args",
    "act_order": "for algorithm 'gptq': quantize columns in order of decreasing Hessian diagonal (default True)",
    "fuse_siblings": "fuse linears that read the same input (q/k/v, gate/up) into one quantized linear over their "
                     "concatenated weights, its output sliced back (default True; exact)",
    "activation_quantization": "dynamic schemes on CUDA: 'kernel' (default: the fused linear quantizes its input "
                               "in its own small kernel, or in the GEMV) or 'graph' (the quantization stays in the "
                               "graph as plain ops that Inductor fuses into the op producing the input)",
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
    cudagraphs: bool = False
    fuse_siblings: bool = True
    activation_quantization: str = "kernel"
    algorithm: str = "rtn"
    act_order: bool = True
    # read once by the backend's calibration step; never compared, hashed or guarded on
    calibration: Any = field(default=None, compare=False, hash=False, repr=False)

    @property
    def scheme_def(self) -> Scheme:
        return SCHEMES[self.scheme]

    def cache_key(self) -> tuple:
        """What decides the quantized weights (not which layers are picked)."""
        calibration = None if self.calibration is None else id(self.calibration)
        return (self.scheme, self.group_size, self.bits, self.granularity, self.algorithm, self.act_order,
                calibration)

    def selects(self, module: str) -> bool:
        """Whether the include / exclude patterns let the linear in `module` be quantized."""
        if self.include and not any(fnmatch.fnmatchcase(module, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(module, p) for p in self.exclude)

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
            cudagraphs=_bool(options, "cudagraphs"),
            fuse_siblings=_bool(options, "fuse_siblings", default=True),
            activation_quantization=_activation_quantization(options, scheme),
            **_algorithm(options, scheme),
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


def _activation_quantization(options, scheme: Scheme) -> str:
    value = options.get("activation_quantization") or "kernel"
    if value not in ("kernel", "graph"):
        raise ValueError(f"option activation_quantization={value!r} is not valid; valid: 'kernel', 'graph'")
    if value == "graph" and not scheme.activation_in_graph:
        takes = [s.name for s in SCHEMES.values() if s.activation_in_graph]
        raise ValueError(f"option activation_quantization='graph' does not apply to scheme {scheme.name!r}; "
                         f"schemes that take it: {', '.join(takes)}")
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


def _algorithm(options, scheme: Scheme) -> dict:
    algorithm = options.get("algorithm") or "rtn"
    if algorithm not in ("rtn", "gptq", "hqq"):
        raise ValueError(f"option algorithm={algorithm!r} is not valid; valid: 'rtn', 'gptq', 'hqq'")
    if algorithm not in scheme.algorithms:
        takes = [s.name for s in SCHEMES.values() if algorithm in s.algorithms]
        raise ValueError(f"option algorithm={algorithm!r} does not apply to scheme {scheme.name!r} (its weights are "
                         f"rounded only by 'rtn'); schemes that take it: {', '.join(takes)}")
    calibration = options.get("calibration")
    if algorithm == "gptq":
        if calibration is None or isinstance(calibration, (str, bytes, Mapping)) or not hasattr(calibration,
                                                                                                 "__iter__"):
            raise ValueError("algorithm 'gptq' needs option 'calibration': an iterable of example inputs (tuples "
                             f"of positional args or dicts of keyword args), got {type(calibration).__name__}")
        calibration = _reiterable(calibration)
        items = list(calibration)
        bad = [i for i, c in enumerate(items) if not isinstance(c, (tuple, list, Mapping, torch.Tensor))]
        if not items:
            raise ValueError("option 'calibration' is empty; give at least one example input")
        if bad:
            raise ValueError(f"option 'calibration' item {bad[0]} is a {type(items[bad[0]]).__name__}; each "
                             f"example input must be a tuple of args, a dict of kwargs or a tensor")
    elif calibration is not None:
        raise ValueError(f"option 'calibration' is only used by algorithm 'gptq' (algorithm is {algorithm!r}: "
                         f"{'data-free' if algorithm == 'hqq' else 'round to nearest'}); drop it or use 'gptq'")
    if "act_order" in options and algorithm != "gptq":
        raise ValueError(f"option 'act_order' applies to algorithm 'gptq' only, not {algorithm!r}")
    return {"algorithm": algorithm, "calibration": calibration,
            "act_order": _bool(options, "act_order", default=True)}


# one-shot iterators (generators) handed as 'calibration' -> their items: each graph of a model reads them
_MATERIALIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _reiterable(calibration):
    """The user's list/tuple as is (its identity keys the caches), or a one-shot iterator's items, read once."""
    if iter(calibration) is not calibration:
        return calibration
    try:
        if calibration not in _MATERIALIZED:
            _MATERIALIZED[calibration] = tuple(calibration)
        return _MATERIALIZED[calibration]
    except TypeError:  # not weak-referenceable: only the first graph compiled gets its items
        return tuple(calibration)


def _bool(options, key, default: bool = False) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be True or False, got {value!r}")
    return value
