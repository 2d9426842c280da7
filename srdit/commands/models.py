"""`srdit convert | model-info | techniques`: a reference checkpoint into an srdit one, a model's size and cost, the
technique registry (built-ins and plugins), its check kit (`techniques check`) and a new plugin (`techniques new`)."""

from __future__ import annotations

import argparse
import json

from srdit.commands.errors import ArgError, OneLineParser, count, fail
from srdit.commands.run import guarded, parse_and_run


def cmd_convert(args) -> int:
    from srdit.convert import convert_file, target_config

    cfg = target_config(args.preset, args.overrides)
    print(json.dumps(convert_file(args.source, args.layout, cfg, args.out, args.weights)))
    return 0


def cmd_model_info(args) -> int:
    from srdit.config import DataConfig, ModelConfig, RunConfig
    from srdit.model import SIZES, build_model, count_macs
    from srdit.techniques import preset, with_techniques

    techniques = [t for t in (args.techniques or "").split(",") if t]
    if args.name in ("SR-DiT-B/1", "digits"):
        cfg = preset(args.name)
    else:
        size, _, patch = args.name.removeprefix("SiT-").removeprefix("DiT-").partition("/")
        if size not in SIZES or patch not in ("1", "2", "4"):
            return fail(
                "srdit model-info",
                f"unknown model {args.name!r}; allowed: SR-DiT-B/1, digits, or "
                f"<size>/<patch> with size in {', '.join(SIZES)} and patch 1, 2, 4 (e.g. B/2)",
            )
        native = (
            dict(in_channels=1, input_size=8, num_classes=10)
            if size == "debug"
            else dict(in_channels=4, input_size=32, num_classes=1000)
        )  # SD-VAE latent of a 256 px image
        data = DataConfig() if size == "debug" else DataConfig(dataset="latents", path="-")
        cfg = RunConfig(model=ModelConfig(size=size, patch_size=int(patch), **native), data=data)
    if techniques:
        cfg = with_techniques(cfg, techniques)
    model = build_model(cfg.model)
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "params_inference": model.inference_parameters(),
        "gmacs": round(count_macs(model) / 1e9, 4),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(
            f"{args.name}: {info['params'] / 1e6:.2f}M parameters ({info['params_inference'] / 1e6:.2f}M at "
            f"inference), {info['gmacs']:.2f} GMACs per image"
        )
    return 0


def cmd_technique_check(args) -> int:
    import time

    from srdit.technique_check import check_techniques

    started = time.perf_counter()
    checks = check_techniques([args.name], args.plugins or (), args.steps, relative_to=".")[args.name]
    for c in checks:
        print(c.line(), flush=True)
    failed = sum(not c.ok for c in checks)
    print(
        f"{args.name}: {len(checks) - failed} of {len(checks)} checks passed in {time.perf_counter() - started:.1f} s"
    )
    return 1 if failed else 0


def cmd_technique_new(args) -> int:
    from srdit.technique_template import new_technique

    plugin, study = new_technique(args.name, args.out)
    print(f"wrote {plugin} (the plugin: fill in paper, description and the loss) and {study} (its digits study)")
    print(f"next: srdit techniques check {args.name} --plugins {plugin}; srdit study plan {study}")
    return 0


def cmd_techniques(args) -> int:
    if args.action == "check":
        return cmd_technique_check(args)
    if args.action == "new":
        return cmd_technique_new(args)
    from srdit import ext
    from srdit.provenance import plugin_sources
    from srdit.techniques import TECHNIQUES, load_installed_plugins, load_plugins, plugin_technique

    load_installed_plugins()
    load_plugins(args.plugins or None, ".", "--plugins")
    plugins = {s["name"]: s for s in plugin_sources(ext.PLUGINS)}
    listed = [*TECHNIQUES.values(), *(plugin_technique(p) for p in ext.PLUGINS.values())]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "description": t.description,
                        "diff": dict(t.diff),
                        "knobs": dict(t.knobs),
                        "paper": t.paper,
                        "code": list(t.code),
                        "stage": t.stage,
                        "plugin": plugins.get(t.name),
                    }
                    for t in listed
                ],
                indent=1,
            )
        )
        return 0
    for t in listed:
        print(f"{t.name}: {t.description}")
        print(f"  diff:   {', '.join(f'{k}={json.dumps(v)}' for k, v in t.diff.items())}")
        print(f"  stage:  {'training' if t.stage == 'train' else 'evaluation only (shares the training of its cell)'}")
        if t.knobs:
            print(f"  knobs:  {', '.join(f'{k} -> {v}' for k, v in t.knobs.items())}")
        print(f"  paper:  {t.paper}")
        print(f"  code:   {', '.join(t.code)}")
        if t.name in plugins:
            p = plugins[t.name]
            print(f"  plugin: loaded from {p['origin']} (code version {p['version']})")
    return 0


def convert_parser() -> argparse.ArgumentParser:
    c = OneLineParser(prog="srdit convert")
    c.add_argument("source", help="the reference checkpoint (.pt)")
    c.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the preset's config (the srdit model must "
        "match the checkpoint), e.g. model.size=XL",
    )
    c.add_argument("--from", dest="layout", required=True, help="the reference code's layout: speedrundit, repa, sit")
    c.add_argument(
        "--preset",
        required=True,
        help="srdit config to convert into: digits, SR-DiT-B/1, or "
        "SiT-<size>/<patch> (SD-VAE 256 px latents, e.g. SiT-XL/2)",
    )
    c.add_argument(
        "--weights",
        default="ema",
        help="ema or model: which weights of a training checkpoint (default: ema; a bare state dict is taken as is)",
    )
    c.add_argument("--out", required=True, help="the srdit checkpoint to write")
    return c


def model_info_parser() -> argparse.ArgumentParser:
    m = OneLineParser(prog="srdit model-info")
    m.add_argument("name", help="SR-DiT-B/1, digits, or <size>/<patch> (e.g. XL/2, SiT-B/2)")
    m.add_argument("--techniques", help="comma-separated techniques to apply")
    m.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return m


def techniques_parser() -> argparse.ArgumentParser:
    tq = OneLineParser(prog="srdit techniques")
    tq.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    tq.add_argument(
        "--plugins",
        nargs="+",
        action="extend",
        metavar="PLUGIN",
        help="plugin techniques to load and list too: module names, or .py files / package folders "
        "(installed plugins, entry-point group srdit.techniques, are always listed)",
    )
    sub = tq.add_subparsers(dest="action", parser_class=OneLineParser)
    ck = sub.add_parser(
        "check",
        help="the check kit on the tiny digits model: off = a fresh process without it (weights, EMA, samples), "
        "knob ranges, stage, finite on-path gradients, 1 vs 2 data-parallel workers; one line per check, exit 1 "
        "on a failure",
    )
    ck.add_argument("name", help="the technique (a built-in, or a plugin of --plugins)")
    ck.add_argument(
        "--plugins",
        nargs="+",
        action="extend",
        metavar="PLUGIN",
        help="plugins to load (and keep off in the off run): module names, or .py files / package folders",
    )
    ck.add_argument("--steps", type=count(1), default=3, help="training steps of each run")
    nw = sub.add_parser(
        "new",
        help="write a starting plugin (a loss term with one weight knob, hooks documented, a paper field to fill "
        "in) and a digits study YAML that lists it",
    )
    nw.add_argument("name", help="the technique's name (lower-case letters, digits and _; not a built-in's)")
    nw.add_argument("--out", default=".", help="the folder to write NAME.py and digits_NAME.yaml into")
    return tq


def convert_main(argv: list[str] | None = None) -> int:
    """`srdit convert SRC --from LAYOUT --preset P --out CKPT [key=value ...]`; returns the exit code."""
    parser = convert_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if any("=" not in e or e.startswith("-") for e in extra):  # key=value overrides may follow the options
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except ArgError as e:
        return fail(e.prog, e.message)
    args.overrides += extra
    return guarded(parser.prog, cmd_convert, args)


def model_info_main(argv: list[str] | None = None) -> int:
    """`srdit model-info NAME [--techniques a,b]`; returns the exit code."""
    return parse_and_run(model_info_parser(), cmd_model_info, argv)


def techniques_main(argv: list[str] | None = None) -> int:
    """`srdit techniques [--json] [--plugins PLUGIN ...]`, `srdit techniques check NAME [--plugins PLUGIN ...]
    [--steps N]`, `srdit techniques new NAME [--out DIR]`; returns the exit code."""
    return parse_and_run(techniques_parser(), cmd_techniques, _plugins_after_action(argv))


ACTIONS = ("check", "new")
"The sub-commands of `srdit techniques`."


def _plugins_after_action(argv: list[str] | None) -> list[str] | None:
    """`--plugins A B check NAME ...` -> `check NAME ... --plugins A B`: the top-level option's list ends at a
    sub-command name (argparse would take `check NAME` as two more plugins), and the plugins reach the sub-command,
    which loads them (a plugin file named like a sub-command is written `./check.py`)."""
    if argv is None or "--plugins" not in argv:
        return argv
    argv = list(argv)
    at = argv.index("--plugins")
    end = at + 1
    while end < len(argv) and not argv[end].startswith("-") and argv[end] not in ACTIONS:
        end += 1
    if end < len(argv) and argv[end] in ACTIONS:
        return argv[:at] + argv[end:] + argv[at:end]
    return argv
