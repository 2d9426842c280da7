"""The layer rules of the architecture: who may import whom.

| layer     | nodes (srdit/...)                                  | may import (srdit)             | must not import |
|-----------|----------------------------------------------------|--------------------------------|-----------------|
| config    | __init__, config, techniques, metric_registry, ext, technique_template, builtins/ | - | torch (builtins/: inside hook bodies only), ray, mlflow |
| util      | cache                                              | -                              | ray, mlflow     |
| model     | model/                                             | config, util                   | ray, mlflow     |
| transport | transport/                                         | config, util, `srdit.model` *  | ray, mlflow     |
| data      | data/, encoders/, metrics/                         | config, util                   | ray, mlflow     |
| train     | train, generate, evaluate, sample_shards, parallel, imaging, provenance, convert, inputs, technique_check | the rows above | ray, mlflow |
| study     | study/ (pure planning)                             | the rows above, `srdit.analysis.results` and `.power` only | ray, mlflow |
| runtime   | runtime/ (driver, worker, tracking, reuse, ...)    | the rows above, `srdit.analysis.results` and `.power` only | - |
| analysis  | analysis/                                          | config                         | torch, ray      |
| commands  | commands/ (every `srdit` command, the one printer of a user error), __main__ | everything | - |

* the model's public API, never its internals (`srdit.model.<module>`).

A built-in's hooks (`srdit/builtins/<name>.py`: loss terms, training times, ...) compute on tensors, and some need
torch functions of their own (`torch.cat`, `F.cosine_similarity`): they may import torch, and torch only, inside the
body of a function, never at module level, so that importing a built-in (planning a study, listing techniques) still
loads no torch; the hook runs in the training process, which has torch already. They import no srdit layer above
config (the objective calls them: that would be a cycle).

Nothing imports the commands: they sit on top, and no row but their own may import them.

A node is a top-level module or a top-level package of `srdit`; a layer may always import its own nodes. `cache` sits
below the data layer because it is the one atomic writer of the package (the latent store, the digits teacher
cache, checkpoints and sample shards all write through it) and imports nothing of srdit.

Two checks per row, and one on the whole graph:
- static: every `import` in every srdit source file, module level or inside a function, is read with `ast` and
  checked against the row (lazy imports count: they run too, just later), with the one exception above (torch inside
  a function body of `builtins/`);
- at run time: each module of the row is imported in its own fresh process, which must then hold no forbidden
  module in `sys.modules` (this catches what a module drags in through others). The processes are forked from a
  parent that has loaded only torch for the rows that may use torch, and nothing for config and analysis;
- the graph of nodes (every import, lazy ones included) has no cycle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "srdit"

LAYERS: dict[str, set[str]] = {
    "config": {"srdit", "config", "techniques", "metric_registry", "ext", "technique_template", "builtins"},
    "util": {"cache", "stop"},
    "model": {"model"},
    "transport": {"transport"},
    "data": {"data", "encoders", "metrics"},
    "train": {
        "train",
        "generate",
        "evaluate",
        "sample_shards",
        "parallel",
        "imaging",
        "provenance",
        "convert",
        "inputs",
        "technique_check",
    },
    "study": {"study"},
    "runtime": {"runtime"},
    "analysis": {"analysis"},
    "commands": {"commands", "__main__"},
}
"Layer -> its nodes (a node: a top-level module or package of srdit; `srdit` is the package's own __init__)."

BELOW_TRAIN = {"config", "util", "model", "transport", "data"}
MAY_IMPORT: dict[str, set[str]] = {
    "config": {"config"},
    "util": set(),
    "model": {"config", "util", "model"},
    "transport": {"config", "util", "transport"},
    "data": {"config", "util", "data"},
    "train": BELOW_TRAIN | {"train"},
    "study": BELOW_TRAIN | {"train", "study"},
    "runtime": BELOW_TRAIN | {"train", "study", "runtime"},
    "analysis": {"config", "analysis"},
    "commands": set(LAYERS),
}
"Layer -> the layers whose modules it may import (besides the modules in ALSO_MAY_IMPORT)."

ALSO_MAY_IMPORT: dict[str, set[str]] = {
    "transport": {"srdit.model"},  # the model's public API, never srdit.model.<internal>
    # the results table and the power maths of `study plan` (numpy / scipy only), never report / effects
    "study": {"srdit.analysis", "srdit.analysis.results", "srdit.analysis.power"},
    # the results table it fills and, through the study layer, the power maths; never report / effects / page
    "runtime": {"srdit.analysis", "srdit.analysis.results", "srdit.analysis.power"},
}
"Layer -> single srdit modules it may import although their layer is not in MAY_IMPORT."

FORBIDDEN_PACKAGES: dict[str, set[str]] = {
    "config": {"torch", "ray", "mlflow"},
    "util": {"ray", "mlflow"},
    "model": {"ray", "mlflow"},
    "transport": {"ray", "mlflow"},
    "data": {"ray", "mlflow"},
    "train": {"ray", "mlflow"},
    "study": {"ray", "mlflow"},
    "runtime": set(),
    "analysis": {"torch", "ray"},
    "commands": set(),
}
"Layer -> third-party packages it must not import, directly or through another module."

CHECKED_PACKAGES = ("torch", "ray", "mlflow")
"Every package some layer must not import (the union of FORBIDDEN_PACKAGES' values), in import order."

TORCH_IN_HOOK_BODIES = {"builtins"}
"Nodes of the config layer that may import torch (and torch only) inside function bodies, never at module level."

# ----------------------------------------------------------------------------------------------------------------
# The source tree
# ----------------------------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
"Every srdit module -> its source file."


def node_of(module: str) -> str:
    """`srdit.data.latents` -> `data`; `srdit.train` -> `train`; `srdit` -> `srdit`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


NODE_LAYER = {node: layer for layer, nodes in LAYERS.items() for node in nodes}


def layer_of(module: str) -> str | None:
    return NODE_LAYER.get(node_of(module))


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    """Absolute name of a (possibly relative) `from ... import` base."""
    if not level:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement of `module`, wherever it stands (module level, inside
    functions, under `if TYPE_CHECKING`). `from pkg import name` names the submodule pkg.name when there is one."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
    return list(dict.fromkeys(out))  # `from m import a, b` once


def function_body_import_lines(module: str) -> set[int]:
    """The lines of the import statements of `module` that stand inside a function (or lambda) body: they run when
    the function is called, not when the module is imported."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.lineno
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for node in ast.walk(fn)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }


def _torch_in_a_hook_body(module: str, line: int, target: str) -> bool:
    """Is this import torch (or a torch submodule) inside a function body of a node allowed to do so?"""
    return (
        target.split(".")[0] == "torch"
        and node_of(module) in TORCH_IN_HOOK_BODIES
        and line in function_body_import_lines(module)
    )


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _allowed(layer: str, target: str) -> bool:
    """May a module of `layer` import the srdit module `target` (static rule)?"""
    return layer_of(target) in MAY_IMPORT[layer] | {layer} or target in ALSO_MAY_IMPORT.get(layer, set())


def _allowed_loaded(layer: str, loaded: str) -> bool:
    """May `loaded` sit in sys.modules after importing a module of `layer`? As `_allowed`, except that any import
    loads the package root `srdit`, and importing the model's public API loads the model's internals too."""
    return loaded == "srdit" or _allowed(layer, loaded) or (layer == "transport" and layer_of(loaded) == "model")


def _layer_modules(layer: str) -> list[str]:
    return [m for m in MODULES if layer_of(m) == layer]


def test_nothing_imports_the_commands():
    """The commands are the top: a layer that may import `srdit.commands` would let library code depend on the
    command line (its argument parsing, its exit codes)."""
    importers = sorted(layer for layer, allowed in MAY_IMPORT.items() if "commands" in allowed and layer != "commands")
    assert not importers, f"layers allowed to import srdit.commands: {importers}; only the commands may"
    assert not any(m.startswith("srdit.commands") for allowed in ALSO_MAY_IMPORT.values() for m in allowed)


def test_every_module_belongs_to_a_layer():
    orphans = sorted(m for m in MODULES if layer_of(m) is None)
    assert not orphans, (
        f"srdit modules outside the layer table: {orphans}; add their node to LAYERS in "
        f"{Path(__file__).name} (and to the architecture's layer table)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Static: every import statement, lazy ones included
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", list(LAYERS))
def test_static_imports_follow_the_layer_rules(layer):
    modules = _layer_modules(layer)
    assert modules, f"no module in layer {layer}"
    bad = []
    for module in modules:
        for line, target in imports_of(module):
            top = target.split(".")[0]
            if top == "srdit":
                if not _allowed(layer, target):
                    bad.append(
                        f"{_where(module, line)} imports {target} (layer {layer_of(target)}); {layer} may "
                        f"import {', '.join(sorted(MAY_IMPORT[layer] | {layer}))}"
                        + (f" and {', '.join(sorted(ALSO_MAY_IMPORT[layer]))}" if layer in ALSO_MAY_IMPORT else "")
                    )
            elif top in FORBIDDEN_PACKAGES[layer] and not _torch_in_a_hook_body(module, line, target):
                bad.append(
                    f"{_where(module, line)} imports {target}; {layer} must not import "
                    f"{', '.join(sorted(FORBIDDEN_PACKAGES[layer]))}"
                )
    assert not bad, f"layer {layer}: {len(bad)} forbidden import(s):\n" + "\n".join(bad)


def _graph() -> dict[str, dict[str, list[str]]]:
    """node -> imported node -> where (file:line), every import, self-imports left out."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module in MODULES:
        for line, target in imports_of(module):
            if target.split(".")[0] == "srdit" and node_of(target) != node_of(module):
                graph[node_of(module)][node_of(target)].append(_where(module, line))
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for targets in graph.values() for w in targets}):
        if v not in index:
            visit(v)
    return found


def test_builtins_import_torch_only_inside_function_bodies():
    """The one exception to the config layer's "no torch": a built-in's hook may import torch inside its body.
    Module-level torch (or another third-party package, or a srdit layer above config) stays refused."""
    modules = [m for m in MODULES if node_of(m) in TORCH_IN_HOOK_BODIES]
    assert modules
    bad = []
    for module in modules:
        lazy = function_body_import_lines(module)
        for line, target in imports_of(module):
            top = target.split(".")[0]
            if top == "torch" and line not in lazy:
                bad.append(f"{_where(module, line)} imports {target} at module level; import it inside the hook")
            elif top not in ("srdit", "torch", "__future__") and top not in sys.stdlib_module_names:
                bad.append(f"{_where(module, line)} imports {target}; a built-in's hook may import torch only")
    assert not bad, "\n".join(bad)


def test_function_body_imports_are_told_from_module_level_ones(tmp_path, monkeypatch):
    source = "import torch\n\n\ndef hook(ctx):\n    import torch.nn.functional as F\n    return F\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, "srdit.builtins.probe", path)
    assert function_body_import_lines("srdit.builtins.probe") == {5}
    assert not _torch_in_a_hook_body("srdit.builtins.probe", 1, "torch")  # module level: refused
    assert _torch_in_a_hook_body("srdit.builtins.probe", 5, "torch.nn.functional")
    monkeypatch.setitem(MODULES, "srdit.ext_probe", path)
    assert not _torch_in_a_hook_body("srdit.ext_probe", 5, "torch.nn.functional")  # not a built-in


def test_lazy_imports_are_seen():
    seen = {target for _, target in imports_of("srdit.evaluate")}
    assert "srdit.metrics.inception" in seen  # imported inside _evaluate_latents
    assert "srdit.sample_shards" in seen and "torch" in seen


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": []}, "b": {}}) == []


def test_package_graph_has_no_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    lines = []
    for component in cycles:
        edges = [
            f"  {a} -> {b} ({', '.join(graph[a][b][:3])})"
            for a in component
            for b in component
            if b in graph.get(a, {})
        ]
        lines.append(" <-> ".join(component) + ":\n" + "\n".join(edges))
    assert not cycles, "import cycles between srdit packages / top-level modules:\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# At run time: what importing each module really loads
# ----------------------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, os, sys, traceback

modules, preload, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name in preload:
    __import__(name)
pulled = sorted(p for p in forbidden if p in sys.modules)
if pulled:  # the preload would hide what the modules load
    sys.exit(f"preloading {preload} loads {pulled}, which these modules must not load")
for module in modules:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # a fresh process as far as srdit, ray and mlflow go
        try:
            __import__(module)
            out = {"module": module, "loaded": sorted(sys.modules)}
        except BaseException:
            out = {"module": module, "error": traceback.format_exc(limit=3)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""

_ENTRY_POINTS = {"srdit.__main__"}  # importing it runs the command line; checked statically only


@pytest.fixture(scope="module")
def loaded_by_import() -> dict[str, dict]:
    """module -> {"loaded": sys.modules after importing it alone} (or {"error": ...})."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    assert set(CHECKED_PACKAGES) == set().union(*FORBIDDEN_PACKAGES.values())
    results = {}
    # One probe per set of forbidden packages: it preloads the checked packages its layers may use (a fork then
    # imports only the module and what else it brings), and never one they must not load.
    groups = defaultdict(list)
    for m in MODULES:
        if m not in _ENTRY_POINTS:
            groups[frozenset(FORBIDDEN_PACKAGES[layer_of(m)])].append(m)
    for forbidden, modules in groups.items():
        preload = [p for p in CHECKED_PACKAGES if p not in forbidden]
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(preload), json.dumps(sorted(forbidden))],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for line in proc.stdout.splitlines():
            if line.startswith('{"module"'):
                r = json.loads(line)
                results[r["module"]] = r
        missing = [m for m in modules if m not in results]
        assert not missing, f"no probe result for {missing}: {proc.stderr[-3000:]}"
    return results


@pytest.mark.parametrize("layer", list(LAYERS))
def test_importing_a_module_loads_nothing_its_layer_must_not_use(layer, loaded_by_import):
    bad = []
    for module in _layer_modules(layer):
        if module in _ENTRY_POINTS:
            continue
        r = loaded_by_import[module]
        if "error" in r:
            bad.append(f"{module}: import failed:\n{r['error']}")
            continue
        loaded = r["loaded"]
        packages = sorted(p for p in FORBIDDEN_PACKAGES[layer] if p in loaded)
        internal = sorted(
            m for m in loaded if m.split(".")[0] == "srdit" and m in MODULES and not _allowed_loaded(layer, m)
        )
        if packages or internal:
            bad.append(f"import {module} loads " + ", ".join(packages + internal))
    assert not bad, f"layer {layer}:\n" + "\n".join(bad)
