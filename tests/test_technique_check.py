"""The check kit (`srdit.technique_check`, `srdit techniques check`) and `srdit techniques new`.

- every technique of the registry and every example plugin (examples/plugins/<name>/<name>.py: the dispersive
  loss) pass every check (one call: one baseline process and one pair of gloo workers for all of them);
- deliberately broken plugins fail it: one whose off path draws random numbers (caught by the baseline from a fresh
  process), one whose knob has no range (refused at load: the `load` check fails, exit 1);
- the kit's parts measure what they claim: out-of-range values, a train technique that changes nothing, an eval
  technique that changes the weights;
- `srdit techniques new` writes a plugin that loads, passes the kit, and a study that plans; it refuses a built-in's
  name and an existing file in one line.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import plugin_modules_since

from srdit import ext
from srdit.config import EXTENSIONS, ConfigError, Range
from srdit.technique_check import CHECKS, check_techniques, failures, outside_values
from srdit.techniques import TECHNIQUES

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_EXAMPLES = ROOT / "examples" / "plugins"
EXAMPLES = {p.stem: p for p in sorted(PLUGIN_EXAMPLES.glob("*/*.py")) if p.stem == p.parent.name}
"The example plugins: examples/plugins/<name>/<name>.py declares technique <name>."


@contextlib.contextmanager
def registry_restored():
    """The process's plugin registry, knob schemas, path and plugin modules as they were before."""
    plugins, knobs, path, modules = dict(ext.PLUGINS), dict(EXTENSIONS), list(sys.path), set(sys.modules)
    try:
        yield
    finally:
        ext.PLUGINS.clear()
        ext.PLUGINS.update(plugins)
        EXTENSIONS.clear()
        EXTENSIONS.update(knobs)
        sys.path[:] = path
        for name in plugin_modules_since(modules, (str(PLUGIN_EXAMPLES), tempfile.gettempdir())):  # libraries stay
            del sys.modules[name]


@pytest.fixture(autouse=True)
def clean_registry():
    with registry_restored():
        yield


@pytest.fixture(scope="module")
def registry_results():
    """The kit on every registry technique and every example plugin, in one call."""
    with registry_restored():
        yield check_techniques([*TECHNIQUES, *EXAMPLES], [str(p) for p in EXAMPLES.values()])


@pytest.mark.parametrize("name", [*TECHNIQUES, *EXAMPLES])
def test_every_technique_passes_the_kit(name, registry_results):
    assert "dispersive" in EXAMPLES
    checks = registry_results[name]
    assert [c.check for c in checks] == list(CHECKS)
    assert all(c.ok for c in checks), "\n".join(c.line() for c in checks if not c.ok)
    stage = checks[CHECKS.index("stage")].figure
    assert stage.startswith(f"{ext.PLUGINS[name].stage if name in ext.PLUGINS else TECHNIQUES[name].stage} stage")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


NOISY = """
import torch
from srdit.ext import Knob, Plugin


def _draw(module, args, output):  # every forward of every module draws a number, whether the plugin is on or not
    torch.rand(1)


HANDLE = torch.nn.modules.module.register_module_forward_hook(_draw)


def loss(ctx):
    return {"noisy": ctx.pred.square().mean()}


noisy = Plugin("noisy", "nowhere 2025", knobs={"weight": Knob(0.1, range=(0, 1))}, hooks={"loss": loss},
               terms={"noisy": "weight"})
"""


def test_a_plugin_whose_off_path_draws_random_numbers_fails_off_equals_baseline(tmp_path):
    try:
        results = check_techniques(
            ["noisy", "cfm"], [str(_write(tmp_path / "noisy.py", NOISY))], checks=("load", "off = baseline")
        )
    finally:
        if "noisy" in sys.modules:
            sys.modules["noisy"].HANDLE.remove()
    for name in ("noisy", "cfm"):  # the off run has every listed plugin loaded
        load, off = results[name]
        assert load.ok and not off.ok
        assert "vs a fresh process without it: model weights differ" in off.figure
    assert failures(results) == [results["noisy"][1].line(), results["cfm"][1].line()]


def test_draws_at_import_cannot_move_a_run_and_pass(tmp_path):
    """The trainer seeds its own generators, so random numbers a plugin draws when imported and registered change
    no run: the off check (against the fresh process) passes. What it catches is a draw on the off path itself."""
    source = NOISY.replace("HANDLE = torch.nn.modules.module.register_module_forward_hook(_draw)", "torch.rand(1000)")
    results = check_techniques(
        ["noisy"], [str(_write(tmp_path / "noisy.py", source))], checks=("load", "off = baseline")
    )
    assert failures(results) == []


def test_a_plugin_whose_knob_has_no_range_fails_at_load_and_the_cli_exits_1(tmp_path, capsys):
    from srdit.commands import main

    bad = _write(
        tmp_path / "norange.py",
        'from srdit.ext import Knob, Plugin\nnorange = Plugin("norange", "nowhere 2025", knobs={"w": Knob(0.5)})\n',
    )
    assert main(["techniques", "check", "norange", "--plugins", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "norange: load: FAIL: --plugins[0]: plugin norange: knob w: has no range; declare " + (
        "range=(low, high) (None for an unbounded side) like every numeric config field"
    )
    assert out[1].startswith("norange: 0 of 1 checks passed in ") and len(out) == 2


@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_plugins_may_come_before_or_after_the_check_sub_command(where, tmp_path, capsys):
    """`srdit techniques --plugins P check NAME` is `srdit techniques check NAME --plugins P`: the top-level list
    ends at the sub-command (argparse alone would take `check NAME` for two more plugins); given on both sides, the
    lists join (the sub-command's first)."""
    from srdit.commands import main

    bad = _write(
        tmp_path / "norange.py",
        'from srdit.ext import Knob, Plugin\nnorange = Plugin("norange", "nowhere 2025", knobs={"w": Knob(0.5)})\n',
    )
    other = _write(tmp_path / "other.py", 'from srdit.ext import Plugin\nother = Plugin("other", "nowhere 2025")\n')
    argv = {
        "before": ["techniques", "--plugins", str(bad), "check", "norange"],
        "after": ["techniques", "check", "norange", "--plugins", str(bad)],
        "both": ["techniques", "--plugins", str(bad), "check", "norange", "--plugins", str(other)],
    }[where]
    assert main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"norange: load: FAIL: --plugins[{int(where == 'both')}]: plugin norange: knob w: has no")


def test_a_bad_name_or_step_count_is_one_line_and_exit_2(capsys):
    from srdit.commands import main

    assert main(["techniques", "check", "nope"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("srdit techniques: error: unknown technique 'nope'; allowed: sprint,") and err.count("\n") == 1
    )
    assert main(["techniques", "check", "cfm", "--steps", "0"]) == 2
    assert "--steps: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_values_just_outside_a_range():
    assert outside_values(int, Range(1, None)) == [0]
    assert outside_values(float, Range(0, 1, high_open=True))[:2] == [-5e-324, 1.0]
    inside = outside_values(float, Range(0, 2))
    assert inside[1] > 2 and inside[1] - 2 < 1e-15 and inside[2] == float("inf")
    assert outside_values(float, Range(0, None, low_open=True))[0] == 0.0


LAZY = """
from srdit.ext import Knob, Plugin


def loss(ctx):
    return {"lazy": ctx.pred.sum() * 0.0}


lazy = Plugin("lazy", "nowhere 2025", stage="STAGE", knobs={"weight": Knob(0.0, range=(0, None))},
              hooks={"loss": loss}, terms={"lazy": "weight"})
"""


def test_the_stage_check_catches_a_declaration_that_does_not_match_what_it_touches(tmp_path):
    """A "train" plugin that changes nothing fails the stage check, and its loss term, which sends no gradient,
    fails `on finite`; the same plugin declared "eval" (it leaves the weights alone) fails the stage check too,
    because it does not change the samples either."""
    for stage in ("train", "eval"):
        with registry_restored():
            (tmp_path / stage).mkdir()
            file = _write(tmp_path / stage / "lazy.py", LAZY.replace("STAGE", stage))
            results = check_techniques(["lazy"], [str(file)], checks=("load", "stage", "on finite"))
            load, check, finite = results["lazy"]
            assert load.ok and not check.ok
            assert check.figure.startswith(f"{stage} stage, but")
            assert not finite.ok and finite.figure == "the loss term lazy sends no gradient to any parameter"


def test_techniques_new_writes_a_plugin_that_passes_the_kit_and_a_study_that_plans(tmp_path, capsys):
    from srdit.commands import main
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    out = tmp_path / "mine"
    assert main(["techniques", "new", "my_term", "--out", str(out)]) == 0
    plugin, study = out / "my_term.py", out / "digits_my_term.yaml"
    assert plugin.is_file() and study.is_file()
    assert f"wrote {plugin}" in capsys.readouterr().out
    assert 'paper="FILL IN' in plugin.read_text()

    assert main(["techniques", "check", "my_term", "--plugins", str(plugin)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in lines[:-1]] == list(CHECKS)
    assert all(": pass: " in line for line in lines[:-1]) and lines[-1].startswith("my_term: 6 of 6 checks passed")

    plan = plan_study(load_study(study))
    assert [t.cell for t in plan.trials].count("1") == 3 and len(plan.trials) == 6
    assert all(("ext" in t.config) == (t.cell == "1") for t in plan.trials)
    assert main(["study", "plan", str(study)]) == 0

    assert main(["techniques", "new", "my_term", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("my_term.py: exists; remove it or choose another --out or name")
    assert main(["techniques", "new", "sprint", "--out", str(tmp_path)]) == 2
    assert "sprint: a built-in technique has that name" in capsys.readouterr().err
    assert not (tmp_path / "sprint.py").exists()
    with pytest.raises(ConfigError, match="a technique name is lower-case"):
        from srdit.technique_template import new_technique

        new_technique("My-Term", tmp_path)
