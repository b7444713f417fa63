"""The randomized differential suite (tests/test_randomized.py): its seeded generator, the float64 reference and
each scheme's bound.

One seed draws every case (QCOMPILE_FUZZ_SEED overrides the default). A *group* is what one compile serves: a
scheme with drawn options (bits, group size, granularity), a few linears of random [N, K] and dtype (odd sizes;
siblings on one input; a K off the scheme's group / block size, which must stay in float with the warning naming
it), and a list of calls, each with its own M (1..17 and larger) and data pattern (outliers, all-zero rows or tensors,
NaN / inf in activations; all-zero weight rows and groups and weight outliers are drawn per linear). A *case* is
one linear's output at one call. Each is compared with the float64 product of the operands the reference
numerics (`qcompile.quant`) define: the weight dequantized in float64 from the scheme's stored tensors and, for
dynamic schemes, the activation quantized by the reference ops and dequantized in float64.

Layers (what runs a group; each case says which):
  compiled  torch.compile(backend="qcompile") on CPU through Inductor, M dynamic: the generated C++ kernels for
            intx_weight_only / int8_dynamic_intx, Inductor-decomposed reference ops for every other scheme
  eager-after-compile  the compiled group's module called eagerly after its first compile (released linears run
            the scheme's reference ops on the quantized tensors, unfit ones in float): the first call's cases
  pass      the pass's rewritten graph run eagerly on the reference ops (Dynamo + pass, no Inductor): cheap, so
            every dtype in each group
  triton    the CUDA lowering's fused-linear body (`linear.run_linear`: activation kernel + GEMM template) on CPU
            tensors under TRITON_INTERPRET=1, one kernel config drawn per call from the autotuner's candidates
On CUDA (`pytest -m gpu`) the same generator draws real shapes for `compiled` (Triton lowering) and `triton`.
"""
from __future__ import annotations

import collections
import math
import os
import random
from dataclasses import dataclass

import torch

from qcompile.options import QuantOptions
from qcompile.quant import microscaling, packing
from qcompile.schemes import SCHEMES

DEFAULT_SEED = 23
SEED = int(os.environ.get("QCOMPILE_FUZZ_SEED", DEFAULT_SEED))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
X_PATTERNS = ("normal", "outliers", "zero_rows", "all_zero", "nan", "inf")
W_PATTERNS = ("normal", "outliers", "zero_rows", "zero_group")

# cases run and failed, per layer, for the session's one-line summary (tests/conftest.py prints it)
STATS: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class LinearDraw:
    N: int
    K: int
    dtype: str  # the activation dtype (and the layer's)
    bias: bool
    weight_pattern: str
    fits: bool  # False: K takes no group / block of the scheme, so the layer must stay in float with a warning
    seed: int
    input_of: int | None = None  # a sibling: reads the input of that linear (fuse_siblings may fuse them)


@dataclass(frozen=True)
class CallDraw:
    M: int
    pattern: str
    seed: int


@dataclass(frozen=True)
class Group:
    layer: str
    scheme: str
    options: tuple[tuple[str, object], ...]
    linears: tuple[LinearDraw, ...]
    calls: tuple[CallDraw, ...]
    device: str = "cpu"

    @property
    def id(self) -> str:
        opts = "".join(f"-{k[0]}{v}" for k, v in self.options)
        return f"{self.layer}-{self.scheme}{opts}"

    def quant_options(self) -> QuantOptions:
        return QuantOptions.from_dict({"scheme": self.scheme, **dict(self.options)})

    def case_name(self, linear: LinearDraw, call: CallDraw) -> str:
        return (f"[{self.id} {linear.dtype} N={linear.N} K={linear.K} bias={linear.bias} "
                f"w={linear.weight_pattern}{'' if linear.fits else ' unfit'}"
                f"{'' if linear.input_of is None else f' sibling of {linear.input_of}'} M={call.M} x={call.pattern} "
                f"seed={SEED}]")


# --- the generator -------------------------------------------------------------------------------------------

def _k_unit(scheme: str, options: dict) -> int:
    """What K must be a multiple of for the scheme to take the layer (1: any K)."""
    s = SCHEMES[scheme]
    return options["group_size"] if s.group_sizes else s.k_multiple


def _draw_options(rng: random.Random, scheme: str, real: bool) -> dict:
    s = SCHEMES[scheme]
    options = {}
    if s.group_sizes:  # small groups at CPU sizes (a few groups per row), every size at real ones
        options["group_size"] = rng.choice(s.group_sizes if real else s.group_sizes[:2])
    if s.bits:
        options["bits"] = rng.choice(s.bits)
    if s.granularities:
        options["granularity"] = rng.choice(s.granularities)
    return options


def _draw_linear(rng: random.Random, scheme: str, options: dict, dtype: str, fits: bool, real: bool,
                 triton: bool = False) -> LinearDraw:
    unit = _k_unit(scheme, options)
    if triton:  # the Triton kernels take K in multiples of 32
        unit = math.lcm(unit, 32)
    if real:
        N, K = rng.choice((1024, 2048, 4096, 6144)) + rng.choice((0, 0, 8, 24)), rng.choice((1024, 2048, 4096))
    else:
        N = rng.randint(1, 72)
        K = unit * rng.randint(1, max(1, 256 // unit)) if unit > 1 else rng.randint(1, 300)
    if not fits:
        K = unit * rng.randint(0, 3) + rng.randint(1, unit - 1)
    return LinearDraw(N, K, dtype, rng.random() < 0.6, rng.choice(W_PATTERNS), fits, rng.getrandbits(31))


def _sibling_of(rng: random.Random, index: int, linear: LinearDraw) -> LinearDraw:
    """Another linear on the same input (q/k/v-like): its own N, bias and weights."""
    return LinearDraw(rng.randint(1, 72), linear.K, linear.dtype, rng.random() < 0.6, rng.choice(W_PATTERNS),
                      linear.fits, rng.getrandbits(31), input_of=index)


def _draw_calls(rng: random.Random, count: int, m_one: bool, real: bool) -> tuple[CallDraw, ...]:
    """`count` calls with M >= 2 (small M from 2..17, the last one larger), then M = 1 if `m_one` (a recompile:
    Dynamo specializes M = 1, so it comes last, after the graph with a symbolic M)."""
    ms = [rng.randint(2, 17) for _ in range(count - 1)] + [rng.choice((300, 1000)) if real else rng.randint(18, 80)]
    if m_one:
        ms.append(1)
    return tuple(CallDraw(M, rng.choice(X_PATTERNS), rng.getrandbits(31)) for M in ms)


def draw_groups(seed: int = SEED, device: str = "cpu") -> list[Group]:
    """Every group of one run, per scheme:
      compiled: a fitting linear of a drawn dtype, a sibling reading its input (fused by fuse_siblings where the
                scheme allows) and (where a K can misfit) an unfit linear of another dtype, 12 calls;
                M = 1 (a second Inductor compile) in about a third of them. Each fitting linear costs ~2-3 s of
                CPU in Inductor and the C++ compiler (cold cache): the budget of the whole layer.
      pass:     a fitting linear per dtype, a sibling of one, an unfit linear, 6 calls with M = 1
      triton:   one linear (bf16 / fp16, K a multiple of 32), 7 calls with M = 1, each its own kernel config
    On CUDA (real shapes): compiled and triton groups, bf16 / fp16."""
    rng = random.Random(seed)
    real = device != "cpu"
    groups = []
    for scheme in SCHEMES:
        s = SCHEMES[scheme]
        can_misfit = bool(s.group_sizes) or s.k_multiple > 1
        dtypes = list(DTYPES) if not real else ["bfloat16", "float16"]
        rng.shuffle(dtypes)
        options = _draw_options(rng, scheme, real)
        linears = [_draw_linear(rng, scheme, options, dtypes[0], True, real)]
        linears.append(_sibling_of(rng, 0, linears[0]))
        if can_misfit:
            linears.append(_draw_linear(rng, scheme, options, dtypes[1], False, real))
        groups.append(Group("compiled", scheme, tuple(options.items()), tuple(linears),
                            _draw_calls(rng, 12 if not real else 4, rng.random() < 0.3 or real, real), device))
        if not real:
            options = _draw_options(rng, scheme, real)
            linears = [_draw_linear(rng, scheme, options, dtype, True, real) for dtype in dtypes]
            linears.append(_sibling_of(rng, 1, linears[1]))
            if can_misfit:
                linears.append(_draw_linear(rng, scheme, options, rng.choice(dtypes), False, real))
            groups.append(Group("pass", scheme, tuple(options.items()), tuple(linears),
                                _draw_calls(rng, 5, True, real), device))
        options = _draw_options(rng, scheme, real)
        linear = _draw_linear(rng, scheme, options, rng.choice(("bfloat16", "float16")), True, real, triton=True)
        groups.append(Group("triton", scheme, tuple(options.items()), (linear,),
                            _draw_calls(rng, 6 if not real else 3, True, real), device))
    return groups


# --- data -------------------------------------------------------------------------------------------------------

def make_weight(linear: LinearDraw, group_size: int | None, device="cpu"):
    """(weight [N, K], bias [N] or None) in the linear's dtype, with its weight pattern."""
    dtype = DTYPES[linear.dtype]
    gen = torch.Generator().manual_seed(linear.seed)
    N, K = linear.N, linear.K
    w = torch.randn(N, K, generator=gen) * 0.05
    rows = torch.rand(N, generator=gen) < 0.25
    if linear.weight_pattern == "outliers":
        w = torch.where(torch.rand(N, K, generator=gen) < 0.01, w * 50, w)
    elif linear.weight_pattern == "zero_rows":
        w[rows] = 0
    elif linear.weight_pattern == "zero_group":  # one group (or a K slice) of some rows
        g = group_size or max(1, K // 4)
        start = g * int(torch.randint(0, max(1, K // g), (), generator=gen))
        w[rows, start:start + g] = 0
    bias = torch.randn(N, generator=gen) if linear.bias else None
    return w.to(device, dtype), None if bias is None else bias.to(device, dtype)


def make_activation(call: CallDraw, linear: LinearDraw, device="cpu") -> torch.Tensor:
    """x [M, K] in the linear's dtype with the call's pattern (the call's seed: a call's inputs are related)."""
    K, dtype = linear.K, DTYPES[linear.dtype]
    gen = torch.Generator().manual_seed(call.seed)
    M = call.M
    x = torch.randn(M, K, generator=gen)
    rows = torch.rand(M, generator=gen) < 0.3
    rows[int(torch.randint(0, M, (), generator=gen))] = True  # at least one row takes the pattern
    at = torch.randint(0, K, (M,), generator=gen)
    if call.pattern == "outliers":  # a few large values per row: the per-token scales stretch
        x = torch.where(torch.rand(M, K, generator=gen) < 0.02, x * 300, x)
    elif call.pattern == "zero_rows":
        x[rows] = 0
    elif call.pattern == "all_zero":
        x.zero_()
    elif call.pattern in ("nan", "inf"):
        value = float("nan") if call.pattern == "nan" else float("inf")
        signs = torch.where(torch.rand(M, generator=gen) < 0.5, -1.0, 1.0)
        x[rows, at[rows]] = value * signs[rows]
    return x.to(device, dtype)


# --- the float64 reference --------------------------------------------------------------------------------------

def _per_group(params: torch.Tensor, K: int) -> torch.Tensor:
    """Group parameters [N, K / g] repeated along K, float64."""
    return params.double().repeat_interleave(K // params.shape[1], dim=1)


def _unpacked(q: dict, bits: int, K: int) -> torch.Tensor:
    return packing.unpack_along_k(q["qweight"], bits, K).double()


def _fp4_values(codes: torch.Tensor) -> torch.Tensor:
    magnitude = torch.tensor(microscaling.FP4_VALUES, dtype=torch.float64, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def _e8m0(e: torch.Tensor) -> torch.Tensor:
    return torch.where(e == 255, torch.nan, torch.exp2(e.double() - microscaling.E8M0_BIAS))


def _intx_weight(q, o, K, bits, zero=None):
    mid = 1 << (bits - 1)
    z = mid if zero is None else _per_group(zero, K)
    return (_unpacked(q, bits, K) - z) * _per_group(q["scale"], K)


# scheme -> its weight dequantized in float64 from the stored tensors (q) with options o
WEIGHT_F64 = {
    "int8_weight_only": lambda q, o, K: q["qweight"].double() * q["scale"].double()[:, None],
    "int8_dynamic": lambda q, o, K: q["qweight"].double() * q["scale"].double()[:, None],
    "float8_weight_only": lambda q, o, K: q["qweight"].double() * q["scale"].double().reshape(-1, 1),
    "float8_dynamic": lambda q, o, K: q["qweight"].double() * q["scale"].double().reshape(-1, 1),
    "int4_weight_only": lambda q, o, K: ((_unpacked(q, 4, K) - 8) * _per_group(q["scale"], K)
                                         + _per_group(q["zero"], K)),
    "intx_weight_only": lambda q, o, K: _intx_weight(q, o, K, o.bits),
    "int8_dynamic_intx": lambda q, o, K: _intx_weight(q, o, K, o.bits),
    "float8_dynamic_int4": lambda q, o, K: _intx_weight(q, o, K, 4),
    "int8_dynamic_int4": lambda q, o, K: _intx_weight(q, o, K, 4, zero=q["zero"]),
    "codebook": lambda q, o, K: q["codebook"].double()[_unpacked(q, 4, K).long()] * q["scale"].double()[:, None],
    "mxfp8": lambda q, o, K: q["qweight"].double() * _per_group(_e8m0(q["scale"]), K),
    "nvfp4": lambda q, o, K: (_fp4_values(packing.unpack_along_k(q["qweight"], 4, K))
                              * _per_group(q["block_scale"], K)
                              * q["tensor_scale"].double()),
}


def _int8_sym(x, o):
    xq, scale = torch.ops.qcompile.quantize_int8_per_token(x)
    return xq.double() * scale.double()


def _int8_asym(x, o):
    xq, scale, zero = torch.ops.qcompile.quantize_int8_per_token_asym(x)
    return (xq.double() - zero.double()) * scale.double()


def _float8(granularity):
    def quantize(x, o):
        xq, scale = torch.ops.qcompile.quantize_float8(x, granularity or o.granularity)
        return xq.double() * scale.double()
    return quantize


def _mxfp8(x, o):
    xq, scale = microscaling.quantize_mxfp8(x)
    return xq.double() * _e8m0(scale).repeat_interleave(microscaling.MX_BLOCK, dim=-1)


def _nvfp4(x, o):
    packed, block_scale, tensor_scale = microscaling.quantize_nvfp4(x)
    values = _fp4_values(packing.unpack_along_k(packed, 4, x.shape[-1]))
    return (values * block_scale.double().repeat_interleave(microscaling.NVFP4_BLOCK, dim=-1)
            * tensor_scale.double())


# dynamic schemes -> the activation as the reference quantizes it, dequantized in float64
ACTIVATION_F64 = {
    "int8_dynamic": _int8_sym, "int8_dynamic_intx": _int8_asym, "int8_dynamic_int4": _int8_asym,
    "float8_dynamic": _float8(None), "float8_dynamic_int4": _float8("row"), "mxfp8": _mxfp8, "nvfp4": _nvfp4,
}

# Bounds. Each case's error is bounded elementwise relative to A = |x'| |w'|^T + |bias| (float64; x', w' the
# reference operands): c * eps(dtype) for rounding to the activation dtype, plus K * eps(float32) for float32
# accumulation (worst case; the CPU and Triton GEMMs accumulate in float32). c per scheme:
BOUND_DTYPE_ROUNDINGS = {
    # weight dequantized into the dtype (eps/2), output rounded to the dtype (eps/2)
    "int8_weight_only": 1, "float8_weight_only": 1, "int4_weight_only": 1, "intx_weight_only": 1, "codebook": 1,
    # exact integer / e4m3 products, scales applied in float32, output rounded to the dtype (eps/2) — 1 for
    # the float32 scale products
    "int8_dynamic": 1, "int8_dynamic_intx": 1, "int8_dynamic_int4": 1, "float8_dynamic": 1,
    "float8_dynamic_int4": 1,
    # emulated block formats: both operands dequantized into the dtype (eps/2 each; exact for mxfp8 outside
    # fp16's subnormals), output rounded (eps/2)
    "mxfp8": 2, "nvfp4": 2,
}
FLOAT_LINEAR_ROUNDINGS = 1  # a layer left in float: output rounding (eps/2) and the bias cast
EPS32 = torch.finfo(torch.float32).eps
# ... and over each case as a whole (Frobenius norm over its finite rows), where rounding errors of random sign
# add up like a random walk: c * eps * (|y| + R) with R[m, n] = sqrt(sum_k x'^2 w'^2), the errors' expected
# size being about eps/2 of that, and sqrt(K) * eps(float32) * R for the accumulation. NORMWISE_MARGIN covers
# the walk's spread; this one is about sqrt(K) tighter than the elementwise worst case.
NORMWISE_MARGIN = 2


def per_tensor_activation(scheme: str, options: QuantOptions) -> bool:
    """Whether one activation scale covers the whole input (then one NaN / inf reaches every output)."""
    return scheme == "nvfp4" or (scheme == "float8_dynamic" and options.granularity == "tensor")


@dataclass
class Expected:
    value: torch.Tensor  # float64 [M, N]
    bound: torch.Tensor  # float64 [M, N]: allowed |out - value| where finite
    nonfinite_rows: torch.Tensor  # bool [M]: rows whose outputs all read a NaN / inf
    exact: torch.Tensor  # bool [M, N]: every product zero, so the output is exactly the bias (or 0)
    bias: torch.Tensor  # float64 [N] (zeros without bias), cast to the dtype as the output is
    normwise_bound: float  # allowed Frobenius norm of out - value over the finite rows


def expected_output(scheme: str | None, options: QuantOptions | None, q: dict | None, x: torch.Tensor,
                    w: torch.Tensor, bias: torch.Tensor | None) -> Expected:
    """The float64 reference of one linear: quantized (scheme given, q its stored tensors) or left in float."""
    M, K = x.shape
    N = w.shape[0]
    dtype = x.dtype
    if scheme is None:
        wd, xd, roundings = w.double(), x.double(), FLOAT_LINEAR_ROUNDINGS
    else:
        wd = WEIGHT_F64[scheme](q, options, K)
        xd = ACTIVATION_F64[scheme](x, options) if scheme in ACTIVATION_F64 else x.double()
        roundings = BOUND_DTYPE_ROUNDINGS[scheme]
    b = torch.zeros(N, dtype=torch.float64, device=x.device) if bias is None else bias.double()
    row_finite = torch.isfinite(x).all(-1)
    nonfinite_rows = ~row_finite
    if scheme is not None and per_tensor_activation(scheme, options) and nonfinite_rows.any():
        nonfinite_rows = torch.ones_like(nonfinite_rows)
    xf = torch.where(nonfinite_rows[:, None], 0.0, xd)  # the finite rows' reference, NaN-free
    magnitude = xf.abs() @ wd.abs().t()
    eps = torch.finfo(dtype).eps
    bound = (roundings * eps + K * EPS32) * (magnitude + b.abs())
    bound += torch.finfo(dtype).tiny * K  # values in the subnormal range flush (fp16's starts at 6e-5)
    value = xf @ wd.t() + b
    walk = (xf.square() @ wd.square().t()).sqrt().norm().item()
    normwise = NORMWISE_MARGIN * (roundings * eps * (value.norm().item() + walk) + math.sqrt(K) * EPS32 * walk)
    normwise += torch.finfo(dtype).tiny * K * math.sqrt(value.numel())
    return Expected(value, bound, nonfinite_rows, (magnitude == 0) & ~nonfinite_rows[:, None], b, normwise)


def check(out: torch.Tensor, expected: Expected, shape, dtype) -> list[str]:
    """What is wrong with `out` (empty: nothing)."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        return [f"output {tuple(out.shape)} {out.dtype}, expected {tuple(shape)} {dtype}"]
    out = out.detach()
    problems = []
    rows = expected.nonfinite_rows
    if torch.isfinite(out[rows]).any():
        problems.append(f"finite outputs in rows {rows.nonzero().flatten().tolist()} that read a NaN/inf")
    finite_part = out[~rows].double()
    if not torch.isfinite(finite_part).all():
        bad = (~torch.isfinite(out.double()) & ~rows[:, None]).nonzero()[:4].tolist()
        problems.append(f"non-finite outputs at {bad} whose inputs are finite")
        return problems
    error = (out.double() - expected.value).abs()
    excess = torch.where(rows[:, None], 0.0, error - expected.bound)
    if (excess > 0).any():
        m, n = divmod(int(excess.argmax()), out.shape[1])
        problems.append(f"{int((excess > 0).sum())} outputs beyond the bound; worst at ({m}, {n}): got "
                        f"{out[m, n].item():.6g}, float64 reference {expected.value[m, n].item():.6g}, error "
                        f"{error[m, n].item():.3g} > bound {expected.bound[m, n].item():.3g}")
    normwise_error = torch.where(rows[:, None], 0.0, error).norm().item()
    if normwise_error > expected.normwise_bound:
        problems.append(f"normwise error {normwise_error:.3g} > {expected.normwise_bound:.3g} (relative to the "
                        f"float64 reference's norm {expected.value.norm().item():.3g})")
    exact = expected.exact
    want = expected.bias.to(dtype).expand_as(out)
    if exact.any() and not torch.equal(out[exact], want[exact]):
        problems.append(f"outputs whose every product is zero differ from the bias (or 0) at "
                        f"{(exact & (out != want)).nonzero()[:4].tolist()}")
    return problems


def record(layer: str, problems: list[str]) -> None:
    STATS[f"{layer} cases"] += 1
    STATS[f"{layer} failures"] += bool(problems)


def summary(stats: collections.Counter = STATS) -> str:
    layers = sorted({k.split()[0] for k in stats})
    parts = [f"{layer} {stats[layer + ' cases']} ({stats[layer + ' failures']} failed)" for layer in layers]
    total, failed = sum(stats[f"{x} cases"] for x in layers), sum(stats[f"{x} failures"] for x in layers)
    return f"randomized differential suite (seed {SEED}): {total} cases, {failed} failures — " + ", ".join(parts)
