"""What a study report shows, fitted once before anything is drawn: every metric's analysis and the primary metric's
effects over training. The page (`page.render_report`) renders a `ReportFit` and fits nothing, as statsmodels'
`summary()` renders a fitted result and never refits the model.

This module must not import torch, ray or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from srdit.analysis.effects import Analysis, AnalysisError, AnalysisFailure, analyze_study
from srdit.analysis.over_steps import OverSteps, study_over_steps
from srdit.analysis.results import StudyResults

__all__ = ["ReportFit", "fit_report"]


@dataclass(frozen=True)
class ReportFit:
    """The inputs of a study report: the results table and the analyses fitted on it.

    `analyses` maps each analysed metric (the primary first) to its `effects.Analysis`, or an `AnalysisFailure`
    with the one-line reason it could not be analysed. `over_steps` is the primary metric analysed at every
    evaluated training step (`over_steps.study_over_steps`), an `AnalysisFailure` when that failed, and None when the
    primary metric itself could not be analysed."""

    results: StudyResults
    analyses: dict[str, Analysis | AnalysisFailure]
    over_steps: OverSteps | AnalysisFailure | None = None

    def __post_init__(self) -> None:
        if self.results.metric not in self.analyses:
            raise ValueError(
                f"the report's analyses lack the primary metric '{self.results.metric}' "
                f"(have: {', '.join(self.analyses) or 'none'})"
            )

    @property
    def primary(self) -> Analysis | AnalysisFailure:
        """The primary metric's analysis."""
        return self.analyses[self.results.metric]


def fit_report(
    results: StudyResults, *, alpha: float = 0.05, threshold: float = 0.0, bootstrap: bool = True
) -> ReportFit:
    """Fit everything the report page shows: `effects.analyze_study` (every metric, at level `alpha`, practical
    antagonism `threshold` in gain units, seed-bootstrap intervals where calibrated when `bootstrap`) and, when the
    primary metric could be analysed, `over_steps.study_over_steps` (an `AnalysisFailure` when it raises
    AnalysisError). Raises what `analyze_study` raises."""
    analyses = analyze_study(results, alpha=alpha, threshold=threshold, bootstrap=bootstrap)
    over_steps: OverSteps | AnalysisFailure | None = None
    if isinstance(analyses[results.metric], Analysis):
        try:
            over_steps = study_over_steps(results, alpha=alpha, threshold=threshold, bootstrap=bootstrap)
        except AnalysisError as e:
            over_steps = AnalysisFailure(metric=results.metric, direction=results.direction, error=str(e))
    return ReportFit(results, analyses, over_steps)
