"""Plugins on the Ray workers (`srdit.runtime.shipping`): `study run` ships a file or folder plugin to every node
(Ray `py_modules`), and a worker whose srdit or plugin code differs from the driver's refuses its trials with one
line, recorded as a crash of the infrastructure, while the study goes on.

- the check itself, without Ray: what is staged (the files of the plugin's code version, nothing else), the
  worker's import of the shipped copy when the driver's file is gone, and the one-line refusals;
- a two-node `ray.cluster_utils.Cluster`: a plugin present only beside the driver trains on the other node's
  workers (its file is renamed once the driver has shipped it); a node whose module plugin is an edited copy
  refuses its trial, and the other trial finishes; a data-parallel trial whose ranks sit on that node is refused by
  its ranks;
- a private local Ray started by the driver: the ranks of a data-parallel trial run the shipped copy.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from srdit import ext
from srdit.config import EXTENSIONS, ConfigError
from srdit.provenance import evaluation_code_version, plugin_code_version, plugin_sources, training_code_version
from srdit.runtime import shipping
from srdit.techniques import load_plugins

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "dispersive"

TOY = """
from toy_helper import depth_of

from srdit.ext import Knob, Plugin

def taps(cfg, knobs):
    return (depth_of(knobs),)

{name} = Plugin("{name}", "nowhere 2025", knobs={{"w": Knob(0.5, range=(0, 1)), "depth": Knob(1, range=(1, None))}},
             hooks={{"taps": taps}})
"""
HELPER = "def depth_of(knobs):\n    return knobs.depth\n"
MODULE_TOY = """
from srdit.ext import Knob, Plugin

def taps(cfg, knobs):
    return (knobs.depth,)

shiptoy = Plugin("shiptoy", "nowhere 2025", knobs={"depth": Knob(1, range=(1, None))}, hooks={"taps": taps})
"""


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test loads its own plugins; the process's registry, modules and path are restored after it."""
    plugins, knobs, path, modules = dict(ext.PLUGINS), dict(EXTENSIONS), list(sys.path), set(sys.modules)
    yield
    ext.PLUGINS.clear()
    ext.PLUGINS.update(plugins)
    EXTENSIONS.clear()
    EXTENSIONS.update(knobs)
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name in ("toy", "toy_helper", "shiptoy", "dispersive", "repulsion") or name.startswith("srdit_plugin_"):
            del sys.modules[name]


def _toy_folder(folder: Path, name: str = "toy") -> Path:
    """A plugin file that imports a helper of its folder, beside a file it does not import."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(TOY.format(name=name))
    (folder / "toy_helper.py").write_text(HELPER)
    (folder / "unrelated.py").write_text("x = 1\n")
    (folder / "notes.txt").write_text("not code\n")
    return folder / f"{name}.py"


def _forget(*names: str) -> None:
    """This process as a fresh worker: the plugins and their modules not loaded."""
    for n in names:
        ext.PLUGINS.pop(n, None)
        EXTENSIONS.pop(n, None)
    for m in [m for m in sys.modules if m in ("toy", "toy_helper", "shiptoy") or m.startswith("srdit_plugin_")]:
        del sys.modules[m]


# ------------------------------------------------------------------------------------------------------------------
# the check itself
# ------------------------------------------------------------------------------------------------------------------


def test_a_shipped_plugin_is_its_versioned_files_and_a_worker_without_the_file_imports_the_copy(tmp_path):
    file = _toy_folder(tmp_path / "mine")
    load_plugins([str(file)])
    sources = shipping.shipped(plugin_sources(["toy"]))
    version = plugin_code_version(file)
    assert sources[0]["shipped"] == f"srdit_plugin_{version}/toy.py"

    modules = shipping.stage(sources, tmp_path / "staging")
    staged = Path(modules[0])
    assert staged.name == f"srdit_plugin_{version}"
    assert sorted(p.name for p in staged.iterdir()) == ["toy.py", "toy_helper.py"]  # what the version covers

    # a worker on a node without the driver's folder: Ray's py_modules puts the module's parent on sys.path
    (tmp_path / "mine").rename(tmp_path / "gone")
    _forget("toy")
    sys.path[:] = [p for p in sys.path if p != str(tmp_path / "mine")]
    sys.path.insert(0, str(staged.parent))
    assert shipping.shipped_copy(sources[0]) == staged / "toy.py"
    assert shipping.refusal(sources, f"{training_code_version()}/{evaluation_code_version()}") is None
    assert ext.PLUGINS["toy"].source == str(staged / "toy.py")
    tags = shipping.loaded_tags(sources)
    assert tags == {"plugin.toy.version": version, "plugin.toy.source": str(staged / "toy.py")}


def test_a_plugin_folder_is_shipped_whole(tmp_path):
    pkg = tmp_path / "toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(MODULE_TOY.replace("shiptoy", "pkgtoy"))
    (pkg / "more.py").write_text("y = 2\n")
    load_plugins([str(pkg)])
    sources = shipping.shipped(plugin_sources(["pkgtoy"]))
    staged = Path(shipping.stage(sources, tmp_path / "staging")[0])
    assert sorted(p.name for p in (staged / "toypkg").iterdir()) == ["__init__.py", "more.py"]
    assert plugin_code_version(staged / "toypkg") == sources[0]["version"]
    sys.modules.pop("toypkg", None)


def test_a_plugin_edited_after_the_plan_is_not_shipped(tmp_path):
    file = _toy_folder(tmp_path / "mine")
    load_plugins([str(file)])
    sources = shipping.shipped(plugin_sources(["toy"]))
    (tmp_path / "mine" / "toy_helper.py").write_text(HELPER.replace("knobs.depth", "knobs.depth + 0"))
    with pytest.raises(ConfigError, match=r"^plugin toy \(.*toy\.py\): its code changed since the study was planned"):
        shipping.runtime_env(sources, tmp_path / "staging")


def test_a_module_plugin_is_not_shipped_and_the_runtime_env_keeps_the_setup_hook(tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "shiptoy.py").write_text(MODULE_TOY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    load_plugins(["shiptoy"])
    sources = shipping.shipped(plugin_sources(["shiptoy"]))
    assert sources[0]["shipped"] == "" and sources[0]["origin"] == "shiptoy"
    assert shipping.runtime_env(sources, tmp_path / "staging") == {"worker_process_setup_hook": shipping.SETUP_HOOK}


def test_a_worker_with_other_code_refuses_with_one_line(tmp_path, monkeypatch):
    """The digest check: an edited module plugin on the worker's path, another srdit, a plugin the node lacks."""
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "shiptoy.py").write_text(MODULE_TOY)
    monkeypatch.syspath_prepend(str(tmp_path / "driver"))
    load_plugins(["shiptoy"])
    sources = shipping.shipped(plugin_sources(["shiptoy"]))
    here = f"{training_code_version()}/{evaluation_code_version()}"
    assert shipping.refusal(sources, here) is None

    # the worker's node has an edited copy of the module
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "shiptoy.py").write_text(MODULE_TOY.replace("(knobs.depth,)", "(knobs.depth + 0,)"))
    _forget("shiptoy")
    sys.path[:] = [str(tmp_path / "node")] + [p for p in sys.path if p != str(tmp_path / "driver")]
    line = shipping.refusal(sources, here)
    mine = plugin_code_version(tmp_path / "node" / "shiptoy.py")
    assert mine != sources[0]["version"]
    assert "shiptoy" not in sys.modules and "shiptoy" not in ext.PLUGINS  # refused before importing it
    assert "\n" not in line
    assert re.fullmatch(
        rf"plugin shiptoy: the worker on \S+ loaded code version {mine} from {re.escape(str(tmp_path))}/node/"
        rf"shiptoy\.py, the driver keyed {sources[0]['version']} \(shiptoy\); install the same shiptoy on every "
        r"node, or list the plugin as a \.py file or package folder \(`study run` ships those\)",
        line,
    ), line
    # a comment or docstring differs: the same code, no refusal
    (tmp_path / "node" / "shiptoy.py").write_text('"""doc"""\n# a comment\n' + MODULE_TOY)
    _forget("shiptoy")
    assert shipping.refusal(sources, here) is None

    # another srdit on the node
    line = shipping.refusal(sources, "0000000000000000/1111111111111111")
    assert line == (
        f"srdit: the worker on {__import__('platform').node()} runs code version {here}, the driver "
        "0000000000000000/1111111111111111 (training/evaluation code); install the same srdit on every node"
    )
    # a node without the module at all
    _forget("shiptoy")
    sys.path[:] = [p for p in sys.path if p != str(tmp_path / "node")]
    line = shipping.refusal(sources, here)
    assert "\n" not in line and re.match(r"plugin shiptoy: the worker on \S+ cannot load it \(", line), line
    assert line.endswith(
        "install the same shiptoy on every node, or list the plugin as a .py file or package "
        "folder (`study run` ships those)"
    )


# ------------------------------------------------------------------------------------------------------------------
# a two-node cluster
# ------------------------------------------------------------------------------------------------------------------


def _study(folder: Path, name: str, techniques: list, plugins: list) -> Path:
    data = {
        "name": name,
        "plugins": plugins,
        "base": {
            "train": {"steps": 3, "batch_size": 16, "log_every": 3, "ckpt_every": 3},
            "eval": {"n_samples": 16, "batch_size": 16},
            "sample": {"sampler": "euler", "steps": 2},
        },
        "techniques": techniques,
        "seeds": [0],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _trial_runs(res) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(res.uri)
    return {
        r.data.tags["cell"]: r
        for r in client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    }


@pytest.mark.slow
def test_a_plugin_only_beside_the_driver_trains_on_the_other_node(tmp_path):
    """The head node takes no trial, so both trials run on the added node; the plugin's folder is renamed once the
    driver has connected (and shipped it), so no worker can read the driver's file."""
    from ray.cluster_utils import Cluster

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    folder = tmp_path / "plugins"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    spec = load_study(_study(folder, "shipped", ["dispersive"], ["dispersive.py"]))
    version = plugin_code_version(folder / "dispersive.py")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("study shipped:") and folder.exists():  # Ray is up: the plugin has been shipped
            folder.rename(tmp_path / "elsewhere")

    try:
        res = run_study(spec, tmp_path / "state", echo=echo, address=cluster.address)
    finally:
        cluster.shutdown()
    assert not folder.exists()
    assert res.complete and res.statuses == {"finished": 2}, lines
    runs = _trial_runs(res)
    assert "loss/dispersive" in runs["1"].data.metrics and "loss/dispersive" not in runs["0"].data.metrics
    for r in runs.values():
        assert r.data.tags["plugin.dispersive.version"] == version
        source = r.data.tags["plugin.dispersive.source"]
        assert f"srdit_plugin_{version}" in source and not source.startswith(str(tmp_path)), source


@pytest.mark.slow
def test_a_node_with_other_plugin_code_refuses_its_trial_and_the_study_goes_on(tmp_path, monkeypatch):
    """A module plugin (not shipped: the node's own code) whose copy on the added node is edited: the trial placed
    there is refused with one line and recorded as crashed for the infrastructure; the head node's trial
    finishes; the study returns normally with the refused trial left for a rerun."""
    from ray.cluster_utils import Cluster

    from srdit.analysis.results import CRASH_CAUSE, INFRASTRUCTURE
    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "shiptoy.py").write_text(MODULE_TOY)
    (bad / "shiptoy.py").write_text(MODULE_TOY.replace("(knobs.depth,)", "(knobs.depth + 0,)"))
    monkeypatch.syspath_prepend(str(good))
    spec = load_study(_study(tmp_path, "refusing", ["shiptoy"], ["shiptoy"]))
    keyed, edited = plugin_code_version(good / "shiptoy.py"), plugin_code_version(bad / "shiptoy.py")
    assert keyed != edited
    path = os.environ.get("PYTHONPATH", "")
    # one CPU per node and two trials: one trial on each node
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": {"PYTHONPATH": f"{good}:{path}"}},
    )
    cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": f"{bad}:{path}"})
    lines: list[str] = []
    try:
        res = run_study(spec, tmp_path / "state", echo=lines.append, address=cluster.address)
    finally:
        cluster.shutdown()
    assert res.statuses == {"finished": 1, "crashed": 1}, lines
    runs = _trial_runs(res)
    refused = [r for r in runs.values() if r.data.tags["status"] == "crashed"][0]
    done = [r for r in runs.values() if r.data.tags["status"] == "finished"][0]
    reason = refused.data.tags["status_reason"]
    assert re.fullmatch(
        rf"plugin shiptoy: the worker on \S+ loaded code version {edited} from {re.escape(str(bad))}/shiptoy\.py, "
        rf"the driver keyed {keyed} \(shiptoy\); install the same shiptoy on every node, .*",
        reason,
    ), reason
    assert refused.data.tags[CRASH_CAUSE] == INFRASTRUCTURE and refused.info.status == "FAILED"
    assert "loss" not in refused.data.metrics  # nothing trained
    assert done.data.tags["plugin.shiptoy.version"] == keyed
    assert res.unfinished == [refused.data.tags["trial_key"]]
    assert any(reason[:60] in line for line in lines), lines  # the driver's progress line shows it


@pytest.mark.slow
def test_data_parallel_workers_of_a_private_ray_run_the_shipped_plugin(tmp_path):
    """A private local Ray started by the driver ships the plugin too, and the Ray Train workers of a
    data-parallel trial load the shipped copy: the driver's folder is renamed once Ray is up."""
    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    folder = tmp_path / "plugins"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    path = _study(folder, "dp_shipped", ["dispersive"], ["dispersive.py"])
    data = yaml.safe_load(path.read_text())
    data["resources"] = {"cpus": 0.5, "workers": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_study(path)
    version = plugin_code_version(folder / "dispersive.py")
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("study dp_shipped:") and folder.exists():
            folder.rename(tmp_path / "elsewhere")

    res = run_study(spec, tmp_path / "state", echo=echo, num_cpus=2)
    assert not folder.exists() and any(line.startswith("Ray: a private local Ray") for line in lines), lines
    assert res.complete and res.statuses == {"finished": 2}, lines
    runs = _trial_runs(res)
    assert "loss/dispersive" in runs["1"].data.metrics  # logged by rank 0, which ran the shipped copy
    assert all(r.data.tags["plugin.dispersive.version"] == version for r in runs.values())


@pytest.mark.slow
def test_a_data_parallel_rank_on_a_node_with_other_plugin_code_refuses_the_trial(tmp_path, monkeypatch):
    """The Tune trial hosting a data-parallel run sits on the head node (the added node has no `memory` resource,
    which the host reserves) and its ranks on the added node, whose module plugin is an edited copy: the ranks
    refuse, and the trial is recorded crashed for the infrastructure with the one line."""
    from ray.cluster_utils import Cluster

    from srdit.analysis.results import CRASH_CAUSE, INFRASTRUCTURE
    from srdit.runtime.data_parallel import WORKER_ERROR
    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "shiptoy.py").write_text(MODULE_TOY)
    (bad / "shiptoy.py").write_text(MODULE_TOY.replace("(knobs.depth,)", "(knobs.depth + 0,)"))
    monkeypatch.syspath_prepend(str(good))
    path = _study(tmp_path, "dp_refusing", ["shiptoy"], ["shiptoy"])
    data = yaml.safe_load(path.read_text())
    data["resources"] = {"cpus": 1, "workers": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_study(path)
    env = os.environ.get("PYTHONPATH", "")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "env_vars": {"PYTHONPATH": f"{good}:{env}"}},
    )
    cluster.add_node(num_cpus=2, memory=0, env_vars={"PYTHONPATH": f"{bad}:{env}"})
    lines: list[str] = []
    try:
        res = run_study(spec, tmp_path / "state", echo=lines.append, address=cluster.address)
    finally:
        cluster.shutdown()
    assert res.statuses == {"crashed": 2}, lines
    for r in _trial_runs(res).values():
        reason = r.data.tags["status_reason"]
        assert re.fullmatch(
            rf"plugin shiptoy: the worker on \S+ loaded code version {plugin_code_version(bad / 'shiptoy.py')} from "
            rf"{re.escape(str(bad))}/shiptoy\.py, the driver keyed {plugin_code_version(good / 'shiptoy.py')} .*",
            reason,
        ), reason
        assert r.data.tags[CRASH_CAUSE] == INFRASTRUCTURE
        assert (Path(r.data.tags["trial_dir"]) / WORKER_ERROR).is_file()  # a rank refused, not the host
