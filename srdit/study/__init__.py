"""The study layer: study YAML -> design -> Ray Tune trials -> MLflow runs -> StudyResults.

Modules: spec (schema), designs (cells, trials, aliases), preflight (inputs, metrics and resources checked before
anything starts), runner (the Ray Tune driver), trial (what runs inside a
Ray worker: TrialContext, execute_trial), data_parallel (Ray Train), tracking (MLflow run tree), results (MLflow ->
srdit.analysis.results.StudyResults), sizing (the plan's power: what the design detects), preprocess_ray (preprocessing parts as Ray tasks), command (the `srdit study`
and `srdit ui` commands). Heavy imports (ray, mlflow, torch) live in runner / trial / tracking / results only.
"""

from srdit.study.designs import Plan, TrialSpec, plan_study
from srdit.study.spec import StudySpec, load_study, study_from_dict

__all__ = ["StudySpec", "load_study", "study_from_dict", "Plan", "TrialSpec", "plan_study"]
