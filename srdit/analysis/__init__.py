"""Analysis and reports: effects, synergy and incompatibility from a tidy results table; plotly dashboards.

Modules: results (the study -> analysis contract: StudyResults), effects (the statistics: `analyze` -> `Analysis`),
figures (plotly figures), page (the HTML report and index), records (RECORDS.md), command (`srdit analyze`).
Imports only pandas, numpy, scipy, statsmodels, plotly and the config layer (never torch, ray or mlflow)."""

from srdit.analysis.effects import OK_STATUSES, Analysis, AnalysisError, AnalysisFailure, Options, analyze, shapley_values

__all__ = ["AnalysisError", "OK_STATUSES", "Analysis", "AnalysisFailure", "Options", "analyze", "shapley_values"]
