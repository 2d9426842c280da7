"""Plugin code on every node of a study's Ray: what `study run` ships to the workers, and the check each worker
makes before it trains.

- Shipped: a plugin loaded from a `.py` file or a package folder (`srdit.ext`). The files its code version covers
  (`srdit.provenance.plugin_files`: the file and the modules it imports from its own folder; a package: the whole
  folder) are copied into one module per code version, `srdit_plugin_<version>/<file or folder name>`, which the
  driver lists in the job's `runtime_env` `py_modules` (`runtime_env`): Ray uploads it when the driver connects and
  unpacks it on every node before a worker of the study starts there (Ray's "Environment Dependencies" guide,
  `py_modules`). A worker loads the shipped copy (`load`), so a node that does not have the file runs it.
- Not shipped: a plugin named by module (a YAML's `plugins:` entry or the entry-point group): it is the node's own
  installed code, like srdit itself.
- Checked: before it trains, a worker compares srdit's code version and every plugin's code version in its process
  with the driver's (`refusal`: the versions travel in the `TrialContext`); a difference is one line, naming the
  plugin, both versions and the fix, and the trial is recorded as crashed for the infrastructure (never a run of
  other code than the keys name; the study goes on).
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from srdit import ext
from srdit.config import ConfigError

MODULE_PREFIX = "srdit_plugin_"
"Name of a shipped plugin's module: this prefix and its code version (`srdit.provenance.plugin_code_version`)."

SETUP_HOOK = "srdit.stop.install_in_worker"
"The study's `worker_process_setup_hook` (SIGHUP to a trial's worker stops that trial at its current step)."


def shipped(sources: Iterable[Mapping[str, str]]) -> tuple[dict[str, str], ...]:
    """The study's plugin entries (`srdit.provenance.plugin_sources`) with `shipped`: where a worker finds the copy
    of a file or folder plugin (`srdit_plugin_<version>/<file or folder name>`, a module on its `sys.path`), "" for
    a plugin named by module (the node's own installed code)."""
    out = []
    for s in sources:
        is_path = Path(s["origin"]).is_absolute()  # a file or folder plugin's origin is its absolute path
        out.append({**s, "shipped": f"{MODULE_PREFIX}{s['version']}/{Path(s['source']).name}" if is_path else ""})
    return tuple(out)


def stage(sources: Iterable[Mapping[str, str]], folder: str | Path) -> list[str]:
    """Copy the code of every shipped plugin of `sources` (`shipped`) into `folder`, one module folder per code
    version; returns those folders (the `py_modules` entries). Raises ConfigError (one line) when a plugin's code
    changed since its version was taken (the copy would not be the code the keys name)."""
    from srdit.provenance import plugin_code_version, plugin_files

    modules: dict[str, str] = {}
    for s in sources:
        if not s.get("shipped"):
            continue
        module, name = s["shipped"].split("/", 1)
        dest, src = Path(folder) / module, Path(s["source"])
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        else:
            for f in plugin_files(src):
                target = dest / f.relative_to(src.parent)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
        copied = plugin_code_version(dest / name)
        if copied != s["version"]:
            raise ConfigError(
                f"plugin {s['name']} ({s['origin']}): its code changed since the study was planned (code version "
                f"{s['version']}, now {copied}); run the study again"
            )
        modules[module] = str(dest)
    return list(modules.values())


def runtime_env(sources: Iterable[Mapping[str, str]], folder: str | Path) -> dict:
    """The study's Ray `runtime_env`: the setup hook, and `py_modules` with the staged copies of the file and folder
    plugins (`stage`, into `folder`, which must live until Ray has uploaded them: `ray.init` does)."""
    env: dict = {"worker_process_setup_hook": SETUP_HOOK}
    modules = stage(sources, folder)
    if modules:
        env["py_modules"] = modules
    return env


def shipped_copy(source: Mapping[str, str]) -> Path | None:
    """Where this process finds the shipped copy of a plugin (its module `srdit_plugin_<version>` on `sys.path`,
    which Ray's `py_modules` puts there), or None (a module plugin; a Ray the driver did not start with it)."""
    if not source.get("shipped"):
        return None
    module, name = source["shipped"].split("/", 1)
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / name if locations else None
    return path if path is not None and path.exists() else None


def load(sources: Iterable[Mapping[str, str]]) -> str | None:
    """Load the study's plugins in this worker process: each from its shipped copy when the node has one, else from
    where the driver loaded it (a module by name; a file or folder at the driver's path). Returns None, or the one
    line of a plugin this worker cannot load."""
    from srdit.techniques import load_plugins

    for s in sources:
        if s["name"] in ext.PLUGINS:
            continue
        copy = shipped_copy(s)
        try:
            load_plugins([str(copy) if copy is not None else s["origin"]], where=f"plugin {s['name']}")
        except ConfigError as e:
            return f"plugin {s['name']}: {_worker()} cannot load it ({' '.join(str(e).split())}); {_fix(s)}"
    return None


def refusal(sources: Iterable[Mapping[str, str]], srdit_code: str = "") -> str | None:
    """Why this worker must not run the study's trials, as one line, or None: srdit's code version here differs
    from `srdit_code` (the driver's, "training/evaluation"; "" = not checked), a plugin of `sources` cannot be
    loaded (`load`), or its code version here differs from the one the driver keyed (`sources`' `version`)."""
    from srdit.provenance import plugin_code_version, plugin_versions, srdit_code_version

    here = srdit_code_version()
    if srdit_code and here != srdit_code:
        return (
            f"srdit: {_worker()} runs code version {here}, the driver {srdit_code} (training/evaluation code); "
            f"install the same srdit on every node"
        )
    sources = list(sources)
    for s in sources:  # before the import: other code's module-level statements never run
        # (a module without a source file is versioned by its name: nothing to read before the import)
        path = None if s["name"] in ext.PLUGINS or s["version"].startswith("module:") else _code_path(s)
        if path is not None and plugin_code_version(path) != s["version"]:
            return _mismatch(s, plugin_code_version(path), str(path))
    problem = load(sources)
    if problem:
        return problem
    for s in sources:  # what this process runs (a plugin loaded by an earlier trial of this worker, too)
        mine = plugin_versions({s["name"]: {}})[s["name"]]
        if mine != s["version"]:
            return _mismatch(s, mine, ext.PLUGINS[s["name"]].where())
    return None


def _mismatch(s: Mapping[str, str], mine: str, where: str) -> str:
    return (
        f"plugin {s['name']}: {_worker()} loaded code version {mine} from {where}, the driver keyed {s['version']} "
        f"({s['origin']}); {_fix(s)}"
    )


def _code_path(s: Mapping[str, str]) -> Path | None:
    """The file or package folder this worker would load a plugin from (`load`), found without importing it; None
    when there is none (`load` then says so) or a module has no source file."""
    copy = shipped_copy(s)
    if copy is not None:
        return copy
    if Path(s["origin"]).is_absolute():
        return Path(s["origin"]) if Path(s["origin"]).exists() else None
    try:
        spec = importlib.util.find_spec(s["origin"])
    except (ImportError, ValueError):
        return None
    file = Path(spec.origin) if spec is not None and spec.has_location and spec.origin else None
    if file is None or not file.is_file():
        return None
    return file.parent if file.name == "__init__.py" else file


def loaded_tags(sources: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Tags of a trial's run: for each plugin of the study, the code version this process runs and where it loaded
    it from (`plugin.<name>.version`, `plugin.<name>.source`)."""
    from srdit.provenance import plugin_versions

    names = [s["name"] for s in sources if s["name"] in ext.PLUGINS]
    versions = plugin_versions(dict.fromkeys(names, {}))
    tags = {}
    for n in names:
        tags[f"plugin.{n}.version"] = versions[n]
        tags[f"plugin.{n}.source"] = ext.PLUGINS[n].where()
    return tags


def _worker() -> str:
    return f"the worker on {platform.node()}"


def _fix(s: Mapping[str, str]) -> str:
    if s.get("shipped"):
        return (
            "the plugin's file changed after the study was planned, or this Ray was not started by `srdit study run` "
            "(which ships it); run the study again"
        )
    return (
        f"install the same {s['origin']} on every node, or list the plugin as a .py file or package folder "
        f"(`study run` ships those)"
    )
