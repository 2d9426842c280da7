"""The check kit: what every technique, built-in or plugin, must satisfy, run on the tiny digits model in seconds
(CPU, a few steps, batch 16). `srdit techniques check NAME` prints it; tests call `check_techniques` and
`failures`.

The checks (each a `Check` with its figure):
- `load`: the plugins load (a bad declaration, e.g. a numeric knob without a range, is refused here:
  `srdit.ext.check_plugin`);
- `off = baseline`: with the technique loaded but off, the weights, EMA weights and samples after N steps equal, bit
  for bit, those of a fresh Python process that never loaded it (`srdit.technique_check` run as a script), so any
  effect of a loaded plugin on a run where it is off is caught (a global hook that draws random numbers on every
  forward, a patched srdit function; draws at import cannot move a run, as the trainer seeds its generators);
- `knob ranges`: each numeric knob just outside each finite bound (and a float knob at inf and nan) is a
  ConfigError naming its key;
- `stage`: a "train" technique changes the trained weights or the losses when on; an "eval" technique leaves the
  trained weights (and EMA) bit-identical to the off run's and changes the samples;
- `on finite`: one training step with it on (weights moved off the adaLN-Zero init, so that every path carries
  gradient): finite losses and gradients, a gradient reaching every parameter it adds (non-zero for at least one),
  each of its own loss terms alone sending a non-zero gradient to some parameter, finite samples after N steps;
- `data parallel`: 2 gloo workers on the same global batch follow the one-process run: every per-step loss within
  `DP_TOLERANCE` relative.

A technique that is not valid on the digits model alone (path-drop guidance needs SPRINT) is checked on top of the
first built-in that makes its config valid (`context`), on in the baseline, off and on runs alike. Sampling uses
classifier-free guidance (`kit_diff`: sample.cfg_scale 2) so that guidance techniques act.

Cost: one fresh process for the baseline (shared by every technique of a call with the same context, and cached
for the process), one pair of gloo workers for all of a call's techniques, and per technique one N-step run and
one training step in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from srdit import ext
from srdit.config import EXTENSIONS, FINITE, RANGE, ConfigError, RunConfig, apply_diff, from_dict, to_dict
from srdit.techniques import TECHNIQUES, Technique, load_plugins, technique, with_techniques

DP_TOLERANCE = 2e-5
"Relative difference allowed between a per-step loss of 2 data-parallel workers and of one process (srdit's bar)."

CHECKS = ("load", "off = baseline", "knob ranges", "stage", "on finite", "data parallel")
"The checks, in the order they run and print."

SAMPLES = 16
"Samples drawn from the EMA weights after training (one batch, `eval.seed`)."


def kit_diff(steps: int) -> dict[str, Any]:
    """The digits run the kit trains: `steps` steps of batch 16 on one thread, every step logged, guided sampling."""
    return {
        "train.steps": steps,
        "train.log_every": 1,
        "train.ckpt_every": steps,
        "train.threads": 1,
        "train.batch_size": 16,
        "eval.n_samples": SAMPLES,
        "eval.batch_size": SAMPLES,
        "sample.sampler": "euler",
        "sample.steps": 2,
        "sample.cfg_scale": 2.0,
    }


@dataclass(frozen=True)
class Check:
    """One check of one technique: `ok` and what was measured (`figure`)."""

    technique: str
    check: str
    ok: bool
    figure: str
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.technique}: {self.check}: {'pass' if self.ok else 'FAIL'}: {self.figure}"


def failures(results: dict[str, list[Check]]) -> list[str]:
    """The lines of the failed checks (empty when every check passed)."""
    return [c.line() for checks in results.values() for c in checks if not c.ok]


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def context(name: str, base: RunConfig) -> tuple[str, ...]:
    """The built-ins a technique is checked on top of: none when `base + name` is a valid config, else the first
    built-in (registry order) that makes it valid. ConfigError when none does."""
    try:
        with_techniques(base, [name])
        return ()
    except ConfigError as e:
        alone = str(e)
    for other in TECHNIQUES:
        if other != name:
            try:
                with_techniques(base, [other, name])
                return (other,)
            except ConfigError:
                continue
    raise ConfigError(f"technique {name}: no valid digits config alone or with one built-in ({alone})")


def _field(key: str) -> tuple[Any, Any]:
    """(type, Range) of a dotted config key (a plugin knob `ext.<name>.<knob>` included)."""
    cls: Any = RunConfig
    parts = key.split(".")
    if parts[0] == "ext":
        cls, parts = EXTENSIONS[parts[1]], parts[2:]
    for i, part in enumerate(parts):
        f = {f.name: f for f in dataclasses.fields(cls)}[part]
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return tp, f.metadata.get(RANGE, FINITE)
        cls = tp
    raise KeyError(key)


def _numeric(tp: Any) -> type | None:
    """int or float for a numeric field type (Optional included), else None."""
    kinds = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


def outside_values(kind: type, rule: Any) -> list[Any]:
    """Values just outside each finite bound of a Range (the bound itself when open), plus inf and nan for floats."""
    out: list[Any] = []
    for bound, is_open, down in ((rule.low, rule.low_open, True), (rule.high, rule.high_open, False)):
        if bound is None:
            continue
        if is_open:
            out.append(kind(bound))
        elif kind is int:
            out.append(int(bound) - 1 if down else int(bound) + 1)
        else:
            out.append(math.nextafter(float(bound), -math.inf if down else math.inf))
    if kind is float:
        out += [math.inf, math.nan]
    return out


def _knob_check(t: Technique, on: RunConfig) -> tuple[bool, str]:
    refused, problems, knobs = 0, [], 0
    for key in t.knobs.values():
        tp, rule = _field(key)
        kind = _numeric(tp)
        if kind is None:
            continue
        knobs += 1
        for v in outside_values(kind, rule):
            try:
                apply_diff(on, {key: v})
                problems.append(f"{key}={v!r} accepted")
            except ConfigError as e:
                if key in str(e):
                    refused += 1
                else:
                    problems.append(f"{key}={v!r} refused without naming the key ({e})")
    if problems:
        return False, "; ".join(problems[:3])
    if not knobs:
        return True, "no numeric knobs"
    return True, f"{refused} values just outside the bounds of {knobs} numeric knobs refused, each naming its key"


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


def outcome(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Train `cfg` into `out` (fresh) and return what the checks compare: status, weights ("model", "ema" state
    dicts), `SAMPLES` samples [N, C, H, W] and labels [N] from the EMA weights, and the per-step losses
    ({step: {"loss": x, "loss/<term>": x}})."""
    from srdit.generate import generate
    from srdit.train import CHECKPOINT, METRICS_LOG, JsonlReporter, load_checkpoint, model_from_checkpoint, train

    out = Path(out)
    res = train(cfg, out, JsonlReporter(out / METRICS_LOG), resume=False, progress=False)
    losses = {}
    for line in (out / METRICS_LOG).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[int(row["step"])] = {k: v for k, v in row.items() if k == "loss" or k.startswith("loss/")}
    result: dict[str, Any] = {"status": res.status, "reason": res.reason, "losses": losses}
    if res.status == "finished":
        ckpt = load_checkpoint(out / CHECKPOINT)
        model, _ = model_from_checkpoint(ckpt, "ema")
        samples, labels, _ = generate(model, cfg, SAMPLES, cfg.eval.seed, "cpu", SAMPLES)
        result |= {"model": ckpt["model"], "ema": ckpt["ema"], "samples": samples, "labels": labels}
    return result


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _guarded_outcome(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """`outcome`, with an exception (a plugin's hook that raises) recorded as the run's status."""
    try:
        return outcome(cfg, out)
    except Exception as e:
        return {"status": "raised", "reason": f"{type(e).__name__}: {_first_line(e)}", "losses": {}}


def baseline_main(argv: Sequence[str]) -> None:
    """`python -m srdit.technique_check CONFIG_JSON OUT`: the baseline in a process that loads no plugin; writes
    `outcome` to OUT/outcome.pt."""
    config_file, out = argv
    cfg = from_dict(RunConfig, json.loads(Path(config_file).read_text()))
    torch.save(outcome(cfg, Path(out) / "run"), Path(out) / "outcome.pt")


_BASELINES: dict[str, dict[str, Any]] = {}
"Config JSON -> the outcome of a fresh process without plugins (it depends on the config only)."


def baseline(cfg: RunConfig, work: Path) -> dict[str, Any]:
    """`outcome(cfg)` computed in a fresh Python process that loads no plugin (cached per config)."""
    key = json.dumps(to_dict(cfg), sort_keys=True)
    if key not in _BASELINES:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(key)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.run(
            [sys.executable, "-m", "srdit.technique_check", str(work / "config.json"), str(work)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the baseline process failed (exit {proc.returncode}): {last}")
        _BASELINES[key] = torch.load(work / "outcome.pt", weights_only=True)
    return _BASELINES[key]


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    """(names of the tensors that differ or exist on one side only, the largest |a - b| over shared ones)."""
    names = sorted(set(a) ^ set(b))
    worst = 0.0
    for k in set(a) & set(b):
        if a[k].shape != b[k].shape:
            names.append(k)
        elif not torch.equal(a[k], b[k]):
            names.append(k)
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return names, worst


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, str]:
    """Whether two outcomes are bit-identical (weights, EMA, samples, labels), and what differs."""
    if a["status"] != "finished" or b["status"] != "finished":
        return False, f"a run did not finish ({a['status']} {a['reason']} / {b['status']} {b['reason']})"
    for part in ("model", "ema"):
        names, worst = _differences(a[part], b[part])
        if names:
            return False, f"{part} weights differ in {len(names)} tensors (first {names[0]}, max |diff| {worst:.3g})"
    if not (torch.equal(a["labels"], b["labels"]) and torch.equal(a["samples"], b["samples"])):
        return False, f"samples differ (max |diff| {(a['samples'] - b['samples']).abs().max().item():.3g})"
    return True, "bit-identical"


def _stage_check(stage: str, on: dict[str, Any], off: dict[str, Any]) -> tuple[bool, str]:
    if on["status"] != "finished":
        return False, f"the run with it on ended {on['status']}: {on['reason']}"
    if stage == "train":
        names, worst = _differences(on["model"], off["model"])
        # the total loss of each step (a new term's own log line alone is no change)
        loss_moved = {s: r["loss"] for s, r in on["losses"].items()} != {s: r["loss"] for s, r in off["losses"].items()}
        if names or loss_moved:
            return True, f"train stage: on changes {len(names)} weight tensors (max |diff| {worst:.3g})" + (
                ", and the losses" if loss_moved else ""
            )
        return False, "train stage, but on trains the same weights and losses as off (an eval-stage technique?)"
    for part in ("model", "ema"):
        names, worst = _differences(on[part], off[part])
        if names:
            return False, (
                f"eval stage, but on changes the trained {part} weights ({len(names)} tensors, first {names[0]}): "
                f"declare stage train"
            )
    if torch.equal(on["samples"], off["samples"]) and torch.equal(on["labels"], off["labels"]):
        return False, "eval stage, but on leaves the samples unchanged"
    moved = (on["samples"] - off["samples"]).abs().max().item()
    return True, f"eval stage: trained weights bit-identical to off, samples change (max |diff| {moved:.3g})"


def _gradient_check(on_cfg: RunConfig, off_cfg: RunConfig) -> tuple[bool, str]:
    """One training step with the technique on, as the trainer runs it (`srdit.train.TrainStep`)."""
    from srdit.model import build_model
    from srdit.parallel import DataParallel
    from srdit.train import TrainStep, make_batches, make_optimizer
    from srdit.transport.objective import StepNoise, training_losses

    cpu = torch.device("cpu")
    plain = {n for n, _ in build_model(off_cfg.model, off_cfg.ext).named_parameters()}
    torch.manual_seed(on_cfg.train.seed)
    data = make_batches(on_cfg, cpu)
    model = build_model(on_cfg.model, on_cfg.ext).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the adaLN-Zero init (zero outputs, zero gradients to most weights)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ema = copy.deepcopy(model).requires_grad_(False)
    step = TrainStep(on_cfg, model, ema, make_optimizer(model, on_cfg, cpu), cpu)
    x0, y, *teacher = data.next()
    metrics = step(x0, y, teacher, 1)
    bad = [k for k, v in metrics.items() if not torch.isfinite(v).all()]
    if bad:
        return False, f"non-finite {', '.join(bad)}"
    params = dict(model.named_parameters())
    nonfinite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if nonfinite:
        return False, f"non-finite gradient of {nonfinite[0]} ({len(nonfinite)} parameters)"
    added = [n for n in params if n not in plain]
    unreached = [n for n in added if params[n].grad is None]
    if unreached:
        return False, f"no gradient reaches the parameter it adds {unreached[0]} ({len(unreached)} of {len(added)})"
    moving = [n for n in added if params[n].grad.abs().sum() > 0]
    if added and not moving:
        return False, f"the gradients of the {len(added)} parameters it adds are all zero"
    # each of the technique's own loss terms alone, backpropagated: it must reach some parameter (a term computed
    # from detached tensors trains nothing)
    model.zero_grad(set_to_none=True)
    noise = StepNoise.draw(on_cfg, model, x0.shape, on_cfg.shift_value(), cpu, DataParallel())
    losses = training_losses(model, x0, y, teacher, on_cfg, noise)
    trained = [p for p in params.values() if p.requires_grad]
    reached = []
    for term in (k for k in losses if k not in ("loss", "fm")):
        grads = torch.autograd.grad(losses[term], trained, allow_unused=True, retain_graph=True)
        hit = sum(1 for gr in grads if gr is not None and bool(gr.abs().sum() > 0))
        if not hit:
            return False, f"the loss term {term} sends no gradient to any parameter"
        reached.append(f"{term} reaches {hit} of {len(trained)}")
    terms = ", ".join(f"{k} {v.item():.4g}" for k, v in metrics.items() if k.startswith("loss"))
    reach = (
        f"{len(moving)} of {len(added)} added parameters with a non-zero gradient" if added else "no added parameters"
    )
    own = f"; {', '.join(reached)} parameters" if reached else ""
    return True, f"{terms}; gradients finite (norm {metrics['grad_norm'].item():.3g}), {reach}{own}"


# ----------------------------------------------------------------------------------------------------------------
# Data parallel
# ----------------------------------------------------------------------------------------------------------------


def _dp_worker(rank: int, world: int, port: int, plugins: list[str], jobs: list[tuple[str, dict]], out: str) -> None:
    """One gloo rank: load the plugins, train every job's config into out/<name>."""
    import torch.distributed as dist

    from srdit.parallel import join_group
    from srdit.train import METRICS_LOG, JsonlReporter, train

    # torch's notice about DDP's broadcast_buffers argument (the trainer's choice) is not the kit's output
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    join_group(port, rank, world)  # the store of the parent, `_start_data_parallel`
    try:
        load_plugins(plugins or None)
        for name, config in jobs:
            cfg = from_dict(RunConfig, config)
            folder = Path(out) / name
            train(cfg, folder, JsonlReporter(folder / METRICS_LOG), resume=False, progress=False)
    finally:
        dist.destroy_process_group()


def _dp_losses(folder: Path) -> dict[int, dict[str, float]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {
        int(r["step"]): {k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")}
        for r in rows
        if "loss" in r
    }


def _dp_compare(one: dict[int, dict[str, float]], two: dict[int, dict[str, float]]) -> tuple[bool, str]:
    if not two or sorted(two) != sorted(one):
        return False, f"the 2 workers logged steps {sorted(two)}, one process {sorted(one)}"
    worst, where = 0.0, ""
    for step, row in one.items():
        for k, a in row.items():
            b = two[step].get(k, math.nan)
            rel = abs(b - a) / max(abs(a), 1e-12) if math.isfinite(b) else math.inf
            if rel >= worst:
                worst, where = rel, f"{k} at step {step}"
    ok = worst <= DP_TOLERANCE
    return ok, f"1 vs 2 gloo workers: worst relative difference {worst:.2g} ({where}; bar {DP_TOLERANCE:g})"


def _start_data_parallel(jobs: list[tuple[str, RunConfig]], work: Path) -> Any:
    """Start the 2 gloo workers on every job (they run while this process does its own runs); `_finish_data_parallel`
    waits for them."""
    import datetime

    import torch.multiprocessing as mp

    from srdit.parallel import rendezvous_store

    plugins = list(dict.fromkeys(p.origin for p in ext.PLUGINS.values()))
    store = rendezvous_store("127.0.0.1", None, datetime.timedelta(minutes=5))  # its port held while the workers run
    workers = mp.start_processes(
        _dp_worker,
        args=(2, store.port, plugins, [(n, to_dict(c)) for n, c in jobs], str(work)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    workers.rendezvous = store  # lives as long as the workers' handle (`_finish_data_parallel`)
    return workers


def _finish_data_parallel(workers: Any, names: Sequence[str], work: Path) -> dict[str, str]:
    """Wait for the workers; name -> "" when its run finished, else the failed worker's last line."""
    error = ""
    try:
        while not workers.join():
            pass
    except Exception as e:  # a worker's exception: the techniques it did not finish fail with its last line
        error = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    finally:
        for p in workers.processes:
            if p.is_alive():
                p.terminate()
    return {n: f"a worker failed: {error}" if error and not _dp_losses(work / n) else "" for n in names}


# ----------------------------------------------------------------------------------------------------------------
# The kit
# ----------------------------------------------------------------------------------------------------------------


def check_techniques(
    names: Sequence[str],
    plugins: Iterable[str] = (),
    steps: int = 3,
    relative_to: str | Path | None = None,
    checks: Iterable[str] = CHECKS,
    work: str | Path | None = None,
) -> dict[str, list[Check]]:
    """Run the kit's `checks` on each of `names` (built-ins or plugins of `plugins`: module names, or .py files /
    package folders relative to `relative_to`) with `steps` training steps; returns name -> its `Check`s in
    `CHECKS` order. Every plugin of `plugins` is loaded (and off) in the off runs. A plugin that does not load fails
    `load` for every name and nothing else runs. ConfigError for an unknown name or `steps` < 1. `work`: a folder
    for the runs (default: a temporary one, removed after)."""
    if steps < 1:
        raise ConfigError(f"--steps: {steps} is not allowed; allowed: an integer >= 1")
    if work is None:
        with tempfile.TemporaryDirectory(prefix="srdit-check-") as tmp:
            return check_techniques(names, plugins, steps, relative_to, checks, tmp)
    work, wanted = Path(work), set(checks)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ConfigError(f"unknown checks {sorted(unknown)}; allowed: {', '.join(CHECKS)}")
    results: dict[str, list[Check]] = {n: [] for n in names}

    def record(name: str, check: str, ok: bool, figure: str, started: float, share: int = 1) -> None:
        results[name].append(Check(name, check, ok, figure, (time.perf_counter() - started) / share))

    t0 = time.perf_counter()
    try:
        load_plugins(list(plugins) or None, relative_to, "--plugins")
    except ConfigError as e:
        for n in names:
            record(n, "load", False, str(e), t0, len(names))
        return results
    entries = {n: technique(n) for n in names}  # ConfigError for an unknown name
    base = apply_diff(RunConfig(), kit_diff(steps))
    for n, t in entries.items():
        if "load" in wanted:
            where = f"plugin from {ext.PLUGINS[n].where()}" if n in ext.PLUGINS else f"built-in ({', '.join(t.code)})"
            record(n, "load", True, where, t0, len(names))
    contexts = {n: context(n, base) for n in names}
    groups: dict[tuple[str, ...], list[str]] = {}
    for n in names:
        groups.setdefault(contexts[n], []).append(n)
    on_cfgs = {n: with_techniques(base, [*contexts[n], n]) for n in names}
    t4 = time.perf_counter()
    workers = _start_data_parallel(list(on_cfgs.items()), work / "data-parallel") if "data parallel" in wanted else None
    try:
        on_runs = _run_in_process(entries, groups, on_cfgs, base, steps, wanted, work, record)
    finally:
        dp_errors = _finish_data_parallel(workers, names, work / "data-parallel") if workers is not None else {}
    if workers is not None:
        share = (time.perf_counter() - t4) / len(names)  # the workers ran alongside the runs above
        for n in names:
            ok, figure = (False, dp_errors[n]) if dp_errors[n] else (True, "")
            if ok:
                ok, figure = _dp_compare(on_runs[n]["losses"], _dp_losses(work / "data-parallel" / n))
            results[n].append(Check(n, "data parallel", ok, figure, share))
    return results


def _run_in_process(
    entries: dict[str, Technique],
    groups: dict[tuple[str, ...], list[str]],
    on_cfgs: dict[str, RunConfig],
    base: RunConfig,
    steps: int,
    wanted: set[str],
    work: Path,
    record: Any,
) -> dict[str, dict[str, Any]]:
    """The checks of `check_techniques` that run in this process (off, knob ranges, stage, on finite); returns
    name -> the outcome of its on run."""
    on_runs: dict[str, dict[str, Any]] = {}
    for ctx, members in groups.items():
        off_cfg = with_techniques(base, list(ctx))
        label = f"{'+'.join(ctx) or 'plain'}"
        t1 = time.perf_counter()
        off = _guarded_outcome(off_cfg, work / f"off-{label}")
        off_error = "" if off["status"] == "finished" else f"the off run ended {off['status']}: {off['reason']}"
        if "off = baseline" in wanted:
            try:
                reference, ref_error = baseline(off_cfg, work / f"baseline-{label}"), ""
            except RuntimeError as e:
                reference, ref_error = None, str(e)
            if off_error or ref_error:
                ok, figure = False, off_error or ref_error
            else:
                ok, figure = _same_run(off, reference)
                figure = (
                    f"{figure}: weights, EMA and {SAMPLES} samples after {steps} steps with it loaded and off vs a "
                    f"fresh process without it" + (f" (on top of {', '.join(ctx)})" if ctx else "")
                    if ok
                    else f"loaded and off vs a fresh process without it: {figure}"
                )
            for n in members:
                record(n, "off = baseline", ok, figure, t1, len(members))
        for n in members:
            t, on_cfg = entries[n], on_cfgs[n]
            t2 = time.perf_counter()
            if "knob ranges" in wanted:
                record(n, "knob ranges", *_knob_check(t, on_cfg), t2)
            t2 = time.perf_counter()
            on = (
                _guarded_outcome(on_cfg, work / f"on-{n}") if wanted & {"stage", "on finite", "data parallel"} else None
            )
            on_runs[n] = on
            if "stage" in wanted:
                ok, figure = (False, off_error) if off_error else _stage_check(t.stage, on, off)
                record(n, "stage", ok, figure, t2)
            if "on finite" in wanted:
                t3 = time.perf_counter()
                try:
                    ok, figure = _gradient_check(on_cfg, with_techniques(base, list(ctx)))
                except Exception as e:  # a plugin's hook that raises: the check fails with its line
                    ok, figure = False, f"a training step raised {type(e).__name__}: {_first_line(e)}"
                if ok and on["status"] != "finished":
                    ok, figure = False, f"the {steps}-step run ended {on['status']}: {on['reason']}"
                elif ok and not torch.isfinite(on["samples"]).all():
                    ok, figure = False, "non-finite samples"
                record(n, "on finite", ok, figure, t3)
    return on_runs


if __name__ == "__main__":
    baseline_main(sys.argv[1:])
