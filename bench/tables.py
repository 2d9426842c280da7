"""The benchmark tables of bench/README.md and README.md, rendered from the JSON files in bench/ (their one source).

    python bench/tables.py           # rewrite every `<!-- table:NAME -->` ... `<!-- /table:NAME -->` block
    python bench/tables.py --check   # exit 1 when a block differs from its JSON (tests/test_docs.py runs it)

`make bench` runs it after the benchmarks. Where a figure was measured twice (by `bench/run.py` into results.json
and by a script run on its own), the later date wins.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = (HERE / "README.md", ROOT / "README.md")
BLOCK = re.compile(r"(<!-- table:([a-z_]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.DOTALL)


def load(name: str) -> dict:
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else {}


def latest(*candidates: tuple[str, dict | None]) -> tuple[str, dict]:
    """The (date, value) with the latest date among those that have a value."""
    found = [(d[:10], v) for d, v in candidates if v]
    if not found:
        raise SystemExit("bench/tables.py: a table has no measurement in bench/*.json")
    return max(found, key=lambda c: c[0])


def table(head: list[str], rows: list[list[str]]) -> str:
    return (
        "\n".join(
            ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
        )
        + "\n"
    )


# one function per figure, shared by the tables that show it --------------------------------------------------------


def model_arms() -> tuple[str, dict]:
    r = load("results.json")
    return r["date"], r["model_step"]


def overhead() -> tuple[str, dict]:
    """The latest measurement of the study overhead: `make bench`'s, or `bench/study_overhead.py`'s run alone."""
    s = max((x for x in (load("results.json").get("study"), load("study_overhead.json")) if x), key=lambda x: x["date"])
    return s["date"][:10], s["overhead"]


def overhead_text(o: dict) -> str:
    """Per trial (the steady cost between trials) and once per study (start-up and teardown), then the bench's
    total difference over its trials, which a small study pays mostly in the once-per-study part."""
    split = o.get("tune_minus_plain")
    total = f"{o['overhead_per_trial_s']:.2f} s per trial over the bench's {o['tune_one_at_a_time']['trials']} trials"
    if not split:
        return total
    return (
        f"{split['between_trials_s']:.2f} s per trial + {split['startup_s'] + split['teardown_s']:.1f} s once per "
        f"study (start-up {split['startup_s']:.1f} s, teardown {split['teardown_s']:.1f} s); in all {total}"
    )


def default_study() -> tuple[str, dict]:
    s = load("results.json").get("study") or {}
    bench = s.get("default_study")
    bench = bench and {"run_wall_s": bench["run_wall_s"], "note": f"run + report {bench['total_wall_s']:.0f} s"}
    alone = load("default_study.json")
    alone = alone and {**alone, "note": f"load {alone['load_avg_1min_start']} -> {alone['load_avg_1min_end']}"}
    return latest((s.get("date", ""), bench), (alone.get("date", ""), alone))


def analysis_scale() -> tuple[str, dict]:
    r = load("results.json")
    return latest(
        (r.get("date", ""), r.get("analysis_scale")),
        (load("analysis_scale.json").get("date", ""), load("analysis_scale.json")),
    )


def arms_text(m: dict) -> str:
    a = m["arms"]
    return (
        f"{a['plain']['step_s']:.2f} / {a['sprint']['step_s']:.2f} / {a['full stack']['step_s']:.2f} s/step "
        f"(sprint {a['sprint']['speedup_vs_plain']:.2f}x, full stack {a['full stack']['speedup_vs_plain']:.2f}x)"
    )


def analysis_row(c: dict) -> list[str]:
    size = f" ({c['csv_mb']:.0f} MB)" if c.get("csv_mb") else ""
    return [
        f"`srdit analyze` ({c.get('bootstrap', 'default options')}) on a {c['rows']:,}-row CSV{size}, "
        f"{c['factors']} factors x {c['seeds']:,} seeds",
        f"{c['wall_s']:.0f} s, peak RSS {c['peak_rss_mb']:.0f} MB",
    ]


# the tables ----------------------------------------------------------------------------------------------------------


def summary() -> str:
    """README.md's short table: the current headline figures, one per row, with their dates."""
    rows = []
    d, m = model_arms()
    rows.append(["SR-DiT-B/1 shape, batch 8, fwd+bwd, plain / sprint / full stack", arms_text(m), d])
    d, o = overhead()
    rows.append(
        [
            "orchestration overhead (Ray Tune + MLflow vs the same trials in a plain loop)",
            overhead_text(o),
            d,
        ]
    )
    d, s = default_study()
    rows.append(
        [
            "default study (`studies/digits_quick.yaml`, 16 trials) `srdit study run`",
            f"{s['run_wall_s'] / 60:.1f} min ({s['run_wall_s']:.0f} s)",
            d,
        ]
    )
    r = load("study_reuse.json")
    rows.append(
        [
            "the same study again under another name (all trials reused)",
            f"{r['again_s']:.1f} s ({r['ratio']:.3f}x the first run)",
            r["date"],
        ]
    )
    sh = load("shared_training.json")
    runs = {x["run"]: x["wall_s"] for x in sh["runs"]}
    rows.append(
        [
            f"shared vs unshared trainings (`{Path(sh['study']).name}`, {sh['cells']} cells x {sh['seeds']} seeds)",
            f"{runs['shared'] / runs['--no-share']:.2f}x ({runs['shared']:.0f} s vs {runs['--no-share']:.0f} s)",
            sh["date"],
        ]
    )
    d, a = analysis_scale()
    rows.append(analysis_row(a["cases"][0]) + [d])
    return table(["measurement (2-core CPU machine)", "value", "date"], rows)


def benchmarks() -> str:
    """bench/README.md's main table: `make bench` (bench/run.py) and the scripts run on their own."""
    rows = []
    date, m = model_arms()
    for name, r in m["arms"].items():
        rows.append(
            [
                f"SR-DiT-B/1 shape, batch 8, fwd+bwd (median, interleaved): {name}",
                f"{r['step_s']:.2f} s/step ({r['speedup_vs_plain']:.2f}x vs plain), peak RSS {r['peak_rss_mb']:.0f} MB",
                date,
            ]
        )
    rows.append(
        [
            "plain backbone FLOP/s as a fraction of a dense fp32 matmul",
            f"{m['flops_fraction_of_matmul']:.2f} ({m['achieved_flops'] / 1e9:.0f} / "
            f"{m['matmul_flops'] / 1e9:.0f} GFLOP/s)",
            date,
        ]
    )
    dp = load("results.json").get("data_parallel")
    if dp:
        rows.append(
            [
                f"digits default, global batch {dp['global_batch']}: {dp['workers']} gloo workers x 1 thread vs "
                f"1 process x {dp['threads_total']} threads (same trajectory: max loss diff "
                f"{dp['max_rel_loss_diff']:.1e} rel.)",
                f"{dp['images_per_s_workers']:.0f} vs {dp['images_per_s_one_process']:.0f} images/s "
                f"({dp['ratio_workers_vs_one']:.2f}x)",
                date,
            ]
        )
    d, o = overhead()
    rows.append(
        [
            "study orchestration overhead (Ray Tune + MLflow vs the same trials in a plain loop)",
            overhead_text(o),
            d,
        ]
    )
    d, s = default_study()
    rows.append(
        [
            "default study (`studies/digits_quick.yaml`, 16 trials, evaluated at steps 120 and 240) `srdit study run`",
            f"{s['run_wall_s'] / 60:.1f} min ({s['run_wall_s']:.0f} s, {s['note']})",
            d,
        ]
    )
    d, a = analysis_scale()
    rows += [analysis_row(c) + [d] for c in a["cases"]]
    return table(["measurement (one run, CPU, 2 threads)", "value", "date"], rows)


def trainer_step() -> str:
    t = load("trainer_step.json")
    bare = t["step_s_all"]["bare model step"]
    rows = [["bare model step (forward + backward)", f"{t['step_s']['bare model step']:.1f}", "1"]]
    labels = {
        "trainer step (before)": "trainer step before (per-parameter AdamW / EMA loops, metrics read back each step)",
        "trainer step": "trainer step now (`TrainStep`: foreach AdamW, one-call EMA, metrics on the device)",
    }
    for kind, label in labels.items():
        r = t["ratio_vs_bare"][kind]
        rows.append(
            [
                label,
                f"{t['step_s'][kind]:.1f}",
                f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f}; {r['min']:.2f}-{r['max']:.2f})",
            ]
        )
    head = [
        f"kind ({len(bare)} rounds, batch {t['batch']}, {t['threads']} threads)",
        "median s/step",
        "ratio to the bare model step in the same round: median (quartiles; range)",
    ]
    return table(head, rows)


def digits() -> str:
    ref = {r["arm"]: r for r in load("digits_reference.json")["rows"]}
    st = load("digits_stack.json")

    def row(label: str, r: dict, bold: bool = False) -> list[str]:
        fd = f"{r['fd']:.2f} +- {r['fd_std']:.2f}" if "fd_std" in r else f"{r['fd']:g}"
        return [label, f"**{fd}**" if bold else fd, f"{r['kd']:.2g}", f"{r['precision']:.2f} / {r['recall']:.2f}"]

    def arm(name: str) -> dict:
        s = st["summary"][name]
        return {
            "fd": s["fd_mean"],
            "fd_std": s["fd_std"],
            "kd": s["kd_mean"],
            "precision": s["precision_mean"],
            "recall": s["recall_mean"],
        }

    seeds = sorted({r["seed"] for r in st["rows"]})
    names = list(ref)
    rows = [
        row(names[0], ref[names[0]]),
        row(f"**plain SiT**, {st['steps']} steps, seeds {', '.join(map(str, seeds))}", arm("plain SiT"), True),
        row("**full SR-DiT stack**, same steps and seeds", arm("SR-DiT stack"), True),
    ]
    rows += [row(n, ref[n]) for n in names[1:]]
    return table(["", "FD (metric-net features)", "KD", "precision / recall"], rows)


def shared_training() -> str:
    sh = load("shared_training.json")
    rows = [
        [
            f"`{r['run']}`" if r["run"].startswith("--") else r["run"],
            str(r["trainings"]),
            f"**{r['wall_s']} s**",
            f"{r['load_start']:.2f} / {r['load_end']:.2f}",
        ]
        for r in sh["runs"]
    ]
    return table(["run", "trainings (`last.pt` files)", "study wall", "load average (1 min) at start / end"], rows)


def reuse() -> str:
    r = load("study_reuse.json")
    return table(
        ["run", "wall", "1-minute load at the end"],
        [
            [
                f"`srdit study run studies/{r['study']}.yaml` ({r['study']}, every trial trained)",
                f"{r['first_s']:.0f} s",
                f"{r['load_after_first'][0]:.1f}",
            ],
            [
                "the same study under another name, same state (every trial adopted, no Ray started)",
                f"{r['again_s']:.1f} s ({r['ratio']:.3f}x)",
                f"{r['load_after_again'][0]:.1f}",
            ],
        ],
    )


TABLES = {
    "summary": summary,
    "benchmarks": benchmarks,
    "trainer_step": trainer_step,
    "digits": digits,
    "shared_training": shared_training,
    "reuse": reuse,
}


def render(text: str, where: str) -> str:
    def block(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"{where}: unknown table {m.group(2)!r}; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[m.group(2)]() + m.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table differs from the JSON")
    args = p.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text()
        new = render(text, path.name)
        if new != text:
            if args.check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                path.write_text(new)
                print(f"rendered the tables of {path.relative_to(ROOT)}")
    if stale:
        print(
            f"tables out of date with bench/*.json in: {', '.join(stale)}; rerender with `python bench/tables.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
