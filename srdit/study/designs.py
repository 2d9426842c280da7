"""Designs: which technique sets (cells) a study runs, and the trial list (cell x seed) the runner executes.

A cell id is a bit string over the study's techniques in the order they are listed ("000" = baseline). A
fractional factorial has the fewest runs its resolution allows: pyDOE3's fracfact_by_res where that has them, else
the standard minimum-aberration generators (`GENERATORS`, from Montgomery's table) or, past the table, a
construction (resolution III / IV) or pyDOE3's fracfact_opt; its resolution and alias structure are computed here from the design matrix itself (products of the +-1 columns), so a generator that
promises more than it delivers is caught.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from srdit.config import ConfigError, RunConfig, to_dict
from srdit.study.spec import StudySpec, check_resources, win_pairs
from srdit.techniques import TECHNIQUES, key_stage, training_config, with_techniques

# Cost-estimate assumptions for `srdit study plan` (measured on the 2-core CI box, debug model, 1 thread per trial).
ASSUMED_STEPS_PER_S = 7.0
"Training steps per second of one trial (debug SiT, batch 64, 1 CPU thread, two trials on a 2-core box)."
ASSUMED_EVAL_S_PER_KNFE = 0.5
"Seconds per 1000 sample-network evaluations (n_samples x sampler steps) in an evaluation, plus metrics."
ASSUMED_TRIAL_OVERHEAD_S = 1.5
"Per-trial start-up: imports in a fresh worker, data, MLflow run, sample grid."
ASSUMED_STUDY_OVERHEAD_S = 25.0
"Ray start, MLflow store, driver imports."


@dataclass(frozen=True)
class Cell:
    id: str
    "Bit string over the study's techniques, in the order listed."
    on: tuple[str, ...]
    "Techniques switched on (in the order listed)."


@dataclass(frozen=True)
class TrialSpec:
    key: str
    "Deterministic trial key: <cell>-s<seed>-<hash of the resolved config>; tags the MLflow child run."
    cell: str
    on: tuple[str, ...]
    seed: int
    config: dict
    "The resolved RunConfig as a plain dict (to_dict)."
    params: dict = field(default_factory=dict)
    "Searched knob values (search design only)."
    block: int | None = None
    "Fold-over only: the half the cell belongs to (0: the folded study's cells, 1: their mirror image)."

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "cell": self.cell,
            "on": list(self.on),
            "seed": self.seed,
            "config": self.config,
            "params": dict(self.params),
            **({} if self.block is None else {"block": self.block}),
        }


@dataclass(frozen=True)
class Training:
    """One training of a study: the trials (cell x seed) whose resolved configs train the same model (equal
    `srdit.techniques.training_config`, seed included). It trains once, in the folder of its first member (the
    training run); every member is evaluated under its own sample / eval settings and keeps its own child run."""

    key: str
    "`training_group_key` of the members' configs (the `training_group` tag): equal keys train the same model."
    members: tuple[str, ...]
    "Trial keys of the members, in plan order; the first one's trial folder holds the checkpoint."

    @property
    def trial_key(self) -> str:
        """The member whose trial folder holds the checkpoint (the training run)."""
        return self.members[0]


def training_group_key(config: dict) -> str:
    """The plan's grouping of trials into trainings within a study (the `training_group` tag): sha1 of a resolved
    config's training part (`srdit.techniques.training_config`), 10 hex digits. Not the content key that identifies
    a training across studies (the `training_key` tag, `srdit.runtime.reuse.content_keys`: it also covers the data
    and the code)."""
    return hashlib.sha1(json.dumps(training_config(config), sort_keys=True, default=str).encode()).hexdigest()[:10]


def group_trainings(trials: Sequence[TrialSpec], share: bool = True) -> list[Training]:
    """Trials grouped by their training config (`share`), else one training each (`study run --no-share`)."""
    if not share:
        return [Training(training_group_key(t.config), (t.key,)) for t in trials]
    groups: dict[str, list[str]] = {}
    for t in trials:
        groups.setdefault(training_group_key(t.config), []).append(t.key)
    return [Training(k, tuple(v)) for k, v in groups.items()]


@dataclass
class Plan:
    study: str
    design: str
    "Short design label (full, frac(res=5), ladder, loo, search)."
    factors: list[str]
    cells: list[Cell]
    excluded: list[dict]
    "Cells excluded by constraints or cross-field rules: {cell, techniques, reason}."
    trials: list[TrialSpec]
    aliases: dict[str, list[str]] = field(default_factory=dict)
    defining_relation: list[str] = field(default_factory=list)
    resolution: float | None = None
    "Achieved resolution of a fractional design (inf for a full factorial)."
    ladder_order: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    search_budget: int = 0
    "Trials of a search design (chosen while it runs)."
    base_config: dict = field(default_factory=dict)
    gpus_per_trial: float = 0
    "From the study's resources; with GPUs the plan also estimates GPU-hours from the model's MACs."
    trainings: list[Training] = field(default_factory=list)
    """The distinct trainings of the trials (grid designs); one per trial when sharing is off or every trial trains
    another model; empty for a search (chosen while it runs) and for a fixed-checkpoint study (nothing trains)."""
    checkpoint: str | None = None
    "A fixed-checkpoint study: the checkpoint every trial evaluates (no training)."

    foldover: dict = field(default_factory=dict)
    "Fold-over only: of (the folded study), factor (None: every sign), first / mirror (cell ids of the halves)."

    def _configs(self) -> list[dict]:
        return [t.config for t in self.trials] or [self.base_config] * self.search_budget

    def _trained(self) -> list[dict]:
        """The configs that train: one per training (a search: each sample; a fixed checkpoint: none)."""
        if self.checkpoint:
            return []
        if not self.trials:
            return self._configs()
        by_key = {t.key: t.config for t in self.trials}
        return [by_key[g.trial_key] for g in self.trainings] if self.trainings else self._configs()

    def gpu_estimate(self) -> dict | None:
        """GPU-hours from the model's MACs (srdit.study.compute): trainings (steps, each once) and evaluations
        (sampling of every trial at each of its evaluation steps) counted apart."""
        if not self.gpus_per_trial:
            return None
        from srdit.study.compute import gpu_hours

        configs, trained = self._configs(), self._trained()
        est = gpu_hours(configs)
        evals = gpu_hours(configs, train=False, final_only=bool(self.checkpoint))
        train = gpu_hours(trained, evaluate=False) if trained else {"gpu_hours": 0.0, "pflops": 0.0}
        total = round(train["gpu_hours"] + evals["gpu_hours"], 1)
        # elapsed time follows from the GPU-hours: each trial holds its GPUs for its GPU-hours / GPUs per trial
        return {
            **est,
            "gpu_hours": total,
            "pflops": round(train["pflops"] + evals["pflops"], 3),
            "training_gpu_hours": train["gpu_hours"],
            "evaluation_gpu_hours": evals["gpu_hours"],
            "gpu_hours_unshared": est["gpu_hours"],
            "gpus_per_trial": self.gpus_per_trial,
            "wall_hours_one_at_a_time": round(total / self.gpus_per_trial, 1),
        }

    def cost(self, steps_per_s: float = ASSUMED_STEPS_PER_S, concurrency: int = 1) -> dict:
        """Training steps and a wall-time estimate under stated throughput assumptions. Trainings and evaluations
        are counted apart: a shared training costs its steps once, and each of its members its sampling and
        metrics only; an evaluation of a fixed checkpoint evaluates once (its step) and starts a trial."""
        configs, trained = self._configs(), self._trained()
        steps = sum(c["train"]["steps"] for c in trained)
        train_s = sum(c["train"]["steps"] / steps_per_s + ASSUMED_TRIAL_OVERHEAD_S for c in trained)
        eval_s = 0.0
        for c in configs:
            tr, ev, sa = c["train"], c["eval"], c["sample"]
            n_evals = 1 if self.checkpoint else (tr["steps"] - 1) // tr["eval_every"] + 1 if tr["eval_every"] else 1
            knfe = (n_evals * ev["n_samples"] + 100) * sa["steps"] / 1000  # + the 100-image preview grid
            eval_s += knfe * ASSUMED_EVAL_S_PER_KNFE + (ASSUMED_TRIAL_OVERHEAD_S if self.checkpoint else 0.0)
        trial_s = train_s + eval_s
        units = len(trained) if trained else len(configs)  # Ray trials: one per training (or evaluation)
        conc = max(1, min(concurrency, units or 1))
        wall = ASSUMED_STUDY_OVERHEAD_S + trial_s / conc
        return {
            "trials": len(configs),
            "trainings": len(trained),
            "evaluations": len(configs),
            "total_steps": steps,
            "unshared_steps": sum(c["train"]["steps"] for c in configs),
            "training_seconds": round(train_s, 1),
            "evaluation_seconds": round(eval_s, 1),
            "trial_seconds": round(trial_s, 1),
            "concurrency": conc,
            "wall_seconds": round(wall, 1),
            "assumptions": f"{steps_per_s:g} steps/s per trial, {ASSUMED_EVAL_S_PER_KNFE:g} s per 1000 sampler "
            f"evaluations, {ASSUMED_TRIAL_OVERHEAD_S:g} s start-up per trial, "
            f"{ASSUMED_STUDY_OVERHEAD_S:g} s per study, {conc} trial(s) at once",
        }

    def to_json(self, steps_per_s: float = ASSUMED_STEPS_PER_S, concurrency: int = 1) -> dict:
        return {
            "study": self.study,
            "design": self.design,
            "factors": self.factors,
            "cells": [{"cell": c.id, "techniques": list(c.on)} for c in self.cells],
            "excluded": self.excluded,
            "aliases": self.aliases,
            "defining_relation": self.defining_relation,
            "resolution": None
            if self.resolution is None
            else ("full" if math.isinf(self.resolution) else int(self.resolution)),
            "ladder_order": self.ladder_order,
            "notes": self.notes,
            "trials": [{"key": t.key, "cell": t.cell, "seed": t.seed, "techniques": list(t.on)} for t in self.trials],
            "trainings": [
                {"key": g.key, "training_run": g.trial_key, "members": list(g.members)} for g in self.trainings
            ],
            "checkpoint": self.checkpoint,
            "cost": self.cost(steps_per_s, concurrency),
            "gpu": self.gpu_estimate(),
            "foldover": self.foldover or None,
        }


# ------------------------------------------------------------------------------------------------------------------
# two-level designs: matrices, resolution, aliases
# ------------------------------------------------------------------------------------------------------------------


def full_factorial_matrix(k: int) -> np.ndarray:
    """All 2^k rows in +-1 coding, the last factor varying fastest (row 0 = all off)."""
    return np.array(list(itertools.product([-1, 1], repeat=k)), dtype=int).reshape(-1, k)


def _columns_as_ints(matrix: np.ndarray) -> list[int]:
    """Each +-1 column as an int bit mask over rows (bit set where the level is -1): a product of columns is XOR."""
    bits = np.asarray(matrix) < 0
    return [int("".join("1" if b else "0" for b in bits[:, j]) or "0", 2) for j in range(bits.shape[1])]


def defining_words(matrix: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
    """Words of the defining relation: factor subsets whose column product is constant, with its sign (+1/-1)."""
    n, k = np.asarray(matrix).shape
    cols = _columns_as_ints(matrix)
    ones = (1 << n) - 1
    prod = [0] * (1 << k)
    words = []
    for s in range(1, 1 << k):
        low = (s & -s).bit_length() - 1
        prod[s] = prod[s & (s - 1)] ^ cols[low]
        if prod[s] in (0, ones):
            words.append((tuple(j for j in range(k) if s >> j & 1), 1 if prod[s] == 0 else -1))
    return words


def resolution(matrix: np.ndarray) -> float:
    """Length of the shortest word of the defining relation (inf for a full factorial / no word)."""
    words = defining_words(matrix)
    return float(min(len(w) for w, _ in words)) if words else math.inf


def effect_name(factors: Sequence[str], idx: Iterable[int]) -> str:
    return ":".join(factors[i] for i in idx)


def alias_map(matrix: np.ndarray, factors: Sequence[str], max_order: int = 3) -> dict[str, list[str]]:
    """Effect (main or two-factor interaction) -> aliased effects up to `max_order` factors ("-" marks an opposite
    sign). Only effects with at least one alias appear."""
    m = np.asarray(matrix, dtype=int)
    k = m.shape[1]
    effects = [c for r in range(1, max_order + 1) for c in itertools.combinations(range(k), r)]
    cols = {e: np.prod(m[:, list(e)], axis=1) for e in effects}
    out: dict[str, list[str]] = {}
    for e in effects:
        if len(e) > 2:
            continue
        partners = []
        for f in effects:
            if f == e:
                continue
            if np.array_equal(cols[e], cols[f]):
                partners.append(effect_name(factors, f))
            elif np.array_equal(cols[e], -cols[f]):
                partners.append("-" + effect_name(factors, f))
        if partners:
            out[effect_name(factors, e)] = partners
    return out


def min_runs(k: int, res: int) -> int:
    """Fewest runs of a two-level design (a power of two) for k factors at resolution >= res, as the standard tables
    give them (Montgomery, Design and Analysis of Experiments, 8th ed., Table 8.14; Box, Hunter & Hunter 2005,
    Table 6.22): resolution III needs 2^m >= k + 1 (a saturated design holds 2^m - 1 factors), resolution IV
    2^m >= 2k (at most 2^m / 2 factors: a folded-over resolution III design), resolution V the run counts of
    `RES_V_RUNS` (no closed form). None where the table ends (resolution V beyond 17 factors, VI and above)."""
    if res > k:
        return 2**k
    if res <= 3:
        return 1 << (k).bit_length()  # smallest 2^m > k
    if res == 4:
        return max(8, 1 << (2 * k - 1).bit_length())
    if res == 5:
        return RES_V_RUNS.get(k)
    return None


RES_V_RUNS = {5: 16, 6: 32, 7: 64, 8: 64, 9: 128, 10: 128, 11: 128, **{k: 256 for k in range(12, 18)}}
"""Fewest runs of a resolution >= V two-level design for k factors (Montgomery Table 8.14; 2^(17-9)_V is the
largest resolution V design in 256 runs)."""

GENERATORS: dict[tuple[int, int], tuple[str, ...]] = {
    # resolution III (in the fewest runs; several are resolution IV there)
    (3, 3): ("ab",),
    (4, 3): ("abc",),
    (5, 3): ("ab", "ac"),
    (6, 3): ("ab", "ac", "bc"),
    (7, 3): ("ab", "ac", "bc", "abc"),
    (8, 3): ("bcd", "acd", "abc", "abd"),
    (9, 3): ("abc", "bcd", "acd", "abd", "abcd"),
    (10, 3): ("abc", "bcd", "acd", "abd", "abcd", "ab"),
    (11, 3): ("abc", "bcd", "acd", "abd", "abcd", "ab", "ac"),
    # resolution IV
    (4, 4): ("abc",),
    (5, 4): ("abcd",),
    (6, 4): ("abc", "bcd"),
    (7, 4): ("abc", "bcd", "acd"),
    (8, 4): ("bcd", "acd", "abc", "abd"),
    (9, 4): ("bcde", "acde", "abde", "abce"),
    (10, 4): ("abcd", "abce", "abde", "acde", "bcde"),
    (11, 4): ("abc", "bcd", "cde", "acd", "ade", "bde"),
    # resolution V
    (5, 5): ("abcd",),
    (6, 5): ("abcde",),
    (7, 5): ("abcdef",),
    (8, 5): ("abcd", "abef"),
    (9, 5): ("acdfg", "bcefg"),
    (10, 5): ("abcg", "bcde", "acdf"),
    (11, 5): ("abcg", "bcde", "acdf", "abcdefg"),
}
"""(k, resolution) -> the generators of the added factors (products of the base factors a, b, c, ...) of the
minimum-aberration 2^(k-p) design in the fewest runs: Montgomery, Design and Analysis of Experiments (8th ed.),
Table 8.14 "Selected 2^(k-p) fractional factorial designs" (after Box, Hunter & Hunter), letters as there with
the base factors first. Used where pyDOE3 finds no design or one with more runs; the resolution of every entry is
recomputed from its matrix (tests/test_designs.py)."""

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _generator_matrix(base: int, words: Sequence[str]) -> tuple[np.ndarray, str]:
    """The 2^base-run design of the base factors (full factorial) and one added column per generator word, built by
    pyDOE3.fracfact (its row order, as for its own designs); the generator in its notation ("a b c ab")."""
    import pyDOE3

    gen = " ".join([*_LETTERS[:base], *words])
    return np.asarray(pyDOE3.fracfact(gen), dtype=int), gen


def _constructed(k: int, res: int) -> tuple[np.ndarray, str]:
    """A resolution III / IV design in `min_runs(k, res)` runs beyond the table: 2^m runs of m base factors, the added
    columns the products of an odd number (>= 3) of base factors (no word of length < 4 among them: the product of
    three odd-length columns has odd length, of two is a non-empty even one), longest first; resolution III then
    adds even products, longest first (distinct columns: no word of length < 3)."""
    m = min_runs(k, res).bit_length() - 1
    subsets = [c for r in range(m, 1, -1) for c in itertools.combinations(_LETTERS[:m], r)]
    odd = [c for c in subsets if len(c) % 2]
    even = [c for c in subsets if not len(c) % 2]
    words = ["".join(c) for c in (odd + even if res <= 3 else odd)][: k - m]
    return _generator_matrix(m, words)


def fractional_matrix(k: int, res: int) -> tuple[np.ndarray, str]:
    """A two-level design for k factors with resolution >= res in the fewest runs (`min_runs`); (+-1 matrix,
    generator).

    In this order, the first with the fewest runs: pyDOE3.fracfact_by_res's design, pyDOE3.fracfact_opt's
    (resolution V and above: minimum aberration among the generators it tries), the standard minimum-aberration
    design of `GENERATORS`, and past the table `_constructed` (resolution III / IV). pyDOE3 first keeps the cells of every study it planned
    before; the table covers where it fails (resolution III with 7 factors) or needs more runs (resolution V with 10
    or 11 factors). Beyond all that (resolution V past 11 factors, VI and above): fracfact_opt with ever more runs,
    then the full factorial. Every candidate's resolution is computed from its matrix (`resolution`)."""
    import pyDOE3

    if res > k:
        return full_factorial_matrix(k), " ".join(_LETTERS[:k])
    fewest = min_runs(k, res)
    found: tuple[np.ndarray, str] | None = None
    try:
        m = np.asarray(pyDOE3.fracfact_by_res(k, res), dtype=int)
        if resolution(m) >= res:
            found = m, "fracfact_by_res"
    except ValueError:  # pyDOE3: "design not possible" and other failures of its search
        pass
    if fewest is not None:
        if found is not None and found[0].shape[0] <= fewest:
            return found
        # fracfact_opt's search grows with k: past resolution IV's reach the construction is immediate
        m_opt = None if res <= 4 else _fracfact_opt(k, k - (fewest.bit_length() - 1), res)
        if m_opt is not None:
            return m_opt
        if (k, res) in GENERATORS:
            words = GENERATORS[k, res]
            return _generator_matrix(k - len(words), words)
        if res <= 4:
            return _constructed(k, res)
    for p in range(k - 1, 0, -1):
        runs = 2 ** (k - p)
        if runs < (fewest or 1 + k + k * (k - 1) // 2) or runs == fewest:
            continue
        if found is not None and found[0].shape[0] <= runs:
            return found
        m_opt = _fracfact_opt(k, p, res)
        if m_opt is not None:
            return m_opt
    return found or (full_factorial_matrix(k), " ".join(_LETTERS[:k]))


def _fracfact_opt(k: int, p: int, res: int) -> tuple[np.ndarray, str] | None:
    """pyDOE3.fracfact_opt's 2^(k-p) design when it has resolution >= res; None when it has not or pyDOE3 fails."""
    import pyDOE3

    if p < 1:
        return None
    try:
        gen = pyDOE3.fracfact_opt(k, p, max_attempts=400)[0]
    except ValueError:  # e.g. "Too many erased factors to create aliasing" (resolution III, 7 factors)
        return None
    m = np.asarray(pyDOE3.fracfact(gen), dtype=int)
    return (m, gen) if resolution(m) >= res else None


def foldover(matrix: np.ndarray, flip: Sequence[int] | None = None) -> np.ndarray:
    """The mirror image of a two-level design: (runs, k) +-1 rows with every sign flipped (`flip` None) or only the
    columns `flip` (indices) flipped.

    Added to the design as a second block it de-aliases (Montgomery, *Design and Analysis of Experiments*, 8.6;
    Box, Hunter & Hunter ch. 6): a full fold-over frees every main effect from the two-factor interactions (the
    words of odd length change sign and leave the defining relation); folding on one factor frees that factor's main
    effect and every pair involving it (the words containing it leave)."""
    m = np.array(matrix, dtype=int)
    if flip is None:
        return -m
    m[:, list(flip)] *= -1
    return m


def _pm_rows(names: Sequence[str], sets: Iterable[Iterable[str]]) -> np.ndarray:
    """Technique sets -> (runs, k) +-1 rows over `names`."""
    return np.array([[1 if n in set(on) else -1 for n in names] for on in sets], dtype=int).reshape(-1, len(names))


def _sets(names: Sequence[str], matrix: np.ndarray) -> list[tuple[str, ...]]:
    """(runs, k) +-1 rows -> the technique set of each row."""
    return [tuple(n for n, lv in zip(names, r) if lv > 0) for r in np.asarray(matrix).tolist()]


def _relation(names: Sequence[str], matrix: np.ndarray) -> list[str]:
    return ["I = " + ("-" if sg < 0 else "") + effect_name(names, w) for w, sg in defining_words(matrix)]


def foldover_design(spec: StudySpec) -> tuple[list[tuple[str, ...]], dict]:
    """Cells of a `foldover` design: the folded study's fraction (half 1, block 0) and its mirror image (half 2,
    block 1), with the defining relation, resolution and aliases of the combined matrix, and `blocks` (cell id ->
    half). Raises ConfigError when the mirror reproduces the fraction itself (a full fold-over of a design whose words
    all have even length, or a factor that is in no word): such a fold-over adds no cell."""
    other, factor = spec.design.of, spec.design.factor
    names = spec.factor_names
    k = len(names)
    first_sets, _ = design_cells(other)
    first = _pm_rows(names, first_sets)
    mirror = foldover(first, None if factor is None else [names.index(factor)])
    relation = ", ".join(_relation(names, first)) or "none"
    seen = {tuple(r) for r in first.tolist()}
    if {tuple(r) for r in mirror.tolist()} == seen:
        if factor is None:
            raise ConfigError(
                f"design: flipping every sign of {other.name}'s fraction gives back the same {len(first)} cells: "
                f"every word of its defining relation ({relation}) has even length, so a full fold-over leaves it "
                f"unchanged; give design.factor: NAME to fold on one technique (it frees that technique's main "
                f"effect and its pairs); allowed: {', '.join(names)}"
            )
        used = sorted({names[j] for w, _ in defining_words(first) for j in w}, key=names.index)
        raise ConfigError(
            f"design.factor: flipping {factor} gives back {other.name}'s own {len(first)} cells: "
            f"{factor} is in no word of its defining relation ({relation}); fold on a technique that "
            f"is: {', '.join(used)}"
        )
    mirror = np.array([r for r in mirror.tolist() if tuple(r) not in seen], dtype=int).reshape(-1, k)
    combined = np.vstack([first, mirror])
    achieved = resolution(combined)
    aliases = alias_map(combined, names)
    flat = [{e, *(a.lstrip("-") for a in al)} for e, al in aliases.items()]
    low = sorted(
        {
            " = ".join(sorted((x for x in g if x.count(":") < 2), key=lambda x: (x.count(":"), x)))
            for g in flat
            if sum(x.count(":") < 2 for x in g) > 1
        }
    )
    first_ids = [cell_id(spec, on) for on in _sets(names, first)]
    mirror_ids = [cell_id(spec, on) for on in _sets(names, mirror)]
    how = "every sign flipped" if factor is None else f"{factor}'s column flipped"
    if math.isinf(achieved):
        combined_note = f"combined design: the full 2^{k} factorial ({len(combined)} cells)"
    else:
        p = int(round(k - math.log2(len(combined))))
        combined_note = f"combined design: 2^({k}-{p}), {len(combined)} of {2**k} cells, resolution {int(achieved)}"
    notes = [
        f"fold-over of {other.name} ({how}): half 1 (block 0) = its {len(first)} cells, half 2 (block 1) = "
        f"their {len(mirror)} mirror cells; both halves are analysed as one design with a block term for the "
        f"halves",
        combined_note,
        "main effects and pairs still aliased with each other: " + "; ".join(low)
        if low
        else "no main effect or pair is aliased with another main effect or pair",
        f"from {other.name} (reused when its runs are finished): cells {', '.join(first_ids)}",
    ]
    info = {
        "resolution": achieved,
        "aliases": aliases,
        "defining_relation": _relation(names, combined),
        "notes": notes,
        "blocks": {**{c: 0 for c in first_ids}, **{c: 1 for c in mirror_ids}},
        "foldover": {
            "of": other.name,
            "of_path": other.path,
            "factor": factor,
            "first": first_ids,
            "mirror": mirror_ids,
        },
    }
    return _sets(names, combined), info


# ------------------------------------------------------------------------------------------------------------------
# cells -> configs
# ------------------------------------------------------------------------------------------------------------------


def cell_id(spec: StudySpec, on: Iterable[str]) -> str:
    on = set(on)
    return "".join("1" if n in on else "0" for n in spec.factor_names)


def make_cell(spec: StudySpec, on: Iterable[str]) -> Cell:
    on = set(on)
    return Cell(cell_id(spec, on), tuple(n for n in spec.factor_names if n in on))


def violated(spec: StudySpec, on: Sequence[str]) -> str | None:
    """The constraint a technique set breaks, phrased as the reason for excluding it; None if none."""
    s = set(on)
    for c in spec.constraints:
        if c.kind == "requires" and c.a in s:
            missing = [o for o in c.others if o not in s]
            if missing:
                return f"constraint: {c.a} requires {' and '.join(missing)}"
        if c.kind == "excludes":
            both = [n for n in (c.a,) + c.others if n in s]
            if len(both) > 1:
                return f"constraint: {' and '.join(both)} exclude each other"
    return None


def resolve_config(spec: StudySpec, on: Sequence[str], seed: int, knobs: dict[str, Any] | None = None) -> RunConfig:
    """base + the merged diffs of `on` (srdit.techniques.merge_diffs: shared keys take the `wins` technique's value;
    searched `knobs` apply to techniques that are on) with train.seed = seed, validated, and checked against the
    study's resources (`check_resources`): every cell's config, not only the base. Raises ConfigError."""
    seeds = {"train.seed": seed, **({"eval.seed": seed} if spec.checkpoint else {})}  # a fixed model: the seed draws
    cfg = with_techniques(
        spec.base,
        [spec.factor(n).technique for n in on],
        wins=win_pairs(spec.constraints),
        searched=knobs,
        off=[n for n in spec.factor_names if n not in on],
        extra=seeds,
    )
    check_resources(cfg, spec.resources)
    return cfg


def trial_key(cell: str, seed: int, config: dict) -> str:
    h = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cell}-s{seed}-{h}"


def make_trial(spec: StudySpec, cell: Cell, seed: int, knobs: dict[str, Any] | None = None) -> TrialSpec:
    cfg = to_dict(resolve_config(spec, cell.on, seed, knobs))
    return TrialSpec(trial_key(cell.id, seed, cfg), cell.id, cell.on, seed, cfg, dict(knobs or {}))


# ------------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------------


def design_cells(spec: StudySpec) -> tuple[list[tuple[str, ...]], dict]:
    """Technique sets of the design (before constraints) and design facts (aliases, resolution, ...)."""
    names = spec.factor_names
    k = len(names)
    d = spec.design
    info: dict[str, Any] = {}
    if d.kind == "full_factorial":
        rows = full_factorial_matrix(k)
        info["resolution"] = math.inf
    elif d.kind == "fractional_factorial":
        rows, gen = fractional_matrix(k, d.resolution)
        achieved = resolution(rows)
        words = defining_words(rows)
        info.update(
            resolution=achieved,
            generator=gen,
            aliases=alias_map(rows, names),
            defining_relation=["I = " + ("-" if sg < 0 else "") + effect_name(names, w) for w, sg in words],
        )
        if math.isinf(achieved):
            info["notes"] = [
                f"resolution {d.resolution} with {k} techniques needs every cell: this is the full "
                f"factorial ({len(rows)} cells)"
            ]
        else:
            info["notes"] = [
                f"2^({k}-{int(round(k - math.log2(len(rows))))}) design, {len(rows)} of {2**k} cells, "
                f"resolution {int(achieved)} (generator: {gen})"
            ]
    elif d.kind == "ladder":
        sets = [tuple(d.order[:i]) for i in range(len(d.order) + 1)]
        info["ladder_order"] = list(d.order)
        return sets, info
    elif d.kind == "leave_one_out":
        full = tuple(names)
        return [full] + [tuple(n for n in names if n != m) for m in names], info
    elif d.kind == "foldover":
        return foldover_design(spec)
    else:
        return [], info
    sets = [tuple(n for n, level in zip(names, row) if level > 0) for row in rows]
    return sets, info


def check_fixed_checkpoint(spec: StudySpec) -> None:
    """A fixed-checkpoint study evaluates one trained model: ConfigError naming a factor that would train another
    (a training-time technique, or a knob override that writes a training-time key), or a search design."""
    if not spec.checkpoint:
        return
    where = f"{spec.path or spec.name}: checkpoint"
    if spec.design.kind == "search":
        raise ConfigError(
            f"{where}: a fixed checkpoint is evaluated, not searched; use a grid design "
            f"(full_factorial, fractional_factorial, ladder, leave_one_out)"
        )
    for f in spec.factors:
        keys = [k for k in f.technique.diff if key_stage(k) == "train"]
        if f.technique.stage != "eval" or keys:
            raise ConfigError(
                f"{where}: technique {f.name} changes the training ({', '.join(keys[:3]) or 'model'}),"
                f" but every cell evaluates the fixed checkpoint {spec.checkpoint}; only evaluation-time "
                f"techniques may be factors ({', '.join(n for n, x in TECHNIQUES.items() if x.stage == 'eval')}"
                f", or custom diffs of sample.* / eval.* keys)"
            )


def plan_study(spec: StudySpec, share: bool = True) -> Plan:
    """Cells, excluded cells (with reasons), the trial list (cell x seed) and its trainings: trials with equal
    training configs share one training (`share`; off: one training per trial); a fixed-checkpoint study trains
    nothing. Raises ConfigError on plan errors."""
    check_fixed_checkpoint(spec)
    sets, info = design_cells(spec)
    cells: list[Cell] = []
    excluded: list[dict] = []
    trials: list[TrialSpec] = []
    seen = set()
    for on in sets:
        cell = make_cell(spec, on)
        if cell.id in seen:
            continue
        seen.add(cell.id)
        reason = violated(spec, cell.on)
        cell_trials = []
        if reason is None:
            try:
                cell_trials = [make_trial(spec, cell, s) for s in spec.seeds]
            except ConfigError as e:
                reason = f"invalid config: {e}"
        if reason is not None:
            excluded.append({"cell": cell.id, "techniques": list(cell.on), "reason": reason})
            continue
        cells.append(cell)
        trials += cell_trials
    notes = list(info.get("notes", []))
    if spec.design.kind == "search":
        notes.append(
            f"search: {spec.design.trials} trials chosen by Optuna (via Ray Tune's OptunaSearch) over "
            f"{len(spec.factors)} technique switches and {len(spec.design.space)} knob(s), seed "
            f"{spec.seeds[0]}; objectives: {', '.join(search_objectives(spec))}"
        )
    elif not cells:
        raise ConfigError(
            f"{spec.path or spec.name}: every cell of the design is excluded: "
            + "; ".join(f"{e['cell']}: {e['reason']}" for e in excluded[:3])
        )
    blocks = info.get("blocks", {})
    trials = [replace(t, block=blocks[t.cell]) if t.cell in blocks else t for t in trials]
    trainings = [] if spec.checkpoint else group_trainings(trials, share)
    if spec.checkpoint:
        notes.append(
            f"fixed checkpoint {spec.checkpoint}: nothing trains; every trial evaluates it, and a seed is "
            f"the evaluation's (eval.seed)"
        )
    elif trials and not share:
        notes.append("sharing off (--no-share): every trial trains its own model")
    return Plan(
        spec.name,
        spec.design.label,
        spec.factor_names,
        cells,
        excluded,
        trials,
        aliases=info.get("aliases", {}),
        defining_relation=info.get("defining_relation", []),
        resolution=info.get("resolution"),
        ladder_order=info.get("ladder_order"),
        notes=notes,
        search_budget=spec.design.trials if spec.design.kind == "search" else 0,
        base_config=to_dict(spec.base),
        gpus_per_trial=spec.resources.gpus,
        trainings=trainings,
        checkpoint=spec.checkpoint,
        foldover=info.get("foldover", {}),
    )


def submission_order(trials: Sequence[Any]) -> list[Any]:
    """The order in which a runner submits `trials` (TrialSpecs or their dicts, with `cell` and `seed`): one round
    per seed, each round a different deterministic shuffle of the cells, and no cell twice in a row across the
    rounds' boundary. Trials that run at the same time then differ from round to round, so the machine's load (a
    neighbour's evaluation, the other seed of the same cell) does not line up with cells; the plan keeps the
    design's order (cells, then seeds).

    Deterministic: the same trials give the same order (the shuffle's seed is derived from the cell ids)."""
    get = (lambda t, k: t[k]) if trials and isinstance(trials[0], dict) else getattr  # noqa: E731
    rounds: dict[Any, list] = {}
    for t in trials:
        rounds.setdefault(get(t, "seed"), []).append(t)
    out: list[Any] = []
    for r, group in enumerate(rounds.values()):
        salt = zlib.crc32("|".join(sorted(str(get(t, "cell")) for t in group)).encode())
        order = list(np.random.default_rng([salt, r]).permutation(len(group)))
        group = [group[i] for i in order]
        if out and len(group) > 1 and get(group[0], "cell") == get(out[-1], "cell"):
            group = group[1:] + group[:1]
        out += group
    return out


def search_objectives(spec: StudySpec) -> list[str]:
    return list(spec.design.objectives) or [spec.metrics.primary]


def format_plan(plan: Plan, steps_per_s: float = ASSUMED_STEPS_PER_S, concurrency: int = 1) -> str:
    """Human-readable plan for `srdit study plan`."""
    lines = [f"study {plan.study}: design {plan.design}, techniques {', '.join(plan.factors)}"]
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.cells:
        lines.append(f"cells ({len(plan.cells)}):")
        half = {
            **{c: f"  [half 1: from {plan.foldover['of']}]" for c in plan.foldover.get("first", [])},
            **{c: "  [half 2: mirror]" for c in plan.foldover.get("mirror", [])},
        }
        for c in plan.cells:
            lines.append(f"  {c.id}  {'+'.join(c.on) if c.on else 'baseline'}{half.get(c.id, '')}")
    if plan.excluded:
        lines.append(f"excluded cells ({len(plan.excluded)}):")
        for e in plan.excluded:
            lines.append(f"  {e['cell']}  {'+'.join(e['techniques']) or 'baseline'}: {e['reason']}")
    if plan.defining_relation:
        lines.append("defining relation: " + ", ".join(plan.defining_relation))
    if plan.aliases:
        lines.append("aliases (effects up to 3 techniques; '-' = opposite sign):")
        for eff, al in plan.aliases.items():
            lines.append(f"  {eff} = {' = '.join(al)}")
    elif plan.resolution is not None and plan.design.startswith(("frac", "foldover")):
        lines.append("aliases: none among main effects, 2- and 3-technique interactions")
    if plan.ladder_order:
        lines.append("ladder order: " + " -> ".join(plan.ladder_order))
    cost = plan.cost(steps_per_s, concurrency)
    seeds = sorted({t.seed for t in plan.trials})
    if plan.trials or plan.search_budget:
        if plan.trials:
            lines.append(f"trials: {cost['trials']} ({len(plan.cells)} cells x {len(seeds)} seeds {seeds})")
            instead = "one per trial" if cost["trainings"] == cost["trials"] else f"instead of {cost['trials']}"
            lines.append(
                f"trainings: {cost['trainings']} ({instead}), evaluations: {cost['evaluations']}" + _saved(plan, cost)
            )
        else:
            lines.append(f"trials: {cost['trials']} (search budget)")
        gpu = plan.gpu_estimate()
        if not gpu:
            lines.append(
                f"cost: {cost['total_steps']} training steps in all; estimated wall time "
                f"{_fmt_s(cost['wall_seconds'])} ({cost['assumptions']})"
            )
        else:  # GPU trials: time from the model's FLOPs (a CPU steps/s assumption says nothing about them)
            g, h = gpu["gpus_per_trial"], gpu["wall_hours_one_at_a_time"]
            n = cost["trials"]
            lines.append(f"cost: {cost['total_steps']} training steps in all")
            lines.append(
                f"compute: {gpu['pflops']:g} PFLOP (training + evaluation sampling, from the model's MACs); "
                f"about {gpu['gpu_hours']:g} GPU-hours in all (GPU-hours = GPUs x hours, summed over the "
                f"{n} trials: {gpu['training_gpu_hours']:g} for {cost['trainings']} trainings, "
                f"{gpu['evaluation_gpu_hours']:g} for {n} evaluations; {gpu['gpu_hours_unshared']:g} if every "
                f"trial trained) at {gpu['assumption']}"
            )
            lines.append(
                f"wall: about {h:g} h elapsed with one trial at a time on {g:g} GPU(s) (each trial holds "
                f"{g:g} GPU(s): GPU-hours / {g:g}); k trials at once on k x {g:g} GPUs take about "
                f"{h:g} / k h"
            )
    return "\n".join(lines)


def _saved(plan: Plan, cost: dict) -> str:
    """What sharing saves, for the plan's trainings line."""
    if plan.checkpoint:
        return f"; nothing trains: every trial evaluates the fixed checkpoint {plan.checkpoint}"
    saved = cost["unshared_steps"] - cost["total_steps"]
    if not saved:
        return ""
    n = cost["trials"] - cost["trainings"]
    return (
        f"; sharing saves {n} training{'s' if n != 1 else ''} ({saved} of "
        f"{cost['unshared_steps']} training steps): trials that differ only in evaluation-time settings are "
        f"evaluated from one training"
    )


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
