"""The tracking server app that srdit starts (`mlflow server --app-name srdit`): MLflow's own app, whose UI opens
an experiment on its runs rather than on its GenAI pages.

MLflow 3's UI keeps the workflow it shows (GenAI or machine learning) in the browser's localStorage
(`mlflow.workflowType_v1`) and falls back to GenAI; no experiment tag or server option changes that fallback. This
app serves MLflow's index page with a one-line script that stores "machine_learning" when the browser has stored no
choice yet, so a researcher's first visit opens on Runs and a switch made later in the UI is kept. Everything else is
MLflow's app unchanged. Registered as the `mlflow.app` entry point `srdit` in pyproject.toml.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

WORKFLOW_KEY = "mlflow.workflowType_v1"
"The localStorage key MLflow's UI reads its workflow from (the `_v1` suffix is its storage version)."

_KEY, _VALUE = json.dumps(WORKFLOW_KEY), json.dumps(json.dumps("machine_learning"))
DEFAULT_SCRIPT = (
    f"<script>try{{if(!localStorage.getItem({_KEY}))localStorage.setItem({_KEY},{_VALUE})}}catch(e){{}}</script>"
)
"Stores the machine-learning workflow unless the browser already holds a choice."


def index_html() -> str:
    """MLflow's index.html with `DEFAULT_SCRIPT` as the first element of <head>."""
    html = (Path(flask_app.static_folder) / "index.html").read_text(encoding="utf-8")
    return html.replace("<head>", "<head>" + DEFAULT_SCRIPT, 1)


async def _index(request: Request) -> HTMLResponse:
    return HTMLResponse(index_html())


# MLflow mounts its Flask app at "/" as a catch-all: the index route goes in front of it.
app.router.routes.insert(0, Route("/", _index, methods=["GET"]))

__all__ = ["app", "index_html"]
