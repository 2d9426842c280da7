"""The files a run config reads, and the command (or step) that makes each: the one home of that knowledge.

`srdit study plan` / `srdit study run` check every trial's inputs with `input_problems` before any trial starts
(srdit.study.preflight); a single run checks its evaluation inputs with `srdit.evaluate.check_evaluation`, which
builds on the same table. Every field of `srdit.config.PATH_FIELDS` is covered: the known ones by a check that reads
what the run will read (a latent folder's index and shard manifests, DINOv2 repository + weights, Inception weights,
reference statistics, the teacher cache's meta.json and parts), any other by a plain existence check, so a path
field added to the config is checked too.

Cheap by design: a latent folder is checked by its index and the sizes in its shard manifests, not by hashing
terabytes (`srdit preprocess --verify DIR` hashes every shard).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from srdit.config import PATH_FIELDS, RunConfig, teacher_widths

Check = Callable[[RunConfig, str, str], "tuple[str, str] | None"]

OUTPUTS: dict[str, str] = {}
"""Path fields the run writes (created when missing), not inputs: field -> why it is not read. None today: every
PATH_FIELDS entry is an input (tests/test_preflight.py fails on a path field that is neither checked nor here)."""


@dataclass(frozen=True)
class Problem:
    """One missing or unusable input of a run."""

    field: str
    "Config key, e.g. `eval.reference`."
    path: str | None
    "The path the config gives (None when the field is unset but needed)."
    problem: str
    "What is wrong, in one sentence."
    fix: str
    "The `srdit` command that makes the file, or where to get it."

    def __str__(self) -> str:
        where = f"{self.field} {self.path}" if self.path else f"{self.field} (unset)"
        return f"{where}: {self.problem}" + (f"; {self.fix}" if self.fix else "")


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name, None)


def _needs_teacher(cfg: RunConfig) -> bool:
    return bool(teacher_widths(cfg.model)) and cfg.data.teacher != "digits-cnn"


def _reads_teacher_cache(cfg: RunConfig) -> bool:
    """Training reads the cache (never writes it) whenever it is set and an alignment loss needs teacher tokens
    (srdit.train.LatentBatches)."""
    return cfg.data.dataset == "latents" and bool(teacher_widths(cfg.model)) and bool(cfg.data.teacher_cache)


def _evaluates_latents(cfg: RunConfig) -> bool:
    return cfg.data.dataset == "latents" and bool(cfg.eval.reference)


def read_fields(cfg: RunConfig) -> list[str]:
    """The PATH_FIELDS this run reads (set, or needed and unset), in PATH_FIELDS order."""
    needed = {
        "data.path": cfg.data.dataset == "latents",
        "data.teacher_path": cfg.data.dataset == "latents" and _needs_teacher(cfg),
        "data.tokenizer_path": cfg.data.dataset == "latents" and bool(cfg.data.tokenizer),
        "data.teacher_cache": _reads_teacher_cache(cfg),
        "eval.reference": _evaluates_latents(cfg),
        "eval.inception_path": _evaluates_latents(cfg),
        "eval.dinov2_path": _evaluates_latents(cfg) and bool(cfg.eval.dinov2_path),
    }
    return [k for k in PATH_FIELDS if k not in OUTPUTS and needed.get(k, bool(_get(cfg, k)))]


# ----------------------------------------------------------------------------------------------------------------
# one check per known field: (cfg, path) -> problem text or None, and the fix
# ----------------------------------------------------------------------------------------------------------------


def _preprocess_cmd(cfg: RunConfig) -> str:
    keep = " --keep-images" if _needs_teacher(cfg) else ""
    return (
        f"make it with `srdit preprocess IMAGE_DIR {cfg.data.path} --tokenizer {cfg.data.tokenizer or 'invae'} "
        f"--weights {cfg.data.tokenizer_path or 'TOKENIZER_WEIGHTS'}{keep}`"
    )


def _check_latents(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    from srdit.data.latents import read_index, verify

    root = Path(path)
    if not root.is_dir():
        return "no such latent folder", _preprocess_cmd(cfg)
    try:
        index = read_index(root)
    except (FileNotFoundError, ValueError) as e:
        incomplete = "incomplete" in str(e)
        return (
            str(e).split(": ", 1)[-1].split(";")[0],
            "rerun the same `srdit preprocess` command to finish it" if incomplete else _preprocess_cmd(cfg),
        )
    problems = verify(root, checksums=False)
    if problems:
        return (
            f"{len(problems)} problem(s) in the shards ({problems[0]})",
            f"`srdit preprocess --verify {path}` lists them; rerun the `srdit preprocess` command that made it",
        )
    if _needs_teacher(cfg) and not cfg.data.teacher_cache and not index.get("image_shape"):
        return (
            "no image crops stored (the alignment teacher reads them)",
            f"{_preprocess_cmd(cfg)} into a new folder (--keep-images), or set data.teacher_cache to a "
            f"filled feature cache",
        )
    return None


def _cache_teacher_cmd(cfg: RunConfig, path: str) -> str:
    grid = cfg.model.input_size // cfg.model.patch_size
    return (
        f"make it with `srdit cache-teacher {cfg.data.path or 'LATENT_DIR'} --teacher {cfg.data.teacher} "
        f"--teacher-path {cfg.data.teacher_path or 'TEACHER_DIR'} --out {cfg.data.teacher_cache or path} "
        f"--grid {grid}`"
    )


def _check_teacher_cache(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    """What `srdit.data.teacher_cache.TeacherCache` refuses at the start of training, short of hashing the teacher's
    weights: no meta.json, a missing part, another grid or token width, another latent folder (by its index, when
    that folder is there)."""
    from srdit.data import teacher_cache as store
    from srdit.data.latents import INDEX, index_fingerprint

    try:
        meta = store.read_meta(path)
    except FileNotFoundError:
        return "no teacher cache (meta.json missing)", _cache_teacher_cmd(cfg, path)
    except ValueError as e:
        return str(e).split(": ", 1)[-1], _cache_teacher_cmd(cfg, path) + " into a new folder"
    parts = int(meta.get("parts", 0))
    missing = [k for k in range(parts) if not store.part_done(path, k, parts)]
    if missing:
        return (
            f"incomplete ({len(missing)} of {parts} parts missing, e.g. part {missing[0]})",
            "rerun the same `srdit cache-teacher` command that started it",
        )
    grid, want = cfg.model.input_size // cfg.model.patch_size, teacher_widths(cfg.model)
    if meta.get("grid") != grid or want != {meta.get("dim")}:
        return (
            f"made for a {meta.get('grid')}x{meta.get('grid')} grid of {meta.get('dim')}-d tokens, this run needs "
            f"a {grid}x{grid} grid of {'/'.join(map(str, sorted(want)))}-d tokens",
            _cache_teacher_cmd(cfg, path) + " into a new folder",
        )
    latents = Path(base, os.path.expanduser(cfg.data.path or ""))
    if cfg.data.path and (latents / INDEX).is_file() and meta.get("latents") != index_fingerprint(latents):
        return (
            f"made from another latent folder than data.path {cfg.data.path} (its index differs)",
            _cache_teacher_cmd(cfg, path) + " into a new folder",
        )
    return None


def _check_dinov2(name: str) -> Check:
    def check(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
        from srdit.encoders.dinov2 import REPO_URL, dinov2_files, weights_names

        model = name or cfg.data.teacher
        weights = weights_names(model)[0]
        url = f"https://dl.fbaipublicfiles.com/dinov2/{weights.rsplit('_pretrain', 1)[0]}/{weights}"
        if not Path(path).is_dir():
            return (
                f"no such folder (the DINOv2 {model} repository and weights)",
                f"on a machine with network access `git clone {REPO_URL}` into it and download {url} next to "
                f"it, then copy the folder here",
            )
        try:
            dinov2_files(model, path)
        except (FileNotFoundError, ValueError) as e:
            problem, _, fix = str(e).split(": ", 1)[-1].partition("; ")
            return problem, fix
        return None

    return check


def _check_tokenizer(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    if os.path.exists(path):
        return None
    what = (
        "the INVAE weights (e2e-invae-400k.pt, or a folder holding it)"
        if cfg.data.tokenizer == "invae"
        else "the SD-VAE diffusers folder (sd-vae-ft-ema)"
    )
    return (
        f"the {cfg.data.tokenizer} tokenizer weights that decode the samples are missing",
        f"copy {what} there from a machine with network access",
    )


def _reference_cmd(cfg: RunConfig) -> str:
    dino = f" --dinov2 {cfg.eval.dinov2_path}" if cfg.eval.dinov2_path else ""
    inc = cfg.eval.inception_path or "INCEPTION_WEIGHTS"
    return (
        f"make it with `srdit reference {cfg.data.path or 'LATENT_DIR'} {cfg.eval.reference} --inception {inc}{dino}`"
    )


def _check_reference(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    import numpy as np

    if not Path(path).is_file():
        return "no such reference statistics file", _reference_cmd(cfg)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        return f"unreadable ({type(e).__name__})", _reference_cmd(cfg)
    if not {"mu", "sigma"} <= keys:
        return f"no mu / sigma arrays (keys: {', '.join(sorted(keys))})", _reference_cmd(cfg)
    if cfg.eval.dinov2_path and "dinov2" not in keys:
        return (
            "holds no DINOv2 features but eval.dinov2_path is set",
            f"rebuild it: {_reference_cmd(cfg)}, or unset eval.dinov2_path",
        )
    return None


def _check_inception(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    from srdit.metrics.inception import resolve_weights

    try:
        resolve_weights(path)
    except FileNotFoundError as e:
        problem, _, how = str(e).partition(": ")
        return "FID Inception weights not found", how
    return None


def _check_dinov2_kd(cfg: RunConfig, path: str, base: str) -> tuple[str, str] | None:
    from srdit.metrics.dinov2_kd import DEFAULT_MODEL

    return _check_dinov2(DEFAULT_MODEL)(cfg, path, base)


CHECKS: dict[str, Check] = {
    "data.path": _check_latents,
    "data.teacher_path": _check_dinov2(""),
    "data.tokenizer_path": _check_tokenizer,
    "data.teacher_cache": _check_teacher_cache,
    "eval.reference": _check_reference,
    "eval.inception_path": _check_inception,
    "eval.dinov2_path": _check_dinov2_kd,
}
"""Field -> check(cfg, path resolved, base: the folder relative paths of cfg are meant from) returning (problem,
fix) or None. Fields not listed get an existence check."""

UNSET_FIX = {
    "data.path": "set it to a latent folder made by `srdit preprocess`",
    "data.teacher_path": "set it to a local DINOv2 folder (hubconf.py + weights)",
    "data.tokenizer_path": "set it to the tokenizer's local weights",
    "data.teacher_cache": "set it to a folder made by `srdit cache-teacher`",
    "eval.reference": "set it to an .npz made by `srdit reference`",
    "eval.inception_path": "set it to pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
}


def input_problems(cfg: RunConfig, fields: list[str] | None = None, base: str | None = None) -> list[Problem]:
    """Every missing or unusable input of `cfg` (restricted to `fields` when given), each with its fix. Relative
    paths are checked from `base` (default: the current directory) and shown as written."""
    out = []
    for key in read_fields(cfg):
        if fields is not None and key not in fields:
            continue
        path = _get(cfg, key)
        if not path:
            if key == "eval.inception_path" and os.environ.get("SRDIT_INCEPTION_WEIGHTS"):
                path = os.environ["SRDIT_INCEPTION_WEIGHTS"]
            else:
                out.append(Problem(key, None, "needed by this run but not set", UNSET_FIX.get(key, "")))
                continue
        path = os.path.join(base or os.getcwd(), os.path.expanduser(str(path)))
        check = CHECKS.get(key)
        if check is None:
            found = None if os.path.exists(path) else ("no such file or folder", "")
        else:
            found = check(cfg, path, base or os.getcwd())
        if found is not None:
            out.append(Problem(key, _get(cfg, key) or path, found[0], found[1]))
    return out


__all__ = ["Problem", "input_problems", "read_fields", "CHECKS", "OUTPUTS"]
