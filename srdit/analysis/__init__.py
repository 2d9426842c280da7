"""Analysis and reports: effects, synergy and incompatibility from a tidy results table; plotly dashboards.

Modules: results (the study -> analysis contract: StudyResults), effects (the statistics: `analyze` -> `Analysis`),
over_steps (`analyze` at every evaluated training step -> `OverSteps`), figures (plotly figures), page (the HTML
report and index), records (RECORDS.md), reading (a results table from a CSV / parquet / JSON file, as `srdit
analyze` reads it), power (what a design detects, for `srdit study plan`).
Imports only pandas, numpy, scipy, statsmodels, plotly and the config layer (never torch, ray or mlflow).
The package itself imports nothing, so that the study layer reads `srdit.analysis.results` without the statistics."""
