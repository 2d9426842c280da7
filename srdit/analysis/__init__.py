"""Analysis and reports: effects, synergy and incompatibility from a tidy results table; plotly dashboards.

Imports only pandas, numpy, scipy, statsmodels and plotly (never torch, ray or mlflow)."""

from srdit.analysis.effects import OK_STATUSES, AnalysisError, analyze, shapley_values

__all__ = ["AnalysisError", "OK_STATUSES", "analyze", "shapley_values"]
