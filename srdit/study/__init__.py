"""The study layer: pure planning, study YAML -> StudySpec -> Plan (cells, trials, trainings). No Ray, no MLflow.

Modules: spec (schema), designs (cells, trials, the plan's trainings, aliases), preflight (inputs, metrics and
resources checked before anything starts), sizing (the plan's power: what the design detects), compute (the plan's
accelerator-time estimate). Running a plan (Ray Tune, MLflow) is the runtime's (`srdit.runtime`).
"""

from srdit.study.designs import Plan, TrialSpec, plan_study
from srdit.study.spec import StudySpec, load_study, study_from_dict

__all__ = ["StudySpec", "load_study", "study_from_dict", "Plan", "TrialSpec", "plan_study"]
