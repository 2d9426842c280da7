"""Plugin techniques (`srdit.ext`): a technique from a file outside srdit, with the built-ins' guarantees.

- a bad plugin is one line (exit 2 from the CLI): a missing file, an import error at the plugin's own line, a name
  that clashes with a built-in, a hook with the wrong signature, a knob without a range;
- knobs are checked by the config's own rules and live in the config only while the plugin is on, so a config
  without plugins serialises and is keyed exactly as before plugins existed;
- content keys follow the plugin's code (its file and the modules it imports from its folder), on its cells only;
- the example dispersive loss (examples/plugins/dispersive): off cells bit-identical to a study without it, the
  term present and finite when on, and 2 data-parallel gloo workers on the one-process trajectory.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import plugin_modules_since

from srdit import ext
from srdit.config import EXTENSIONS, ConfigError, RunConfig, apply_diff, to_dict
from srdit.parallel import join_group
from srdit.runtime.reuse import content_keys
from srdit.techniques import load_plugins, with_techniques

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "plugins"
EXAMPLE = EXAMPLES / "dispersive"
PLUGIN_FILES = {
    "dispersive": EXAMPLES / "dispersive" / "dispersive.py",
    "registers": EXAMPLES / "registers" / "registers.py",
    "apg": EXAMPLES / "apg" / "apg.py",
}
"The example plugins (outside the package): a loss term, extra tokens, a guidance rule (stage eval)."
ISSUE_EXAMPLES = ("dispersive", "registers")
"The two examples whose {example, repa, sprint} studies run on a real Ray."
TINY = {
    "train.steps": 6,
    "train.log_every": 1,
    "train.ckpt_every": 6,
    "train.threads": 1,
    "train.batch_size": 16,
    "eval.n_samples": 8,
    "eval.batch_size": 8,
    "sample.sampler": "euler",
    "sample.steps": 2,
}
CELLS = [[], ["repa"], ["sprint", "rope"], ["repa", "sprint", "balanced_labels"]]
"Technique cells whose keys must not move when a plugin is installed or listed."


def tmp_path_root() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()).resolve()


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test loads its own plugins; the process's registry, modules and path are restored after it."""
    plugins, knobs, path = dict(ext.PLUGINS), dict(EXTENSIONS), list(sys.path)
    modules = set(sys.modules)
    yield
    ext.PLUGINS.clear()
    ext.PLUGINS.update(plugins)
    EXTENSIONS.clear()
    EXTENSIONS.update(knobs)
    sys.path[:] = path
    for name in plugin_modules_since(modules, (str(EXAMPLES), str(tmp_path_root()))):  # library imports stay
        del sys.modules[name]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = """
from srdit.ext import Knob, Plugin

def taps(cfg, knobs):
    return (knobs.depth,)

toy = Plugin("toy", "nowhere 2025", knobs={"w": Knob(0.5, range=(0, 1)), "depth": Knob(1, range=(1, None))},
             hooks={"taps": taps})
"""


# ------------------------------------------------------------------------------------------------------------------
# bad plugins: one line
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,match",
    [
        (None, r"^plugins\[0\]: missing\.py: no such plugin file or folder"),
        (
            "import os\nx = 1\nraise RuntimeError('boom')\n",
            r"^plugins\[0\]: plugin .*bad\.py: .*bad\.py:3: RuntimeError: boom$",
        ),
        ("def f(:\n", r"^plugins\[0\]: plugin .*bad\.py: .*bad\.py:1: SyntaxError"),
        (GOOD.replace('"toy"', '"sprint"'), r"^plugins\[0\]: plugin sprint \(.*bad\.py\): the name is a built-in"),
        (
            GOOD.replace("def taps(cfg, knobs):", "def taps(cfg):"),
            r"^plugins\[0\]: .*bad\.py:4: plugin toy: hook taps\(cfg\) has the wrong signature; expected taps\(cfg, knobs\)$",
        ),
        (GOOD.replace("range=(0, 1)", "help='no range'"), r"^plugins\[0\]: plugin toy: knob w: has no range"),
        (
            GOOD.replace("Knob(0.5, range=(0, 1))", "Knob('a')"),
            r"^plugins\[0\]: plugin toy: knob w: a str knob needs choices",
        ),
        (GOOD.replace("range=(0, 1)", "range=(0, 0.1)"), r"^plugins\[0\]: plugin toy: knob\.w: 0\.5 is not allowed"),
        ("x = 1\n", r"^plugins\[0\]: .*bad\.py: defines no srdit\.ext\.Plugin"),
        (GOOD.replace('"toy"', '"Toy"'), r"^plugins\[0\]: plugin 'Toy': the name must be lower-case"),
        (
            GOOD.replace('hooks={"taps": taps}', 'hooks={"taps": taps, "tokens": taps}'),
            r"^plugins\[0\]: plugin toy: extra tokens need three hooks: tokens \(how many\), embed_tokens",
        ),
    ],
)
def test_a_bad_plugin_is_one_line(tmp_path, source, match):
    entry = "missing.py" if source is None else str(_write(tmp_path / "bad.py", source))
    with pytest.raises(ConfigError, match=match) as e:
        load_plugins([entry], tmp_path)
    assert "\n" not in str(e.value)
    assert "toy" not in ext.PLUGINS  # nothing registered


def test_the_cli_refuses_a_bad_plugin_with_one_line_and_exit_2(tmp_path, capsys):
    from srdit.commands import main

    bad = _write(tmp_path / "bad.py", "import os\n\nundefined_name\n")
    assert main(["techniques", "--plugins", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:3: NameError" in err
    assert main(["techniques", "--plugins", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz: no such module" in capsys.readouterr().err


def test_srdit_techniques_lists_built_ins_and_plugins_with_where_their_code_lives(tmp_path, capsys):
    from srdit.commands import main
    from srdit.techniques import TECHNIQUES

    assert main(["techniques", "--json", "--plugins", str(EXAMPLE / "dispersive.py")]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert list(listed) == [*TECHNIQUES, "dispersive"]
    d = listed["dispersive"]
    assert d["code"] == [str(EXAMPLE / "dispersive.py")] and d["plugin"]["origin"] == str(EXAMPLE / "dispersive.py")
    assert d["knobs"] == {k: f"ext.dispersive.{k}" for k in ("weight", "temperature", "depth")}
    assert d["stage"] == "train" and "2506.09027" in d["paper"] and listed["sprint"]["plugin"] is None


# ------------------------------------------------------------------------------------------------------------------
# config: knobs only while on, checked like built-in fields
# ------------------------------------------------------------------------------------------------------------------


def test_knobs_live_in_the_config_only_while_on_and_obey_their_rules(tmp_path):
    load_plugins([str(_write(tmp_path / "toy.py", GOOD))])
    off = with_techniques(RunConfig(), ["repa"])
    on = with_techniques(RunConfig(), ["repa", "toy"], {"toy": {"w": 0.25}})
    assert "ext" not in to_dict(off) and to_dict(on)["ext"] == {"toy": {"w": 0.25, "depth": 1}}
    assert on.techniques == ("repa",)  # built-ins are recorded there; plugins by their ext entry
    with pytest.raises(ConfigError, match=r"^ext\.toy\.w: 1\.5 is not allowed; allowed: a finite number in \[0, 1\]$"):
        apply_diff(on, {"ext.toy.w": 1.5})
    with pytest.raises(ConfigError, match=r"^ext\.toy\.x: unknown key; allowed keys in ext\.toy: w, depth$"):
        apply_diff(on, {"ext.toy.x": 1})
    with pytest.raises(ConfigError, match=r"^ext\.nope: unknown plugin technique; loaded plugins: .*toy"):
        apply_diff(on, {"ext.nope.w": 1})
    with pytest.raises(ConfigError, match="ext.toy.w"):
        RunConfig(ext={"toy": {"w": -1.0}}).validate()


KEYS_WITHOUT_PLUGINS = """
import json, sys
from srdit.config import RunConfig, to_dict
from srdit.parallel import join_group
from srdit.runtime.reuse import content_keys
from srdit.techniques import with_techniques
cells = json.loads(sys.argv[1])
print(json.dumps([[to_dict(with_techniques(RunConfig(), c)), content_keys(to_dict(with_techniques(RunConfig(), c)))]
                  for c in cells]))
"""


def test_a_config_without_plugins_serialises_and_is_keyed_as_before(tmp_path):
    """Keys and serialised configs of technique cells computed in a process where no plugin was ever loaded equal
    those computed with the plugin loaded and listed by a study (its off cells)."""
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    out = subprocess.run(
        [sys.executable, "-c", KEYS_WITHOUT_PLUGINS, json.dumps(CELLS)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    before = json.loads(out.stdout)
    load_plugins([str(EXAMPLE / "dispersive.py")])
    for cell, (config, keys) in zip(CELLS, before):
        cfg = to_dict(with_techniques(RunConfig(), cell))
        assert cfg == config and "ext" not in cfg
        assert content_keys(cfg) == keys
    spec = load_study(EXAMPLE / "digits_dispersive.yaml")
    plan = plan_study(spec)
    for trial in plan.trials:
        assert ("ext" in trial.config) == ("dispersive" in trial.on)


# ------------------------------------------------------------------------------------------------------------------
# keys follow the code
# ------------------------------------------------------------------------------------------------------------------


def _keys(folder: Path) -> dict[str, dict[str, str]]:
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    plan = plan_study(load_study(folder / "digits_dispersive.yaml"))
    return {t.cell: content_keys(t.config) for t in plan.trials}


def test_editing_a_plugin_changes_the_keys_of_its_on_cells_only(tmp_path):
    folder = tmp_path / "dispersive"
    shutil.copytree(EXAMPLE, folder)
    first = _keys(folder)
    on = {c for c in first if c[0] == "1"}
    assert len(on) == 4 and len({k["training_key"] for k in first.values()}) == 8

    def edited(file: str, old: str, new: str) -> dict[str, dict[str, str]]:
        path = folder / file
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
        return _keys(folder)

    comment = edited(
        "dispersive.py", "def loss(ctx: LossContext):", "def loss(ctx: LossContext):  # a comment\n    '''doc'''"
    )
    assert comment == first
    code = edited("dispersive.py", ".clamp_min(0.0)", ".clamp_min(1e-12)")
    assert {c for c in first if code[c] != first[c]} == on
    for c in on:
        assert code[c]["training_key"] != first[c]["training_key"]
    helper = edited("repulsion.py", "- math.log(x.numel())", "- math.log(float(x.numel()))")
    assert {c for c in first if helper[c] != code[c]} == on
    helper_comment = edited("repulsion.py", "import math\n", "import math  # the log of the count\n")
    assert helper_comment == helper


# ------------------------------------------------------------------------------------------------------------------
# the model and the objective
# ------------------------------------------------------------------------------------------------------------------


def _cfg(techniques, **extra) -> RunConfig:
    return apply_diff(with_techniques(RunConfig(), techniques), {**TINY, **extra})


@pytest.mark.parametrize("example", sorted(PLUGIN_FILES))
def test_off_cells_train_bit_identically_with_the_plugin_listed(tmp_path, example):
    from srdit.train import load_checkpoint, train

    plain = _cfg(["repa", "sprint"])
    train(plain, tmp_path / "plain", progress=False)
    load_plugins([str(PLUGIN_FILES[example])])
    listed = _cfg(["repa", "sprint"])
    assert to_dict(listed) == to_dict(plain) and content_keys(to_dict(listed)) == content_keys(to_dict(plain))
    train(listed, tmp_path / "listed", progress=False)
    a, b = (
        load_checkpoint(tmp_path / "plain/checkpoints/last.pt"),
        load_checkpoint(tmp_path / "listed/checkpoints/last.pt"),
    )
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k


def test_the_dispersive_term_is_logged_weighted_and_matches_its_formula(tmp_path):
    from srdit.model import build_model
    from srdit.train import JsonlReporter, train
    from srdit.transport.objective import StepNoise, training_losses

    load_plugins([str(EXAMPLE / "dispersive.py")])
    cfg = _cfg(["dispersive", "sprint"], **{"ext.dispersive.weight": 0.25, "ext.dispersive.temperature": 0.7})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.ext).train()
    assert model.ext is None and model.tap_at == {2: ["dispersive"]}  # no parameters; taps the block after 2
    x0, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", _One())
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: None if "h" in seen else seen.update(h=o[0]))
    losses = training_losses(model, x0, y, None, cfg, noise)
    z = seen["h"].flatten(1).double()  # [B, T * D] after block 2 (dense: SPRINT's dense_in is 2)
    d = torch.cdist(z, z).square() / z.shape[1]
    expected = torch.log(torch.exp(-d / 0.7).mean())
    assert losses["dispersive"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((losses["fm"] + 0.25 * losses["dispersive"]).item(), rel=1e-6)
    losses["dispersive"].backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0  # the term reaches the layers before the tap
    assert model.blocks[0].adaLN[-1].weight.grad.abs().sum() > 0

    res = train(cfg, tmp_path / "run", JsonlReporter(tmp_path / "run/metrics.jsonl"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert res.status == "finished" and all("loss/dispersive" in r for r in rows if "loss" in r)
    assert all(torch.isfinite(torch.tensor(r["loss/dispersive"])) for r in rows if "loss" in r)


class _One:
    def part(self, x):
        return x


def test_a_plugin_module_is_built_after_the_backbone_and_trained_emad_checkpointed(tmp_path):
    from srdit.model import build_model
    from srdit.train import load_checkpoint, train

    source = GOOD.replace(
        'hooks={"taps": taps})',
        'hooks={"taps": taps, "build": build, "loss": loss}, terms={"toy_term": "w"})',
    ).replace(
        "def taps(cfg, knobs):",
        """import torch
from torch import nn

class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
    def forward(self, taps):
        return {i: h.mean() * self.scale for i, h in taps.items()}

def build(cfg, knobs):
    return Head()

def loss(ctx):
    return {"toy_term": ctx.outputs[ctx.knobs.depth].square() + ctx.module.scale * 0}

def taps(cfg, knobs):""",
    )
    load_plugins([str(_write(tmp_path / "toy.py", source))])
    plain, on = _cfg([]), _cfg(["toy"])
    torch.manual_seed(0)
    a = build_model(plain.model, plain.ext).state_dict()
    torch.manual_seed(0)
    b = build_model(on.model, on.ext).state_dict()
    assert set(b) - set(a) == {"ext.toy.scale"} and all(torch.equal(a[k], b[k]) for k in a)
    train(on, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["model"]["ext.toy.scale"].item() != 2.0  # optimised
    assert ckpt["ema"]["ext.toy.scale"].item() != ckpt["model"]["ext.toy.scale"].item()  # EMA'd separately


# ------------------------------------------------------------------------------------------------------------------
# extra tokens: the register-token example
# ------------------------------------------------------------------------------------------------------------------


def _registers_model(techniques, n=3):
    from srdit.model import build_model

    load_plugins([str(PLUGIN_FILES["registers"])])
    cfg = _cfg(["registers", *techniques], **{"ext.registers.n": n})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.ext)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, so that the tokens interact
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def _inputs(cfg, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.randn(b, m.in_channels, m.input_size, m.input_size, generator=g)
    cls = torch.randn(b, m.reg.dim, generator=g) if m.reg.enabled else None
    return x, torch.rand(b, generator=g), torch.randint(0, m.num_classes, (b,), generator=g), cls


@pytest.mark.parametrize("techniques", [[], ["rope"], ["reg", "rope", "sprint", "repa"]], ids="+".join)
def test_register_tokens_carry_no_position_and_are_never_routed(techniques):
    """Swapping two registers' values leaves the output unchanged (in training with SPRINT's routing as well): a
    register that got a position (sin-cos, RoPE) or that SPRINT dropped for some sample would change it. REPA
    aligns the patch (and REG) tokens only, and the output head sees the patches only."""
    cfg, model = _registers_model(techniques)
    x, t, y, cls = _inputs(cfg)
    route = torch.rand(4, model.routed_tokens) if model.routed_tokens else None
    assert model.routed_tokens == (model.grid**2 + model.reg_prefix if model.sprint is not None else 0)
    regs = model.ext["registers"].tokens
    for train_mode in (True, False):
        model.train(train_mode)
        with torch.no_grad():
            out, aux = model(x, t, y, cls, route_noise=route)
            regs.copy_(regs[:, [1, 0, 2]])
            swapped, aux2 = model(x, t, y, cls, route_noise=route)
            regs.copy_(regs[:, [1, 0, 2]])
            perturbed = regs.clone()
            regs.add_(torch.randn(regs.shape, generator=torch.Generator().manual_seed(2)))
            moved, _ = model(x, t, y, cls, route_noise=route)
            regs.copy_(perturbed)
        torch.testing.assert_close(swapped, out, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(moved, out, atol=1e-4)  # the registers do take part
        if train_mode and "repa" in techniques:
            assert aux["repa"].shape[1] == model.grid**2 + model.reg_prefix
            torch.testing.assert_close(aux2["repa"], aux["repa"], rtol=1e-5, atol=1e-6)


def test_sprint_routes_the_other_tokens_as_without_registers():
    """With the same route noise, the patch (and REG) tokens SPRINT keeps are the ones it keeps without registers;
    the registers join every sample's kept set."""
    cfg, model = _registers_model(["reg", "sprint"])
    route = torch.rand(4, model.routed_tokens)
    keep = model.sprint.select(4, model.routed_tokens, route.device, route)
    full = model._keep_extras(keep)
    r, n = model.reg_prefix, model.extra
    assert full.shape == (4, keep.shape[1] + n)
    for row, kept in zip(full.tolist(), keep.tolist()):
        assert set(range(r, r + n)) <= set(row)
        assert [i if i < r else i - n for i in row if not r <= i < r + n] == kept


def test_registers_train_and_their_tokens_are_learned(tmp_path):
    from srdit.train import JsonlReporter, load_checkpoint, train

    load_plugins([str(PLUGIN_FILES["registers"])])
    cfg = _cfg(["registers", "repa", "sprint"], **{"train.steps": 12})
    res = train(cfg, tmp_path / "run", JsonlReporter(tmp_path / "run/metrics.jsonl"), progress=False)
    assert res.status == "finished"
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    tokens = ckpt["model"]["ext.registers.tokens"]
    assert tokens.shape == (1, 4, 64) and tokens.abs().max() > 1e-4  # moved from N(0, 1e-6)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


# ------------------------------------------------------------------------------------------------------------------
# data parallel
# ------------------------------------------------------------------------------------------------------------------

DP_DIFF = {"train.steps": 8, "ext.dispersive.weight": 1.0, "model.sprint.path_drop_prob": 0.3}
TOLERANCE = 2e-5  # srdit's bar for data parallel (tests/test_data_parallel.py)


def _dp_worker(rank: int, world: int, port: int, out: str) -> None:
    from srdit.train import JsonlReporter, train

    join_group(port, rank, world)
    try:
        load_plugins([str(EXAMPLE / "dispersive.py")])
        train(
            _cfg(["dispersive", "sprint"], **DP_DIFF), out, JsonlReporter(Path(out) / "metrics.jsonl"), progress=False
        )
    finally:
        dist.destroy_process_group()


def test_the_dispersive_loss_on_two_gloo_workers_follows_one_process(tmp_path, held_port):
    from srdit.train import JsonlReporter, train

    load_plugins([str(EXAMPLE / "dispersive.py")])
    train(
        _cfg(["dispersive", "sprint"], **DP_DIFF),
        tmp_path / "one",
        JsonlReporter(tmp_path / "one/metrics.jsonl"),
        progress=False,
    )
    mp.spawn(_dp_worker, args=(2, held_port(), str(tmp_path / "two")), nprocs=2, join=True)

    def rows(folder):
        return {
            r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        }

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(two) == list(range(1, 9))
    worst = max(abs(two[s][k] - one[s][k]) / abs(one[s][k]) for s in one for k in ("loss", "loss/dispersive"))
    assert worst <= TOLERANCE, worst


def _grad_setup():
    from srdit.model import build_model

    load_plugins([str(EXAMPLE / "dispersive.py")])
    cfg = _cfg(["dispersive", "sprint"], **{"ext.dispersive.weight": 1.0})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.ext).train()
    with torch.no_grad():  # off the adaLN-Zero init, so that every path carries gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    return cfg, model, torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from srdit.parallel import DataParallel
    from srdit.transport.objective import StepNoise, training_losses

    join_group(port, rank, world)
    try:
        cfg, model, x0, y = _grad_setup()
        dp = DataParallel.current()
        torch.manual_seed(5)
        noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", dp)
        net = DistributedDataParallel(model)
        losses = training_losses(net, dp.part(x0), dp.part(y), None, cfg, noise, roll=dp.rolled, gather=dp.all_gather)
        losses["loss"].backward()
        if dp.main:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    finally:
        dist.destroy_process_group()


def test_the_gathered_batch_gives_each_rank_the_one_process_gradient(tmp_path, held_port):
    """`DataParallel.all_gather` (a plugin's `ctx.gather`): after DDP's gradient mean, every parameter's gradient
    of fm + dispersive equals the one-process one up to float32 round-off. (Over steps, Adam's normalisation
    amplifies that round-off where the dispersive term's gradient cancels, e.g. on the patch embedding's bias, which
    the translation-invariant term does not move: the weights drift apart by ~1e-4 after 8 steps, more than the
    built-ins' 1e-5, while the losses stay within 2e-5.)"""
    from srdit.parallel import DataParallel
    from srdit.transport.objective import StepNoise, training_losses

    cfg, model, x0, y = _grad_setup()
    torch.manual_seed(5)
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", DataParallel())
    training_losses(model, x0, y, None, cfg, noise)["loss"].backward()
    one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    mp.spawn(_grad_worker, args=(2, held_port(), str(tmp_path / "grads.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert set(two) == set(one)
    for k in one:
        assert ((two[k] - one[k]).norm() / one[k].norm()).item() < 1e-5, k


# ------------------------------------------------------------------------------------------------------------------
# a study on a real local Ray
# ------------------------------------------------------------------------------------------------------------------


def _study(folder: Path, name: str, techniques: list[str], plugins: list[str] | None) -> Path:
    import yaml

    data = {
        "name": name,
        **({"plugins": plugins} if plugins else {}),
        "base": {
            "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 4},
            "eval": {"n_samples": 20, "batch_size": 20},
            "sample": {"sampler": "euler", "steps": 2},
        },
        "techniques": techniques,
        "seeds": [0],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("example", ISSUE_EXAMPLES)
def test_a_plugin_study_runs_on_ray_and_adopts_its_off_cells_from_a_study_without_it(tmp_path, ray_local, example):
    """{example, repa, sprint} on a real local Ray, after the study {repa, sprint} that never heard of the plugin
    ran in the same state: the plugin study's off cells have those runs' keys and are adopted (their weights equal
    by construction; `test_off_cells_train_bit_identically_with_the_plugin_listed` trains both ways); its on cells
    train on the Ray workers, which load the plugin from where the driver did (listed relative to the YAML)."""
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    state = tmp_path / "state"
    plain = run_study(load_study(_study(tmp_path, "without_plugin", ["repa", "sprint"], None)), state)
    assert plain.complete and plain.ran == 4
    shutil.copytree(PLUGIN_FILES[example].parent, tmp_path / "plugins")
    spec = load_study(
        _study(tmp_path / "plugins", "with_plugin", [example, "repa", "sprint"], [PLUGIN_FILES[example].name])
    )
    res = run_study(spec, state)
    assert res.complete and res.reused == 4 and res.ran == 4 and res.statuses == {"finished": 8}
    client = MlflowClient(res.uri)
    runs = {
        r.data.tags["cell"]: r
        for r in client.search_runs([client.get_experiment_by_name("with_plugin").experiment_id])
        if r.data.tags.get("srdit.role") == "trial"
    }
    before = {
        "0" + r.data.tags["cell"]: r
        for r in client.search_runs([client.get_experiment_by_name("without_plugin").experiment_id])
        if r.data.tags.get("srdit.role") == "trial"
    }
    knob = next(iter(ext.PLUGINS[example].knobs))
    for cell, run in runs.items():
        assert (f"ext.{example}.{knob}" in run.data.params) == (cell[0] == "1"), cell
        if cell[0] == "0":
            for key in ("training_key", "run_key", "trial_dir"):
                assert run.data.tags[key] == before[cell].data.tags[key], (cell, key)
    if example == "dispersive":
        assert "loss/dispersive" in runs["111"].data.metrics and "loss/dispersive" not in runs["011"].data.metrics


def test_an_installed_package_s_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch, capsys):
    """A distribution on the path that declares `[srdit.techniques]` in its entry points: its plugin is a
    technique by name, listed by `srdit techniques` with its module."""
    from srdit.commands import main

    _write(tmp_path / "site" / "toy_pkg.py", GOOD)
    info = tmp_path / "site" / "toy_pkg-0.1.dist-info"
    _write(info / "METADATA", "Metadata-Version: 2.1\nName: toy-pkg\nVersion: 0.1\n")
    _write(info / "entry_points.txt", "[srdit.techniques]\ntoy = toy_pkg:toy\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert main(["techniques", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["toy"]["plugin"]["origin"] == "toy_pkg" and listed["toy"]["code"] == [
        str(tmp_path / "site" / "toy_pkg.py")
    ]
    cfg = with_techniques(RunConfig(), ["toy"])
    assert to_dict(cfg)["ext"] == {"toy": {"w": 0.5, "depth": 1}}


def test_a_plugin_checkpoint_samples_in_a_fresh_process_and_refuses_other_code(tmp_path):
    """`srdit sample` on a registers run's checkpoint loads the plugin from where training loaded it (recorded in
    the checkpoint); moved, it is one line naming --plugins, which loads it from elsewhere; edited, it is one line
    naming both code versions: never a silent run of other code."""
    from srdit.train import train

    folder = tmp_path / "plugin"
    shutil.copytree(PLUGIN_FILES["registers"].parent, folder)
    load_plugins([str(folder / "registers.py")])
    res = train(_cfg(["registers", "sprint"]), tmp_path / "run", progress=False)
    assert res.status == "finished"
    ckpt = tmp_path / "run/checkpoints/last.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def sample(*extra):
        args = [sys.executable, "-m", "srdit", "sample", str(ckpt), "--n", "4", "--out", str(tmp_path / "s"), *extra]
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    ok = sample()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "s/samples.npz").is_file()

    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    gone = sample()
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr[-2000:]
    assert "no such plugin file" in gone.stderr and "pass --plugins" in gone.stderr
    assert sample("--plugins", str(moved / "registers.py")).returncode == 0

    source = moved / "registers.py"
    source.write_text(source.read_text().replace("std=1e-6", "std=1e-5"))
    edited = sample("--plugins", str(source))
    assert edited.returncode == 2 and len(edited.stderr.strip().splitlines()) == 1, edited.stderr[-2000:]
    assert "is not the one the checkpoint was trained with" in edited.stderr


# ------------------------------------------------------------------------------------------------------------------
# guidance: the adaptive-projected-guidance example (stage "eval")
# ------------------------------------------------------------------------------------------------------------------


def _apg_samples(diff: dict, techniques=("apg",)):
    from srdit.generate import generate
    from srdit.model import build_model

    load_plugins([str(PLUGIN_FILES["apg"])])
    base = {"sample.cfg_scale": 4.0, "sample.steps": 4, **diff}
    plain = _cfg([t for t in techniques if t != "apg"], **base)
    on = _cfg(list(techniques), **base)
    torch.manual_seed(0)
    model = build_model(plain.model)
    with torch.no_grad():  # a model whose conditional and unconditional velocities differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = generate(model, plain, 8, seed=3)[0]
    b = generate(model, on, 8, seed=3)[0]
    return a, b


@pytest.mark.parametrize("techniques", [("apg",), ("apg", "sprint", "path_drop_guidance")], ids="+".join)
def test_apg_with_eta_1_is_classifier_free_guidance_and_with_eta_0_is_not(techniques):
    cfg_samples, same = _apg_samples({"ext.apg.eta": 1.0}, techniques)
    torch.testing.assert_close(same, cfg_samples, rtol=1e-4, atol=1e-5)  # c + (w - 1)(c - u) = u + w (c - u)
    cfg_samples, apg = _apg_samples({}, techniques)
    assert (apg - cfg_samples).abs().max() > 1e-3


def test_guidance_runs_only_where_guidance_applies():
    """cfg_scale 1: no unconditional branch, no guidance hook: the samples are bit-identical to APG off."""
    off, on = _apg_samples({"sample.cfg_scale": 1.0})
    assert torch.equal(off, on)


def test_an_eval_stage_plugin_shares_the_training_and_keys_its_evaluation():
    load_plugins([str(PLUGIN_FILES["apg"])])
    off, on = content_keys(to_dict(_cfg(["repa"]))), content_keys(to_dict(_cfg(["apg", "repa"])))
    assert on["training_key"] == off["training_key"] and on["run_key"] != off["run_key"]


def test_two_guidance_plugins_on_at_once_are_refused_in_one_line(tmp_path):
    load_plugins([str(PLUGIN_FILES["apg"])])
    twin = PLUGIN_FILES["apg"].read_text().replace('name="apg"', 'name="apg2"').replace("\napg = ", "\napg2 = ")
    load_plugins([str(_write(tmp_path / "apg2.py", twin))])
    with pytest.raises(ConfigError, match=r"^ext: apg, apg2 all replace guidance; switch on one at a time$"):
        ext.guidance_rule(to_dict(_cfg(["apg", "apg2"]))["ext"])


# ------------------------------------------------------------------------------------------------------------------
# attention and MLP variants
# ------------------------------------------------------------------------------------------------------------------

VARIANTS = """
from srdit.builtins.relu2 import relu2
from srdit.config import SIZES
from srdit.ext import Knob, Plugin
from srdit.model import parts
from srdit.model.layers import Mlp


def attention(cfg, knobs, block):  # block 2 gets a fresh attention of the same kind
    return parts.attention(cfg, block) if block == knobs.block else None


def mlp(cfg, knobs, block):
    return Mlp(SIZES[cfg.size][1], 4.0, relu2) if block == knobs.block else None


NAME = Plugin("NAME", "a test 2025", knobs={"block": Knob(2, range=(1, None))}, hooks={HOOKS})
"""


def _variant(tmp_path, name, hooks):
    source = VARIANTS.replace("NAME", name).replace("HOOKS", ", ".join(f'"{h}": {h}' for h in hooks))
    load_plugins([str(_write(tmp_path / f"{name}.py", source))])


@pytest.mark.parametrize("techniques", [[], ["rope", "qk_norm", "value_residual", "sprint"]], ids="+".join)
def test_an_attention_variant_takes_the_blocks_place_with_its_inputs(tmp_path, techniques):
    """The variant is built after the backbone's init (every other weight equals the plain model's); given the
    plain block's weights, the model is the plain model bit for bit: the block passes it the same x, RoPE tables
    and first-block values."""
    from srdit.model import build_model

    _variant(tmp_path, "attn_variant", ["attention"])
    plain, on = _cfg(techniques), _cfg(["attn_variant", *techniques])
    torch.manual_seed(0)
    a = build_model(plain.model, plain.ext)
    torch.manual_seed(0)
    b = build_model(on.model, on.ext)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert differ and all(k.startswith("blocks.1.attn.") for k in differ)  # its own init, nothing else moved
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x, t, y, cls = _inputs(on)
    route = torch.rand(4, a.routed_tokens) if a.routed_tokens else None
    for mode in (True, False):
        a.train(mode), b.train(mode)
        with torch.no_grad():
            assert torch.equal(a(x, t, y, cls, route_noise=route)[0], b(x, t, y, cls, route_noise=route)[0])


def test_an_mlp_variant_trains_and_two_plugins_on_one_slot_are_refused(tmp_path):
    from srdit.model import build_model
    from srdit.train import load_checkpoint, train

    _variant(tmp_path, "mlp_a", ["mlp"])
    _variant(tmp_path, "mlp_b", ["mlp"])
    cfg = _cfg(["mlp_a"], **{"ext.mlp_a.block": 1})
    assert train(cfg, tmp_path / "run", progress=False).status == "finished"
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    assert state["blocks.0.mlp.fc1.weight"].shape == (256, 64)  # relu^2 at width 4 D
    both = _cfg(["mlp_a", "mlp_b"])
    with pytest.raises(ValueError, match=r"^ext\.mlp_b: block 2's mlp is already replaced by ext\.mlp_a; switch on"):
        build_model(both.model, both.ext)


# ------------------------------------------------------------------------------------------------------------------
# training-time sampling
# ------------------------------------------------------------------------------------------------------------------

TIMES = """
import torch
from srdit.ext import Knob, Plugin
from srdit.transport.timesteps import shift_time


def times(knobs, n, shift, device):  # the built-in uniform draw, then a power of it
    return shift_time(torch.rand(n, device=device), shift) ** knobs.power


uniform_again = Plugin("uniform_again", "a test 2025", knobs={"power": Knob(1.0, range=(0, None), low_open=True)},
                       hooks={"times": times})
"""


def test_a_time_sampling_plugin_replaces_the_draw_in_its_place(tmp_path):
    """A plugin that draws the built-in uniform times trains bit-identically to the built-in draw (same place in
    the step's draw order, same global batch); another power of them moves the weights; times outside [0, 1] are
    one line."""
    from srdit.train import load_checkpoint, train

    load_plugins([str(_write(tmp_path / "uniform_again.py", TIMES))])
    runs = {
        "builtin": _cfg(["sprint"], **{"transport.time_sampling": "uniform"}),
        "plugin": _cfg(["uniform_again", "sprint"]),
        "squared": _cfg(["uniform_again", "sprint"], **{"ext.uniform_again.power": 2.0}),
    }
    weights = {}
    for name, cfg in runs.items():
        assert train(cfg, tmp_path / name, progress=False).status == "finished"
        weights[name] = load_checkpoint(tmp_path / name / "checkpoints/last.pt")["model"]
    assert all(torch.equal(weights["builtin"][k], weights["plugin"][k]) for k in weights["builtin"])
    assert not all(torch.equal(weights["builtin"][k], weights["squared"][k]) for k in weights["builtin"])
    bad = TIMES.replace("uniform_again", "bad_times").replace("** knobs.power", "+ 1")
    load_plugins([str(_write(tmp_path / "bad_times.py", bad))])
    with pytest.raises(ValueError, match=r"^plugin bad_times: times returned \(4,\); expected 4 times in \[0, 1\]$"):
        ext.time_rule({"bad_times": {"power": 1.0}})(4, 1.0, "cpu")


# ------------------------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------------------------

SOLVER = """
from srdit.ext import Knob, Plugin


def solver(knobs, velocity, state, times, generator):  # Euler, or the explicit midpoint method
    for i in range(len(times) - 1):
        t, t_next = float(times[i]), float(times[i + 1])
        dt = t_next - t
        v = velocity(state, t)
        if knobs.midpoint:
            half = [x + 0.5 * dt * vi for x, vi in zip(state, v)]
            v = velocity(half, t + 0.5 * dt)
        state = [x + vi * dt for x, vi in zip(state, v)]
    return state


my_solver = Plugin("my_solver", "a test 2025", stage="eval", knobs={"midpoint": Knob(False)}, hooks={"solver": solver})
"""


@pytest.mark.parametrize("techniques", [[], ["reg", "sprint", "path_drop_guidance"]], ids="+".join)
def test_a_solver_plugin_replaces_the_integrator(tmp_path, techniques):
    """Euler written as a plugin gives the built-in Euler sampler's samples bit for bit (guidance, REG's class
    token and path-drop guidance included: the solver sees the same velocity); the midpoint method differs and
    doubles the function evaluations."""
    from srdit.generate import generate
    from srdit.model import build_model

    load_plugins([str(_write(tmp_path / "my_solver.py", SOLVER))])
    diff = {"sample.cfg_scale": 2.0, "sample.steps": 3}
    plain = _cfg(techniques, **diff)
    torch.manual_seed(0)
    model = build_model(plain.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    euler, _, nfe = generate(model, plain, 6, seed=1)
    mine, _, my_nfe = generate(model, _cfg(["my_solver", *techniques], **diff), 6, seed=1)
    assert torch.equal(mine, euler) and my_nfe == nfe == 3
    mid, _, mid_nfe = generate(
        model, _cfg(["my_solver", *techniques], **diff, **{"ext.my_solver.midpoint": True}), 6, seed=1
    )
    assert mid_nfe == 6 and not torch.equal(mid, euler)


LABELS = """
from srdit.ext import Knob, Plugin


def labels(knobs, n, num_classes, rows, generator):  # every sample of one class
    import torch

    return torch.full((len(rows),), knobs.label, dtype=torch.int64)


one_class = Plugin(
    "one_class", "a test 2025", stage="eval", knobs={"label": Knob(3, range=(0, None))}, hooks={"labels": labels}
)
"""


def test_a_labels_plugin_replaces_the_evaluation_labels(tmp_path):
    """A `labels` hook gives the evaluation labels of every batch, in place of the random draw; a label outside
    [0, num_classes) is one line."""
    from srdit.generate import generate
    from srdit.model import build_model

    load_plugins([str(_write(tmp_path / "one_class.py", LABELS))])
    cfg = _cfg(["one_class"], **{"sample.steps": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _, y, _ = generate(model, cfg, 10, seed=1, batch_size=4)
    assert torch.equal(y, torch.full((10,), 3))
    with pytest.raises(ValueError, match=r"^plugin one_class: labels returned \(4,\); expected 4 labels in \[0, 10\)$"):
        generate(model, _cfg(["one_class"], **{"sample.steps": 2, "ext.one_class.label": 12}), 10, seed=1, batch_size=4)


def _code_check_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank r loads the dispersive plugin from folder/r (rank 1's copy edited when asked) and checks the ranks."""
    from srdit.parallel import DataParallel, check_same_code

    join_group(port, rank, world)
    try:
        load_plugins([str(Path(folder) / str(rank) / "dispersive.py")])
        try:
            check_same_code(DataParallel.current(), to_dict(_cfg(["dispersive"]))["ext"])
            outcome = "ok"
        except ConfigError as e:
            outcome = str(e)
        (Path(folder) / f"outcome{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("edited", [False, True])
def test_torchrun_ranks_with_other_plugin_code_refuse_in_one_line(tmp_path, edited, held_port):
    """Under torchrun each rank loads the plugins itself: ranks whose plugin code differs (a node with an older
    copy) refuse on every rank, naming the rank and both code versions; equal copies at other paths run."""
    for rank in (0, 1):
        shutil.copytree(EXAMPLE, tmp_path / str(rank))
    if edited:
        f = tmp_path / "1" / "repulsion.py"
        f.write_text(f.read_text().replace("def log_mean_exp_neg(", "def log_mean_exp_neg(  # \n"))
        f.write_text(f.read_text() + "\nUNUSED = 1\n")
    mp.spawn(_code_check_worker, args=(2, held_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"outcome{r}").read_text() for r in (0, 1)]
    if not edited:
        assert outcomes == ["ok", "ok"]
    else:
        assert outcomes[0] == outcomes[1] and "\n" not in outcomes[0]
        assert re.match(r"^rank 1 runs plugin dispersive code version \w+, rank 0 \w+: every rank", outcomes[0])


def test_forgetting_a_tests_plugins_never_forgets_the_environments_or_srdits_modules(tmp_path, monkeypatch):
    """A clone and its virtual environment may sit in the temporary folder where the tests write plugins: the cleanup
    between tests forgets the plugins' modules only, never a library (a second copy of sqlalchemy's modules breaks
    MLflow's store in the rest of the session) or srdit's own."""
    import types

    import sqlalchemy

    import srdit.technique_check

    before = set(sys.modules)
    plugin = types.ModuleType("a_test_plugin")
    plugin.__file__ = str(tmp_path / "a_test_plugin.py")
    library = types.ModuleType("a_library_module")
    library.__file__ = str(Path(sqlalchemy.__file__).parent / "a_library_module.py")
    own = types.ModuleType("srdit.a_module")
    own.__file__ = str(Path(srdit.technique_check.__file__).parent / "a_module.py")
    for m in (plugin, library, own):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    roots = (
        str(tmp_path),
        str(Path(sqlalchemy.__file__).parents[3]),
        str(Path(srdit.technique_check.__file__).parents[1]),
    )
    assert plugin_modules_since(before, roots) == ["a_test_plugin"]
