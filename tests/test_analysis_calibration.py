"""Calibration of the analysis by simulation (slow: a few hundred simulated studies each): the simultaneous
coverage of the printed pair intervals, the family-wise false-flag rate in null studies, the coverage of the seed
bootstrap where it is kept, and the failure-interaction test on two independently flaky techniques."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from srdit.analysis.effects import Options, analyze, fit_effects, pair_synergies, prepare

pytestmark = pytest.mark.slow


def _layout(k: int, n_seeds: int) -> pd.DataFrame:
    F = [chr(65 + i) for i in range(k)]
    rows = [{**dict(zip(F, lv)), "seed": s} for lv in itertools.product([0, 1], repeat=k) for s in range(n_seeds)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [3, 4])  # 3 and 6 pairs
def test_simultaneous_coverage_of_pair_intervals_and_false_flag_rate(k):
    n_sims, n_seeds = 500, 3
    base = _layout(k, n_seeds)
    F = [c for c in base.columns if c != "seed"]
    pm = 2 * base[F].to_numpy() - 1
    rng = np.random.default_rng(100 + k)
    # truth: main effects, seed effects and pair synergies (half of the pairs non-zero) on the +-1 scale
    pairs = list(itertools.combinations(range(k), 2))
    beta_pair = np.array([0.0 if i % 2 else 0.6 for i in range(len(pairs))])
    truth_S = {f"{F[a]}:{F[b]}": 4 * bp for (a, b), bp in zip(pairs, beta_pair)}  # S = 4 b for "max"
    mean = 10 + pm @ np.linspace(0.5, 1.0, k) + sum(bp * pm[:, a] * pm[:, b] for (a, b), bp in zip(pairs, beta_pair))
    mean = mean + 0.4 * base["seed"].to_numpy()
    o = Options(bootstrap=False)
    covered, null_flags = 0, 0
    for _ in range(n_sims):
        df = base.assign(y=mean + rng.normal(0, 1.0, len(base)))
        p = prepare(df, F, "y", "max")
        pr = pair_synergies(fit_effects(p, o), o)
        covered += all(pr.synergy_ci[n][0] <= t <= pr.synergy_ci[n][1] for n, t in truth_S.items())
        # null pairs: neither starred nor flagged
        null_flags += any(
            n in pr.significant or any(f.pair == n for f in pr.antagonism) for n, t in truth_S.items() if t == 0
        )
    assert covered / n_sims >= 0.94
    assert null_flags / n_sims <= 0.05


def test_null_studies_flag_at_most_five_percent():
    n_sims = 400
    base = _layout(4, 3)
    F = list("ABCD")
    rng = np.random.default_rng(7)
    o = Options(bootstrap=False)
    flagged = 0
    for _ in range(n_sims):
        df = base.assign(y=10 + rng.normal(0, 1.0, len(base)))
        pr = pair_synergies(fit_effects(prepare(df, F, "y", "min"), o), o)
        flagged += bool(pr.antagonism or pr.significant)
    assert flagged / n_sims <= 0.05


def test_bootstrap_coverage_where_it_is_kept():
    # kept only with >= 20 seeds per cell: the interval of each effect covers its truth at about the nominal rate
    n_sims = 400
    base = _layout(2, 20)
    pm = 2 * base[["A", "B"]].to_numpy() - 1
    mean = 5 + 0.5 * pm[:, 0] - 0.25 * pm[:, 0] * pm[:, 1]
    truth = {"A": 1.0, "B": 0.0, "A:B": -0.5}
    rng = np.random.default_rng(3)
    hits = {n: 0 for n in truth}
    for _ in range(n_sims):
        df = base.assign(y=mean + rng.standard_t(8, len(base)))
        r = analyze(df, ["A", "B"], "y", "max", n_resamples=499, random_state=int(rng.integers(1 << 30)))
        for n, t in truth.items():
            lo, hi = r.bootstrap.ci[n]
            hits[n] += lo <= t <= hi
    cover = {n: h / n_sims for n, h in hits.items()}
    assert sum(cover.values()) / len(cover) >= 0.93, cover  # nominal 0.95; binomial sd of each rate about 0.011
    assert min(cover.values()) >= 0.91, cover


def test_two_independently_flaky_techniques_are_not_a_failure_interaction():
    # survival multiplies: P(ok | A and B) = 0.6 * 0.6; both-on fails more than each alone, but no interaction
    F = ["A", "B"]
    rng = np.random.default_rng(11)
    flagged = 0
    for _ in range(100):
        rows = []
        for a, b in itertools.product([0, 1], repeat=2):
            for s in range(20):
                fail = (a and rng.random() < 0.4) | (b and rng.random() < 0.4)
                rows.append(
                    {
                        "A": a,
                        "B": b,
                        "seed": s,
                        "status": "crashed" if fail else "finished",
                        "y": np.nan if fail else rng.normal(),
                    }
                )
        r = analyze(pd.DataFrame(rows), F, "y", "max", bootstrap=False)
        flagged += bool(r.failures.flagged)
    assert flagged <= 8  # nominal 5% (the intersection-union test alone flags about 21% of such studies)
