"""`qcompile.diff`: what the pass did to each graph and where the accuracy goes, per linear and for the model,
with the smallest exclude list (greedy) that reaches a target output SQNR."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch.utils import _pytree as pytree

from .. import released
from ..backend import released_names
from ..options import QuantOptions
from ..passes.records import WeightRef
from ..quant.metrics import sqnr_db
from .capture import CapturingBackend, GraphCapture, LinearSite
from .html import write_html
from .records import GraphReport, LayerReport, ReportData, Suggestion
from .table import format_report

DEFAULT_TARGET_SQNR_DB = 30.0


class Report(ReportData):
    """The report: its data (records.py), printed as the terminal table (`str`) or written as one HTML page."""

    def __str__(self) -> str:
        return format_report(self)

    def to_html(self, path) -> None:
        write_html(self, path)


# --- measuring ----------------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _outputs_sqnr(reference, approx) -> float:
    """SQNR over every floating-point tensor of two output structures, together."""
    ref = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in pytree.tree_leaves(approx) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not ref or len(ref) != len(out):
        raise ValueError(f"qcompile.diff: the model's outputs hold {len(ref)} float tensors in float and "
                         f"{len(out)} quantized; expected the same, at least one")
    return sqnr_db(torch.cat([t.detach().flatten().double() for t in ref]),
                   torch.cat([t.detach().flatten().double() for t in out]))


def _layer_report(capture: GraphCapture, site: LinearSite) -> LayerReport:
    rec = site.record
    float_bytes = _nbytes(site.weight.tensor)
    layer = LayerReport(graph=capture.index, module=rec.module, weight=rec.weight, out_features=rec.out_features,
                        in_features=rec.in_features, scheme=rec.scheme, reason=rec.reason,
                        weight_bytes=float_bytes, float_weight_bytes=float_bytes, fused_into=rec.fused_into,
                        not_fused=rec.not_fused)
    if not site.quantized:
        return layer
    layer.weight_bytes = round(sum(_nbytes(t) * capture.constant_share(name, rec.weight)
                                   for name, t in capture.result.constants))
    with torch.no_grad():
        w = capture.float_weight(site)
        layer.weight_sqnr_db = sqnr_db(w, capture.effective_weight(site))
        quantized = [capture.quantized_linear(site, values.__getitem__) for values in site.float_inputs]
    ref = torch.cat([y.flatten() for y in site.float_outputs])
    out = torch.cat([y.flatten() for y in quantized])
    layer.output_sqnr_db = sqnr_db(ref, out)
    layer.max_abs_error = (ref.double() - out.double()).abs().max().item()
    return layer


class ModelUnderTest:
    """Runs the model (or one graph) on fixed inputs with a chosen set of modules left in float.
    run(quantized) executes it with the linears `quantized(site)` picks quantized and returns the outputs."""

    def __init__(self, run: Callable[[Callable[[LinearSite], bool]], Any], reference,
                 progress: Callable[[str], None] | None = None):
        self.run, self.reference = run, reference
        self.progress = progress or (lambda message: None)

    def output_sqnr(self, float_modules: frozenset[str] = frozenset()) -> float:
        with torch.no_grad():
            return _outputs_sqnr(self.reference, self.run(lambda site: site.record.module not in float_modules))


def suggest_exclude(model: ModelUnderTest, ranked: list[str], all_quantized_db: float,
                    target_db: float) -> Suggestion:
    """Greedy: the shortest prefix of `ranked` (most harmful layer first) whose modules, left in float, reach the
    target — found by binary search over prefix lengths (leaving more in float rarely lowers the SQNR; the found
    prefix is checked by a run): about log2(len(ranked)) model runs."""
    if all_quantized_db >= target_db or not ranked:
        return Suggestion(target_db, [], all_quantized_db, all_quantized_db >= target_db)
    reached: dict[int, float] = {}

    def sqnr_with(k: int) -> float:
        if k not in reached:
            model.progress(f"exclude search: the {k} most harmful in float")
            reached[k] = model.output_sqnr(frozenset(ranked[:k]))
        return reached[k]

    lo, hi = 1, len(ranked)
    if sqnr_with(hi) < target_db:
        return Suggestion(target_db, ranked, sqnr_with(hi), False)
    while lo < hi:
        mid = (lo + hi) // 2
        if sqnr_with(mid) >= target_db:
            hi = mid
        else:
            lo = mid + 1
    return Suggestion(target_db, ranked[:lo], sqnr_with(lo), sqnr_with(lo) >= target_db)


def build_report(captures: list[GraphCapture], model: ModelUnderTest, options: QuantOptions,
                 target_sqnr_db: float | None, inputs: str) -> Report:
    graphs = []
    for capture in captures:
        layers = [_layer_report(capture, site) for site in capture.sites]
        graphs.append(GraphReport(capture.index, capture.before, capture.after, capture.diff, layers))
    all_layers = [layer for g in graphs for layer in g.layers]
    seen, total = set(), 0
    for layer in all_layers:  # a weight two linears share (tied) counts once
        if layer.weight not in seen:
            seen.add(layer.weight)
            total += layer.weight_bytes
    for layer in all_layers:
        layer.weight_share = layer.weight_bytes / total if total else 0.0
    all_quantized_db = model.output_sqnr()
    suggestion = None
    if target_sqnr_db is not None:
        # rank by each linear's own output SQNR, worst first: the report has it, so ranking costs no model run
        # (one run per linear made the search unusable on real models); a reused module's worst use decides
        worst: dict[str, float] = {}
        for layer in all_layers:
            if layer.scheme is not None:
                worst[layer.module] = min(worst.get(layer.module, math.inf), layer.output_sqnr_db)
        ranked = sorted(worst, key=worst.get)
        suggestion = suggest_exclude(model, ranked, all_quantized_db, target_sqnr_db)
    return Report(options=_shown_options(options), graphs=graphs, output_sqnr_db=all_quantized_db,
                  suggestion=suggestion, inputs=inputs)


def _shown_options(options: QuantOptions) -> dict:
    """The options that decide what the report shows (not keep_float_weights, not calibration data)."""
    shown = {}
    for key, value in vars(options).items():
        if key in ("keep_float_weights", "calibration") or value in (None, ()):
            continue
        if key == "act_order" and options.algorithm != "gptq":
            continue
        shown[key] = list(value) if isinstance(value, tuple) else value
    return shown


def describe_inputs(args, kwargs) -> str:
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor) else
             type(t).__name__ for t in pytree.tree_leaves((args, kwargs))]
    return ", ".join(parts)


def diff(model, args, options: Mapping[str, Any] | QuantOptions, kwargs: Mapping[str, Any] | None = None,
         target_sqnr_db: float | None = DEFAULT_TARGET_SQNR_DB,
         progress: Callable[[str], None] | None = None) -> Report:
    """Quantize `model` as `torch.compile(model, backend="qcompile", options=options)` would, without Inductor
    and without touching the model, run it on `args`/`kwargs`, and report per graph and per linear what the
    pass did and how much error each linear adds. target_sqnr_db=None skips the exclude suggestion (which runs
    the model once per quantized linear); progress(message) hears about those runs."""
    if not isinstance(args, (tuple, list)):
        args = (args,)
    kwargs = dict(kwargs or {})
    opts = QuantOptions.from_dict(options).replace(keep_float_weights=True)
    if isinstance(model, torch.nn.Module):  # else its eager (float) reference would run the quantized weights
        gone = released_names(WeightRef(name, p) for name, p in model.named_parameters())
        if gone:
            raise released.float_weights_released("qcompile.diff (it compares the model with its float self)", gone)
    backend = CapturingBackend(opts)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        reference = model(*args, **kwargs)
        compiled(*args, **kwargs)  # captures every graph and records each linear's float input and output
    if not backend.graphs:
        raise ValueError("qcompile.diff: torch.compile captured no graph from the model on these inputs")

    def run(quantized):
        backend.quantized = quantized
        return compiled(*args, **kwargs)

    return build_report(backend.graphs, ModelUnderTest(run, reference, progress), opts, target_sqnr_db,
                        describe_inputs(args, kwargs))
