"""The debugging report as one self-contained HTML page: inline CSS, an inline SVG bar chart of each linear's
error, the layer table and each graph's diff. No scripts, no network."""
from __future__ import annotations

import math
from html import escape
from pathlib import Path

from .records import LayerReport, ReportData
from .table import SHOWN_EXCLUDES, format_bytes, format_db, suggestion_text

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: left; background: #f3f3f6; }
pre.diff { background: #f7f7f9; padding: 10px; overflow-x: auto; font-size: 12px; line-height: 1.35; }
.add { background: #dff5df; display: block; } .del { background: #fbe0e0; display: block; }
.hunk { color: #6a5acd; display: block; } .summary { font-size: 15px; }
.bad { color: #b3261e; } .warn { color: #9a6200; } .good { color: #1e7b34; }
"""

_BAR_HEIGHT, _LABEL_WIDTH, _CHART_WIDTH = 18, 260, 520


def _grade(db: float | None) -> str:
    if db is None:
        return "float"
    return "bad" if db < 20 else "warn" if db < 30 else "good"


_COLORS = {"bad": "#d93025", "warn": "#f29900", "good": "#34a853", "float": "#9aa0a6"}


def bar_chart(layers: list[LayerReport]) -> str:
    """Horizontal bars: output SQNR per linear (colour by grade), a black tick at its weight SQNR."""
    finite = [v for layer in layers for v in (layer.output_sqnr_db, layer.weight_sqnr_db)
              if v is not None and math.isfinite(v)]
    top = max([10.0, *finite]) * 1.1
    scale = _CHART_WIDTH / top
    height = _BAR_HEIGHT * len(layers) + 46
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LABEL_WIDTH + _CHART_WIDTH + 90}" '
             f'height="{height}" font-family="system-ui, sans-serif" font-size="12">']
    for tick in range(0, int(top) + 1, 10):
        x = _LABEL_WIDTH + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 36}" stroke="#e3e3e3"/>'
                     f'<text x="{x:.1f}" y="{height - 20}" text-anchor="middle" fill="#666">{tick}</text>')
    parts.append(f'<text x="{_LABEL_WIDTH + _CHART_WIDTH / 2}" y="{height - 4}" text-anchor="middle" '
                 f'fill="#333">SQNR dB (bar: output, tick: weight; grey: left in float)</text>')
    for i, layer in enumerate(layers):
        y = i * _BAR_HEIGHT + 2
        db = layer.output_sqnr_db
        width = _CHART_WIDTH if db is None or not math.isfinite(db) else max(db, 0) * scale
        label = f"g{layer.graph} {layer.module}"
        parts.append(f'<text x="{_LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end">{escape(label)}</text>'
                     f'<rect x="{_LABEL_WIDTH}" y="{y}" width="{width:.1f}" height="{_BAR_HEIGHT - 4}" '
                     f'fill="{_COLORS[_grade(db)]}"><title>{escape(label)}: {format_db(db)} dB</title></rect>'
                     f'<text x="{_LABEL_WIDTH + width + 4:.1f}" y="{y + 12}" fill="#333">'
                     f'{format_db(db) if layer.scheme else "float"}</text>')
        w_db = layer.weight_sqnr_db
        if w_db is not None and math.isfinite(w_db):
            x = _LABEL_WIDTH + max(w_db, 0) * scale
            parts.append(f'<line x1="{x:.1f}" y1="{y - 1}" x2="{x:.1f}" y2="{y + _BAR_HEIGHT - 3}" '
                         f'stroke="#000" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _diff_block(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        css = ("add" if line.startswith("+") and not line.startswith("+++") else
               "del" if line.startswith("-") and not line.startswith("---") else
               "hunk" if line.startswith("@@") else None)
        text = escape(line)
        lines.append(f'<span class="{css}">{text}</span>' if css else text + "\n")
    return '<pre class="diff">' + "".join(lines) + "</pre>"


def _fusion_note(layer: LayerReport) -> str:
    if layer.fused_into is not None:
        return f"fused into {layer.fused_into}"
    return f"not fused: {layer.not_fused}" if layer.not_fused is not None else ""


def _layer_table(layers: list[LayerReport]) -> str:
    head = ("graph", "module", "N x K", "scheme", "weight SQNR dB", "output SQNR dB", "max abs err", "bytes",
            "share", "why in float / fused")
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for layer in layers:
        cells = [(layer.graph, True), (escape(layer.module), False),
                 (f"{layer.out_features} x {layer.in_features}", True), (layer.scheme or "float", False),
                 (format_db(layer.weight_sqnr_db), True),
                 (f'<span class="{_grade(layer.output_sqnr_db)}">{format_db(layer.output_sqnr_db)}</span>', True),
                 ("-" if layer.max_abs_error is None else f"{layer.max_abs_error:.3g}", True),
                 (format_bytes(layer.weight_bytes), True), (f"{100 * layer.weight_share:.1f}%", True),
                 (escape(layer.reason or _fusion_note(layer)), False)]
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>"
                                     for c, num in cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def render_html(report: ReportData) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in report.options.items() if k != "keep_float_weights")
    summary = [f"Output SQNR with every selected linear quantized: <b>{format_db(report.output_sqnr_db)} dB</b>"]
    s = report.suggestion
    if s is not None:
        n_quantized = sum(layer.scheme is not None for layer in report.layers)
        summary.append(escape(suggestion_text(s, n_quantized)) + (":" if s.exclude else ""))
        if s.exclude:
            code = f"<code>{escape(repr({'exclude': s.exclude}))}</code>"
            summary.append(code if len(s.exclude) <= SHOWN_EXCLUDES else
                           f"<details><summary>options (exclude {len(s.exclude)} linears)</summary>{code}</details>")
    body = [f"<h1>qcompile diff: {escape(opts)}</h1>",
            f"<p>Inputs: {escape(report.inputs)}</p>" if report.inputs else "",
            "".join(f'<p class="summary">{line}</p>' for line in summary),
            "<h2>Error per linear</h2>", bar_chart(report.layers),
            "<h2>Linears</h2>", _layer_table(report.layers)]
    for g in report.graphs:
        body.append(f"<h2>Graph {g.index}: the pass as a diff</h2>")
        body.append(_diff_block(g.diff) if g.diff else "<p>The pass changed nothing in this graph.</p>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>qcompile diff</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_html(report: ReportData, path) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
