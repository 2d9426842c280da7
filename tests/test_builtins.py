"""The built-in techniques through the registration API (`srdit.builtins`, `srdit.ext.Builtin`): one module each,
the registry assembled from them equal, field for field and in order, to the literal registry it replaced (so every
config, study, content key and checkpoint built from a technique is unchanged); a bad declaration is refused with one
line; `srdit techniques` names each built-in's own module as where its code lives."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest

from srdit import builtins, ext
from srdit.commands import main
from srdit.config import ConfigError, Range
from srdit.techniques import TECHNIQUES, Technique

# The registry as it was written before the built-ins moved to their own modules (a literal in srdit.techniques),
# with its code tuples as they were: the assembled registry must equal it.
_SRDIT = "Speedrunning ImageNet Diffusion (SR-DiT), arXiv:2512.12386"

PREVIOUS: dict[str, Technique] = {
    t.name: t
    for t in [
        Technique(
            "sprint",
            "SPRINT token routing: dense/sparse/dense blocks, 75% of tokens dropped in the middle",
            "SPRINT, Park et al. 2025, arXiv:2510.21986; " + _SRDIT,
            {"model.sprint.enabled": True},
            {
                "drop_ratio": "model.sprint.drop_ratio",
                "path_drop_prob": "model.sprint.path_drop_prob",
                "dense_in": "model.sprint.dense_in",
                "dense_out": "model.sprint.dense_out",
            },
            code=("srdit.model.routing", "srdit.model.sit"),
        ),
        Technique(
            "rmsnorm",
            "RMSNorm instead of LayerNorm in the block pre-norms and final norm",
            "Zhang & Sennrich 2019, arXiv:1910.07467; " + _SRDIT,
            {"model.norm": "rmsnorm"},
            code=("srdit.model.layers", "srdit.model.sit"),
        ),
        Technique(
            "rope",
            "2-D axial rotary position embedding on q and k (added to absolute sin-cos positions)",
            "EVA-02, Fang et al. 2023, arXiv:2303.11331; " + _SRDIT,
            {"model.rope.enabled": True},
            {"theta": "model.rope.theta"},
            code=("srdit.model.layers", "srdit.model.attention", "srdit.model.sit"),
        ),
        Technique(
            "qk_norm",
            "RMSNorm over the head dimension on queries and keys",
            "Dehghani et al. 2023, arXiv:2302.05442; " + _SRDIT,
            {"model.qk_norm": True},
            code=("srdit.model.attention",),
        ),
        Technique(
            "value_residual",
            "Every block mixes block 0's values with a learned lambda (init 0.5)",
            "Zhou et al. 2024, arXiv:2410.17897; " + _SRDIT,
            {"model.value_residual": True},
            code=("srdit.model.attention", "srdit.model.sit"),
        ),
        Technique(
            "repa",
            "Align an early hidden state with a frozen teacher's patch tokens (negative cosine)",
            "REPA, Yu et al. 2024, arXiv:2410.06940",
            {"model.repa.enabled": True},
            {"depth": "model.repa.depth", "weight": "loss.repa", "projector_dim": "model.repa.projector_dim"},
            code=("srdit.model.alignment", "srdit.model.sit", "srdit.transport.objective", "srdit.transport.losses"),
        ),
        Technique(
            "reg",
            "Jointly denoise the teacher's class token as an extra token",
            "REG, Wu et al. 2025, arXiv:2507.01467",
            {"model.reg.enabled": True},
            {"weight": "loss.reg"},
            code=(
                "srdit.model.alignment",
                "srdit.model.sit",
                "srdit.transport.objective",
                "srdit.transport.losses",
                "srdit.transport.samplers",
            ),
        ),
        Technique(
            "cfm",
            "Contrastive flow matching: push predictions away from another sample's target",
            "Delta-FM, Stoica et al. 2025, arXiv:2506.05350; " + _SRDIT,
            {"loss.cfm": 0.05},
            {"weight": "loss.cfm"},
            code=("srdit.transport.objective", "srdit.transport.losses"),
        ),
        Technique(
            "time_shift",
            "Resolution-dependent time shift on training times and the sampler grid",
            "SD3, Esser et al. 2024, arXiv:2403.03206; " + _SRDIT,
            {"transport.time_shift": True},
            {"shift": "transport.shift"},
            code=("srdit.transport.timesteps", "srdit.transport.samplers", "srdit.config"),
        ),
        Technique(
            "balanced_labels",
            "Evaluation samples get class i mod num_classes (equal counts per class)",
            _SRDIT,
            {"sample.balanced_labels": True},
            code=("srdit.generate", "srdit.data.digits"),
            stage="eval",
        ),
        Technique(
            "logit_normal",
            "Logit-normal training times instead of uniform",
            "SD3, Esser et al. 2024, arXiv:2403.03206",
            {"transport.time_sampling": "logit_normal"},
            {"mean": "transport.logit_mean", "std": "transport.logit_std"},
            code=("srdit.transport.timesteps",),
        ),
        Technique(
            "swiglu",
            "SwiGLU MLP (2/3 width to keep parameters)",
            "Shazeer 2020, arXiv:2002.05202; " + _SRDIT,
            {"model.mlp": "swiglu"},
            code=("srdit.model.layers",),
        ),
        Technique(
            "relu2",
            "ReLU^2 MLP",
            "So et al. 2021 (Primer), arXiv:2109.08668; " + _SRDIT,
            {"model.mlp": "relu2"},
            code=("srdit.model.layers",),
        ),
        Technique(
            "path_drop_guidance",
            "Guidance whose unconditional branch also drops the SPRINT sparse path",
            _SRDIT,
            {"sample.path_drop_guidance": True},
            code=("srdit.transport.samplers", "srdit.model.routing"),
            stage="eval",
        ),
    ]
}


MOVED = {
    "rmsnorm": ("srdit.model.parts",),
    "qk_norm": ("srdit.model.parts", "srdit.model.attention"),
    "value_residual": ("srdit.model.parts", "srdit.model.attention", "srdit.model.sit"),
    "rope": ("srdit.model.parts", "srdit.model.layers", "srdit.model.attention", "srdit.model.sit"),
    "swiglu": ("srdit.model.parts", "srdit.model.layers"),
    "relu2": ("srdit.model.parts", "srdit.model.layers"),
    "path_drop_guidance": ("srdit.generate", "srdit.transport.samplers", "srdit.model.routing"),
}
"""Where the code of the built-ins that now run through the backbone's and the sampler's own points lives besides
their module (`code` is a listing: no key or checkpoint reads it)."""


def test_registry_is_assembled_from_the_builtin_modules_and_equals_the_previous_one():
    assert list(TECHNIQUES) == list(PREVIOUS)
    for name, old in PREVIOUS.items():
        new = TECHNIQUES[name]
        old = dataclasses.replace(old, code=MOVED.get(name, old.code))
        assert new.code == (f"srdit.builtins.{name}", *old.code), name  # its own module first, then as before
        assert dataclasses.replace(new, code=old.code) == old, name
        assert dict(new.diff) == dict(old.diff) and dict(new.knobs) == dict(old.knobs), name
    assert [b.name for b in builtins.BUILTINS] == list(TECHNIQUES)
    assert list(ext.BUILTINS) == list(TECHNIQUES)


def test_one_module_per_builtin_declares_it():
    folder = Path(builtins.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "common"))
    assert modules == sorted(TECHNIQUES), "every built-in module declares the technique it is named after"
    for name in modules:
        module = importlib.import_module(f"srdit.builtins.{name}")
        assert isinstance(module.TECHNIQUE, ext.Builtin) and module.TECHNIQUE.name == name
        assert ext.BUILTINS[name].module == module.__name__
        b = ext.BUILTINS[name]
        assert b.points and set(b.points) <= set(ext.HOOKS) | set(ext.CORE_POINTS)
        assert set(ext.CORE_HOOKS) <= set(ext.CORE_POINTS)
        assert set(b.hooks) <= set(b.points) and (b.on in {*b.knobs, *b.diff} if b.hooks else not b.on)


def test_knob_rules_come_from_the_config_schema():
    rules = ext.BUILTINS["sprint"].knob_rules()
    default, rule = rules["drop_ratio"]
    assert default == 0.75 and isinstance(rule, Range) and rule.contains(0.5) and not rule.contains(1.5)
    assert ext.BUILTINS["cfm"].knob_rules()["weight"] == (0.0, Range(0))
    assert ext.BUILTINS["logit_normal"].knob_rules()["std"] == (1.0, Range(0, low_open=True))
    assert ext.BUILTINS["logit_normal"].knob_rules()["mean"][1].contains(-3.0)  # any finite number
    assert ext.config_field_rule("model.mlp") == ("gelu", ("gelu", "swiglu", "relu2"))
    assert ext.config_field_rule("model.qk_norm") == (False, None)
    with pytest.raises(ConfigError, match=r"^model\.nope: unknown config key$"):
        ext.config_field_rule("model.nope")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "Bad-Name"}, "the name must be lower-case"),
        ({"stage": "later"}, "stage 'later' is not allowed"),
        ({"paper": ""}, "paper, description and diff are required"),
        ({"diff": {"model.nope": True}}, r"model\.nope: unknown config key"),
        ({"diff": {"model.sprint.drop_ratio": 2.0}}, r"model\.sprint\.drop_ratio: 2\.0 is not allowed"),
        ({"knobs": {"ratio": "model.sprint.nope"}}, r"model\.sprint\.nope: unknown config key"),
        ({"points": ("teleport",)}, "unknown point 'teleport'"),
        ({"hooks": {"loss": lambda ctx: {}}}, "hook 'loss' is not one of its points"),
        ({"points": ("loss",), "hooks": {"loss": lambda context, extra: {}}}, "hook loss has the wrong signature"),
        ({"points": ("loss",), "hooks": {"loss": lambda ctx: {}}}, "hooks need `on`"),
        ({"terms": {"x": "drop_ratio"}}, "loss term x needs a loss hook"),
    ],
)
def test_a_bad_builtin_declaration_is_one_line(change, message):
    bad = dataclasses.replace(ext.BUILTINS["sprint"], **{"name": "sprint_copy", "module": "", **change})
    with pytest.raises(ConfigError, match=message) as e:
        ext.register_builtin(bad, "tests.bad_builtin")
    assert "\n" not in str(e.value)
    assert "sprint_copy" not in ext.BUILTINS and "Bad-Name" not in ext.BUILTINS


def test_a_second_declaration_of_a_builtin_name_is_refused():
    with pytest.raises(
        ConfigError, match=r"built-in sprint \(tests\.elsewhere\): already declared in srdit\.builtins\.sprint"
    ):
        ext.register_builtin(ext.BUILTINS["sprint"], "tests.elsewhere")
    assert ext.BUILTINS["sprint"].module == "srdit.builtins.sprint"


def test_srdit_techniques_names_each_builtins_own_module(capsys):
    assert main(["techniques", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    for name in TECHNIQUES:
        assert listed[name]["code"][0] == f"srdit.builtins.{name}"


def test_cfm_runs_as_its_modules_loss_hook_bit_for_bit():
    """CFM's term comes from its own module's `loss` hook through the named-term path plugins use: the same value,
    bit for bit, as the closed form -||v - roll(v*)||^2 in float32, and the total adds it after fm with weight
    loss.cfm exactly as before (fm + w * cfm)."""
    import torch

    from srdit.builtins import cfm
    from srdit.config import RunConfig, apply_diff
    from srdit.model import build_model
    from srdit.parallel import DataParallel
    from srdit.techniques import with_techniques
    from srdit.transport.losses import flow_matching
    from srdit.transport.objective import StepNoise, training_losses

    cfg = apply_diff(with_techniques(RunConfig(), ["cfm"]), {"train.batch_size": 6, "loss.cfm": 0.3})
    assert [b.name for b, _ in ext.builtin_enabled(cfg, "loss")] == ["cfm"]
    assert ext.builtin_enabled(cfg, "loss")[0][1].weight == 0.3
    assert ext.builtin_enabled(RunConfig(), "loss") == []  # off (loss.cfm 0): absent
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x0 = torch.randn(6, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (6,))
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", DataParallel())
    calls = []

    def roll(v):
        calls.append(v.shape)
        return v.roll(1, dims=0)

    torch.manual_seed(1)
    losses = training_losses(model, x0, y, None, cfg, noise, roll=roll)
    assert list(losses) == ["loss", "fm", "cfm"] and len(calls) == 1  # one roll: the hook's
    torch.manual_seed(1)
    t = noise.t[:, None, None, None]
    y_in = torch.where(noise.drop, torch.full_like(y, cfg.model.num_classes), y)
    pred, _ = model((1 - t) * x0 + t * noise.eps, noise.t, y_in, None, route_noise=noise.route)
    target = noise.eps - x0
    want = -flow_matching(pred, target.roll(1, dims=0))
    assert torch.equal(losses["cfm"], want) and torch.equal(cfm.contrastive(pred, target), want)
    assert torch.equal(losses["loss"], losses["fm"] + 0.3 * losses["cfm"])


def test_editing_a_builtins_module_changes_the_training_code_version(tmp_path):
    """A built-in's module is training code: a change to its hook changes the training code version (and with it
    every training key), a comment or docstring edit does not."""
    import shutil

    from srdit.provenance import TRAINING_CODE, code_version

    assert "builtins" in TRAINING_CODE
    roots = {}
    for name in ("same", "comment", "code"):  # one folder each: code versions are cached per folder
        shutil.copytree(Path(builtins.__file__).parent, tmp_path / name / "builtins")
        roots[name] = tmp_path / name
    text = (roots["same"] / "builtins" / "cfm.py").read_text()
    commented = text.replace('"""{"cfm": the unweighted term}', '"""{"cfm": the term, unweighted}') + "# a note\n"
    (roots["comment"] / "builtins" / "cfm.py").write_text(commented)
    edited = text.replace("return -mean_squared_error(", "return -2 * mean_squared_error(")
    assert edited != text, "the code edit must hit the hook"
    (roots["code"] / "builtins" / "cfm.py").write_text(edited)
    version = {name: code_version(("builtins",), root=root) for name, root in roots.items()}
    assert version["comment"] == version["same"] != version["code"]


def test_a_builtin_whose_stage_does_not_match_its_keys_is_refused():
    from srdit.techniques import builtin_technique

    for name, stage in (("sprint", "eval"), ("path_drop_guidance", "train")):
        with pytest.raises(ConfigError, match=rf"^built-in {name} \(srdit\.builtins\.{name}\): stage {stage} does not"):
            builtin_technique(dataclasses.replace(ext.BUILTINS[name], stage=stage))


def _one_step(names, diff=None):
    """(cfg, model, x0, y, teacher, noise, losses) of one training step of the built-ins `names` on random data."""
    import torch

    from srdit.config import RunConfig, apply_diff
    from srdit.model import build_model
    from srdit.parallel import DataParallel
    from srdit.techniques import with_techniques
    from srdit.transport.objective import StepNoise, training_losses

    cfg = apply_diff(with_techniques(RunConfig(), names), {"train.batch_size": 6, **(diff or {})})
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    m = cfg.model
    x0 = torch.randn(6, m.in_channels, m.input_size, m.input_size)
    y = torch.randint(0, m.num_classes, (6,))
    tokens = (m.input_size // m.patch_size) ** 2
    teacher = (torch.randn(6, tokens, m.repa.teacher_dim), torch.randn(6, m.reg.dim))
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", DataParallel())
    torch.manual_seed(1)
    losses = training_losses(model, x0, y, teacher, cfg, noise)
    return cfg, model, x0, y, teacher, noise, losses


@pytest.mark.parametrize("names", [["repa"], ["repa", "reg"], ["repa", "reg", "cfm"]])
def test_repa_runs_as_its_modules_loss_hook_bit_for_bit(names):
    """REPA's term comes from its own module's `loss` hook (switched on by `model.repa.enabled`, its diff key):
    bit for bit the closed form -mean cos(projected, teacher tokens), the teacher's class token first when REG is
    on, and the total adds fm, repa, reg, cfm in that order."""
    import torch
    import torch.nn.functional as F

    from srdit.builtins import repa
    from srdit.config import RunConfig

    cfg, model, x0, y, (patches, cls0), noise, losses = _one_step(names, {"loss.cfm": 0.3} if "cfm" in names else {})
    assert [b.name for b, _ in ext.builtin_enabled(cfg, "loss")] == names
    assert ext.builtin_enabled(RunConfig(), "loss") == []  # off: absent
    assert list(losses) == ["loss", "fm", "repa", *[n for n in ("reg", "cfm") if n in names]]
    torch.manual_seed(1)
    t = noise.t
    y_in = torch.where(noise.drop, torch.full_like(y, cfg.model.num_classes), y)
    cls_t = (1 - t[:, None]) * cls0 + t[:, None] * noise.eps_cls if "reg" in names else None
    tt = t[:, None, None, None]
    _, aux = model((1 - tt) * x0 + tt * noise.eps, t, y_in, cls_t, route_noise=noise.route)
    target = torch.cat([cls0[:, None], patches], dim=1) if "reg" in names else patches
    want = -F.cosine_similarity(aux["repa"].float(), target.float(), dim=-1).mean()
    assert torch.equal(losses["repa"], want) and torch.equal(repa.alignment(aux["repa"], target), want)
    w = cfg.loss
    expect = losses["fm"] + w.repa * losses["repa"]
    if "reg" in names:
        expect = expect + w.reg * losses["reg"]
    if "cfm" in names:
        expect = expect + w.cfm * losses["cfm"]
    assert torch.equal(losses["loss"], expect)


@pytest.mark.parametrize("names", [["reg"], ["repa", "reg"]])
def test_reg_runs_as_its_modules_loss_hook_bit_for_bit(names):
    """REG's term comes from its own module's `loss` hook (switched on by `model.reg.enabled`), from the teacher's
    class token, its noise (`LossContext.noise_cls`) and the model's class-token velocity: bit for bit the closed
    form ||v_cls - (eps_cls - cls0)||^2, and the total adds it after fm (and repa) with weight loss.reg."""
    import torch

    from srdit.config import RunConfig
    from srdit.transport.losses import flow_matching

    cfg, model, x0, y, (_, cls0), noise, losses = _one_step(names)
    assert [b.name for b, _ in ext.builtin_enabled(cfg, "loss")] == names
    assert list(losses) == ["loss", "fm", *names]
    assert "reg" not in [b.name for b, _ in ext.builtin_enabled(RunConfig(), "loss")]
    torch.manual_seed(1)
    t = noise.t
    y_in = torch.where(noise.drop, torch.full_like(y, cfg.model.num_classes), y)
    cls_t = (1 - t[:, None]) * cls0 + t[:, None] * noise.eps_cls
    tt = t[:, None, None, None]
    _, aux = model((1 - tt) * x0 + tt * noise.eps, t, y_in, cls_t, route_noise=noise.route)
    want = flow_matching(aux["reg"], noise.eps_cls - cls0)
    assert torch.equal(losses["reg"], want)
    expect = losses["fm"] + cfg.loss.repa * losses["repa"] if "repa" in names else losses["fm"]
    assert torch.equal(losses["loss"], expect + cfg.loss.reg * losses["reg"])


def test_a_builtin_hook_is_switched_by_its_knob_or_its_diff_key():
    """`on` names a knob (CFM: loss.cfm, a weight) or, where no knob holds the switch, a key of the diff (REPA:
    model.repa.enabled); anything else is refused with one line."""
    assert ext.BUILTINS["cfm"].on == "weight" and ext.BUILTINS["repa"].on == "model.repa.enabled"
    bad = dataclasses.replace(ext.BUILTINS["repa"], name="repa_copy", module="", on="model.reg.enabled")
    with pytest.raises(ConfigError, match="hooks need `on`, the knob or diff key"):
        ext.register_builtin(bad, "tests.bad_builtin")


def test_logit_normal_times_come_from_its_modules_times_hook_bit_for_bit():
    """Logit-normal training times are its module's `times` hook (switched on by transport.time_sampling), drawn at
    the built-in draw's place: the step's whole noise equals a closed-form draw of the same RNG order (label dropout,
    sigmoid(mean + std n) shifted, eps), bit for bit; off, the draw is uniform."""
    import torch

    from srdit.builtins.time_shift import shift_time
    from srdit.config import RunConfig, apply_diff
    from srdit.model import build_model
    from srdit.parallel import DataParallel
    from srdit.techniques import with_techniques
    from srdit.transport.objective import StepNoise

    cfg = apply_diff(
        with_techniques(RunConfig(), ["logit_normal", "time_shift"]),
        {"train.batch_size": 6, "transport.logit_mean": 0.3, "transport.logit_std": 0.7},
    )
    (b, knobs), *rest = ext.builtin_enabled(cfg, "times")
    assert b.name == "logit_normal" and not rest and (knobs.mean, knobs.std) == (0.3, 0.7)
    assert ext.builtin_enabled(RunConfig(), "times") == []  # uniform: absent
    model = build_model(cfg.model)
    shift = cfg.shift_value()
    assert shift != 1.0
    torch.manual_seed(3)
    noise = StepNoise.draw(cfg, model, (6, 1, 8, 8), shift, "cpu", DataParallel())
    torch.manual_seed(3)
    drop = torch.rand(6) < cfg.train.label_dropout
    t = shift_time(torch.sigmoid(0.3 + 0.7 * torch.randn(6)), shift)
    eps = torch.randn(6, 1, 8, 8)
    assert torch.equal(noise.drop, drop) and torch.equal(noise.t, t) and torch.equal(noise.eps, eps)


def test_balanced_labels_come_from_its_modules_labels_hook():
    """Balanced evaluation labels are its module's `labels` hook (switched on by sample.balanced_labels, also when
    only the sampling settings in use switch it on): i mod num_classes over the whole evaluation, batch by batch,
    drawing nothing from the batch's generator (so the initial noise is the same as before); off, the labels are
    the uniform random draw. A labels hook that returns other than one label per row in range is refused."""
    import dataclasses as dc

    import torch

    from srdit.config import RunConfig, apply_diff
    from srdit.generate import generate
    from srdit.model import build_model
    from srdit.techniques import with_techniques

    cfg = apply_diff(with_techniques(RunConfig(), ["balanced_labels"]), {"sample.steps": 2})
    (b, _), *rest = ext.builtin_enabled(cfg, "labels")
    assert b.name == "balanced_labels" and not rest
    assert ext.builtin_enabled(RunConfig(), "labels") == []
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, y, _ = generate(model, cfg, 23, seed=5, batch_size=8)
    assert torch.equal(y, torch.arange(23) % 10)
    plain = apply_diff(RunConfig(), {"sample.steps": 2})
    _, y_random, _ = generate(model, plain, 23, seed=5, batch_size=8)
    assert not torch.equal(y_random, y)
    # the sampling settings in use switch it, as before (the training's sample grid)
    _, y_grid, _ = generate(
        model, plain, 23, seed=5, batch_size=8, sample_cfg=dc.replace(plain.sample, balanced_labels=True)
    )
    assert torch.equal(y_grid, y)
    bad = ext.checked_labels("plugin odd", None, lambda knobs, n, c, rows, g: torch.zeros(len(rows) + 1))
    with pytest.raises(ValueError, match=r"plugin odd: labels returned \(9,\); expected 8 labels in \[0, 10\)"):
        bad(23, 10, range(0, 8), None)


# ----------------------------------------------------------------------------------------------------------------
# The backbone's and the sampler's own points (`srdit.ext.CORE_HOOKS`)
# ----------------------------------------------------------------------------------------------------------------

CORE_USERS = {
    "rmsnorm": ("norm", {"model.norm": "rmsnorm"}),
    "swiglu": ("activation", {"model.mlp": "swiglu"}),
    "relu2": ("activation", {"model.mlp": "relu2"}),
    "qk_norm": ("qk_norm", {"model.qk_norm": True}),
    "value_residual": ("value_residual", {"model.value_residual": True}),
    "rope": ("rotary", {"model.rope.enabled": True}),
    "path_drop_guidance": (
        "unconditional",
        {"model.sprint.enabled": True, "sample.path_drop_guidance": True, "sample.cfg_scale": 2.0},
    ),
}
"Built-in -> (the core point its hook implements, the overrides that switch it on)."


def test_the_built_ins_that_shape_the_backbone_implement_its_points():
    for name, (point, _) in CORE_USERS.items():
        b = ext.BUILTINS[name]
        assert point in ext.CORE_HOOKS and set(b.hooks) == {point} and b.points == (point,), name


def test_the_backbone_and_the_sampler_test_no_techniques_switch():
    """The switches of the built-ins that run through the core's points are read by the registry only: no module
    of the backbone or the sampling code reads them (a switch read there would bypass the hook)."""
    root = Path(builtins.__file__).parents[1]
    switches = re.compile(r"\.(norm|mlp|qk_norm|value_residual|rope\.enabled|rope\.theta|path_drop_guidance)\b(?!\()")
    for module in ("model/sit.py", "model/layers.py", "model/attention.py", "model/parts.py", "generate.py"):
        source = (root / module).read_text()
        reads = [m.group(0) for m in switches.finditer(source) if not _is_a_module_attribute(source, m.start())]
        assert not reads, f"srdit/{module} reads {reads}"
    samplers = (root / "transport" / "samplers.py").read_text()
    assert "path_drop" not in samplers.replace("path-drop", "")


def _is_a_module_attribute(source: str, at: int) -> bool:
    """`self.norm(`, `block.mlp`, `self.final.norm`: the part (an attribute of a module), not a config switch."""
    start = source.rfind("\n", 0, at) + 1
    owner = re.split(r"[^\w.]", source[start:at])[-1]
    return not owner.endswith("cfg") and not owner.endswith(("sc", "sample", "m"))


@pytest.mark.parametrize("name", list(CORE_USERS))
def test_a_core_point_is_called_only_while_its_technique_is_on(name, monkeypatch):
    """Each built-in's hook runs where the plain SiT builds its part, and only while it is on: a plain model and
    plain sampling call no hook; switched on, its own hook runs (once per part) and no other."""
    from srdit.config import RunConfig, apply_diff
    from srdit.generate import generate
    from srdit.model import build_model
    from srdit.model.sizes import SIZES

    calls: dict[str, int] = {}
    for other, (point, _) in CORE_USERS.items():
        hook = ext.BUILTINS[other].hooks[point]

        def counted(*args, _hook=hook, _name=other):
            calls[_name] = calls.get(_name, 0) + 1
            return _hook(*args)

        monkeypatch.setitem(ext.BUILTINS[other].hooks, point, counted)
    plain = apply_diff(RunConfig(), {"sample.steps": 2, "sample.cfg_scale": 2.0})
    generate(build_model(plain.model), plain, 4, 0)
    assert calls == {}
    point, overrides = CORE_USERS[name]
    cfg = apply_diff(RunConfig(), {**overrides, "sample.steps": 2})
    generate(build_model(cfg.model), cfg, 4, 0)
    depth = SIZES[cfg.model.size][0]
    per_model = {"norm": 2 * depth + 1, "activation": depth, "qk_norm": depth, "value_residual": depth, "rotary": 1}
    assert calls == {name: per_model.get(point, 1)}
