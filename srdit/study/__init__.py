"""The study layer: study YAML -> design -> Ray Tune trials -> MLflow runs -> StudyResults.

Modules: spec (schema), designs (cells, trials, aliases), runner (Ray Tune), tracking (MLflow run tree),
results (MLflow -> StudyResults), command (the `srdit study`, `srdit report`, `srdit ui` commands).
Heavy imports (ray, mlflow, torch) live in runner / tracking / results only.
"""

from srdit.study.designs import Plan, TrialSpec, plan_study
from srdit.study.spec import StudySpec, load_study, study_from_dict

__all__ = ["StudySpec", "load_study", "study_from_dict", "Plan", "TrialSpec", "plan_study"]
