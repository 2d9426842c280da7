"""The study runtime: a plan (`srdit.study`) run on Ray Tune and recorded in MLflow.

Modules: state (`StudyState`: the study's paths under --state, tracking URI, experiment, its runs), jobs (the typed
jobs the driver hands to the workers), driver (the Ray Tune driver: `run_study`), worker (what runs inside a Ray
trial: `TrialContext`, `execute_trial`, `execute_group`), data_parallel (a trial on several Ray Train workers),
shipping (plugin code shipped to every node; a worker's code checked against the driver's),
tracking (the MLflow run tree, and each trial folder's copy of its run), store (the embedded SQLite store:
built atomically, checked before use), repair (the records rebuilt from the trial folders), reuse (content keys; finished runs adopted across studies), lock (one driver per
study), console (what `study run` prints: srdit's lines, the live view; the libraries' output in a log file),
occupancy (trials sharing a machine), bench (the controlled throughput measurement), results and export
(MLflow -> `srdit.analysis.results.StudyResults`, CSV), ray_parts / preprocess_ray / teacher_cache_ray (jobs split
into Ray tasks), mlflow_app (the tracking server's app), kuberay (a study's KubeRay RayJob manifest). Its commands (`srdit study ...`, `srdit ui`) live in
`srdit.commands`.
Heavy imports (ray, mlflow, torch) are lazy where a module is imported by a command that may not need them.
"""
