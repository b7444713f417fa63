"""Graph-diff debugging: what the linear pass did to each graph and how much error each linear adds."""
from .report import DEFAULT_TARGET_SQNR_DB, GraphReport, LayerReport, Report, Suggestion, diff  # noqa: F401

__all__ = ["diff", "Report", "GraphReport", "LayerReport", "Suggestion", "DEFAULT_TARGET_SQNR_DB"]
