"""The debugging report as a plain-text table for the terminal (`str(report)`)."""
from __future__ import annotations

import math
from typing import Sequence

from .records import ReportData, Suggestion


def format_db(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.1f}"


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; `right` aligns numbers."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def fused_groups(layers) -> dict[str, list]:
    """Sibling linears fused into one, in column order: {fused linear's name: its members' layer reports}."""
    groups: dict[str, list] = {}
    for layer in layers:
        if layer.fused_into is not None:
            groups.setdefault(layer.fused_into, []).append(layer)
    return groups


SHOWN_EXCLUDES = 12  # a longer exclude list is in the HTML page and report.suggestion


def suggestion_text(s: Suggestion, n_quantized: int) -> str:
    if not s.exclude:
        return f"target {s.target_sqnr_db:g} dB: reached with every linear quantized"
    if not s.met:
        return (f"target {s.target_sqnr_db:g} dB: not reached even with all {n_quantized} linears in float "
                f"({format_db(s.reached_sqnr_db)} dB)")
    return (f"target {s.target_sqnr_db:g} dB: leave {len(s.exclude)} of {n_quantized} quantized linears in float "
            f"(then {format_db(s.reached_sqnr_db)} dB)")


def format_report(report: ReportData) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in report.options.items() if k != "keep_float_weights")
    out = [f"qcompile diff: {opts}", f"inputs: {report.inputs}" if report.inputs else ""]
    header = ("graph", "module", "N x K", "scheme", "weight SQNR dB", "output SQNR dB", "max abs err", "bytes",
              "share")
    right = (True, False, True, False, True, True, True, True, True)
    rows = []
    for layer in report.layers:
        rows.append((
            layer.graph, layer.module, f"{layer.out_features} x {layer.in_features}",
            layer.scheme or "float", format_db(layer.weight_sqnr_db), format_db(layer.output_sqnr_db),
            "-" if layer.max_abs_error is None else f"{layer.max_abs_error:.3g}",
            format_bytes(layer.weight_bytes), f"{100 * layer.weight_share:.1f}%"))
    out.append(format_table(header, rows, right))
    for g in report.graphs:
        for layer in g.layers:
            if layer.scheme is None:
                out.append(f"  graph {g.index} {layer.module}: stays in float: {layer.reason}")
        for fused, members in fused_groups(g.layers).items():
            widths = "+".join(str(m.out_features) for m in members)
            out.append(f"  graph {g.index} {fused}: {len(members)} linears fused into one ({widths} x "
                       f"{members[0].in_features})")
        for layer in g.layers:
            if layer.not_fused is not None:
                out.append(f"  graph {g.index} {layer.module}: not fused with its siblings: {layer.not_fused}")
    n_quant = sum(layer.scheme is not None for layer in report.layers)
    out.append(f"{len(report.graphs)} graph(s), {len(report.layers)} linears, {n_quant} quantized, "
               f"{len(report.layers) - n_quant} in float")
    out.append(f"output SQNR (all quantized): {format_db(report.output_sqnr_db)} dB")
    s = report.suggestion
    if s is not None:
        out.append(suggestion_text(s, n_quant))
        if s.exclude:
            shown = s.exclude[:SHOWN_EXCLUDES]
            more = f"  # ... and {len(s.exclude) - len(shown)} more: report.suggestion.exclude" \
                if len(s.exclude) > len(shown) else ""
            out.append(f"  options={{'exclude': {shown!r}}}{more}")
    return "\n".join(line for line in out if line)
