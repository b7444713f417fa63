"""The debugging report's data: per linear, per graph, and the exclude suggestion; what table.py and html.py
render and report.py measures."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LayerReport:
    graph: int
    module: str
    weight: str
    out_features: int
    in_features: int
    scheme: str | None  # None: stays in float
    reason: str | None  # why it stays in float
    weight_bytes: int  # as compiled: the quantized tensors, or the float weight when skipped
    float_weight_bytes: int
    weight_share: float = 0.0  # of all linears' weight bytes as compiled
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None  # its quantized output vs its float output, same float input
    max_abs_error: float | None = None
    fused_into: str | None = None  # the one linear its siblings and it became (sibling fusion)
    not_fused: str | None = None  # why it stays a linear of its own although a sibling reads the same input


@dataclass
class GraphReport:
    index: int
    before: str  # the aten graph before the pass, as readable Python
    after: str
    diff: str  # unified diff before -> after
    layers: list[LayerReport]
    output_sqnr_db: float | None = None  # this graph's outputs, all linears quantized


@dataclass
class Suggestion:
    target_sqnr_db: float
    exclude: list[str]  # module names, ready for options={"exclude": ...}
    reached_sqnr_db: float
    met: bool


@dataclass
class ReportData:
    """The report's figures (`report.Report` adds its renderings: this module is what they render)."""
    options: dict
    graphs: list[GraphReport]
    output_sqnr_db: float  # the model's (or, from the backend hook, the graph's) output, all quantized
    suggestion: Suggestion | None = None
    inputs: str = ""  # what the figures were measured on

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for g in self.graphs for layer in g.layers]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def json_safe(obj):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
