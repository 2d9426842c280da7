"""What every run records about itself: git commit (+ dirty flag), versions, device; and the code version of the
parts of srdit that shape a training or an evaluation (content keys of finished runs, `srdit.runtime.reuse`)."""

from __future__ import annotations

import ast
import functools
import hashlib
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import srdit

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the source tree srdit runs from; ("unknown", False) outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return (commit or "unknown"), dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def device_name(device: torch.device | str) -> str:
    import torch  # here: the code version (driver side, content keys) needs no torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device | str = "cpu") -> dict[str, str]:
    import torch

    commit, dirty = git_commit()
    return {
        "commit": commit,
        "dirty": str(dirty).lower(),
        "srdit": srdit.__version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "device": device_name(device),
    }


TRAINING_CODE = ("model", "transport", "data", "encoders", "train.py", "parallel.py", "builtins")
"""The parts of srdit (relative to the package folder) that shape a trained model: backbone, objective and sampler,
data streams, alignment teachers, the training loop and its data-parallel helper, and the built-in techniques'
modules (their hooks run in training: editing one retrains). The resolved config is keyed
separately, so the config loader and the technique merge are not part of it."""
EVALUATION_CODE = ("evaluate.py", "generate.py", "metrics", "sample_shards.py")
"The parts that turn a trained model into evaluation metrics: sampling, metric networks and distances."


def _drop_docstrings(tree: ast.AST) -> ast.AST:
    """Remove every bare string statement (module, class and function docstrings, and the attribute docstrings
    that follow dataclass fields): they are no-ops, so editing them must not change the code version."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [
                s
                for s in body
                if not (
                    isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)
                )
            ]
            setattr(node, name, kept or [ast.Pass()])
    return tree


def source_digest(source: str, filename: str = "<source>") -> str:
    """sha256 of a Python source's syntax tree without comments, docstrings, layout or line numbers: equal for two
    sources that differ only there, different when any statement or expression differs. Raises SyntaxError."""
    tree = _drop_docstrings(ast.parse(source, filename))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


@functools.cache
def _code_version(parts: tuple[str, ...], root: str) -> str:
    h = hashlib.sha256()
    base = Path(root)
    for part in parts:
        path = base / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        if not files:
            h.update(f"{part}\0missing\0".encode())
        for f in files:
            h.update(f.relative_to(base).as_posix().encode() + b"\0")
            h.update(source_digest(f.read_text(encoding="utf-8"), str(f)).encode() + b"\0")
    return h.hexdigest()[:16]


def code_version(parts: tuple[str, ...] = TRAINING_CODE, root: str | Path | None = None) -> str:
    """A 16-hex-digit version of the source files under `parts` (files or folders, relative to `root`, default the
    srdit package folder), from their syntax trees (`source_digest`): a code change changes it, a comment or
    docstring edit does not. Computed once per process and arguments (the source does not change under a running
    process). `training_code_version` / `evaluation_code_version` name the two parts that content keys use."""
    return _code_version(tuple(parts), str(Path(root) if root is not None else Path(srdit.__file__).parent))


def training_code_version() -> str:
    """`code_version` of `TRAINING_CODE`: a part of every training's content key (`srdit.runtime.reuse`)."""
    return code_version(TRAINING_CODE)


def evaluation_code_version() -> str:
    """`code_version` of `EVALUATION_CODE`: a part of every run's content key (`srdit.runtime.reuse`)."""
    return code_version(EVALUATION_CODE)


def srdit_code_version() -> str:
    """ "training/evaluation" code versions: what a worker or a data-parallel rank must share with the driver or rank
    0 before it trains (`srdit.runtime.shipping.refusal`, `srdit.parallel.check_same_code`)."""
    return f"{training_code_version()}/{evaluation_code_version()}"


# ----------------------------------------------------------------------------------------------------------------
# Plugin techniques (`srdit.ext`): the code each one runs
# ----------------------------------------------------------------------------------------------------------------


def _local_imports(file: Path, root: Path) -> list[Path]:
    """The files under `root` that `file` imports (absolute imports resolved from `root`, relative ones from the
    file's folder)."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    except (OSError, SyntaxError):
        return []
    names: list[tuple[Path, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(root, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = root
            if node.level:
                base = file.parent
                for _ in range(node.level - 1):
                    base = base.parent
            mod = node.module or ""
            names += [(base, mod)] + [(base, f"{mod}.{a.name}" if mod else a.name) for a in node.names]
    out = []
    for base, dotted in names:
        if dotted:
            rel = Path(*dotted.split("."))
            out += [c.resolve() for c in (base / rel.with_suffix(".py"), base / rel / "__init__.py") if c.is_file()]
    return out


def plugin_files(source: str | Path) -> list[Path]:
    """The files a plugin's code version covers: its file (or every .py of its package folder) and, transitively,
    the modules it imports from its own folder."""
    src = Path(source).resolve()
    root = src if src.is_dir() else src.parent
    todo = sorted(src.rglob("*.py")) if src.is_dir() else [src]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += [g for g in _local_imports(f, root) if g not in seen]
    return sorted(seen)


def plugin_code_version(source: str | Path) -> str:
    """A 16-hex-digit version of a plugin's code (`plugin_files`, relative names and `source_digest`s): a code
    change, in the plugin or in a module it imports from its own folder, changes it; a comment or docstring edit
    does not. Not cached: a study reads it once per plan, and an edited plugin must be seen."""
    src = Path(source).resolve()
    root = src if src.is_dir() else src.parent
    h = hashlib.sha256()
    for f in plugin_files(src):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(source_digest(f.read_text(encoding="utf-8"), str(f)).encode() + b"\0")
    return h.hexdigest()[:16]


def plugin_versions(ext: Mapping[str, Mapping], stage: str | None = None) -> dict[str, str]:
    """Plugin name -> `plugin_code_version` of each plugin on in a config's `ext` section (of one `stage` only,
    "train" or "eval", when given); a plugin loaded from an installed module without a source file is versioned by
    its module name."""
    from srdit.ext import PLUGINS

    out = {}
    for name in sorted(ext):
        p = PLUGINS[name]
        if stage is None or p.stage == stage:
            out[name] = plugin_code_version(p.source) if p.source else "module:" + p.origin
    return out


def plugin_sources(names: Iterable[str]) -> list[dict[str, str]]:
    """What a worker process needs to load the given plugins and to know it has their code: [{name, origin (the
    file, folder or module the driver loaded), source (its code's file or folder), version (the code version that
    entered the content keys: `plugin_versions`)}], in name order (`srdit.techniques.load_plugin_sources` reads
    it back)."""
    from srdit import ext

    names = sorted(set(names))
    versions = plugin_versions(dict.fromkeys(names, {}))
    return [
        {"name": n, "origin": ext.PLUGINS[n].origin, "source": ext.PLUGINS[n].source, "version": versions[n]}
        for n in names
    ]
