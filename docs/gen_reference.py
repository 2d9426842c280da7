"""The reference pages of the documentation, generated from the code: one source of truth each.

    python docs/gen_reference.py           # (re)write docs/reference/*.md (`make docs` runs it)
    python docs/gen_reference.py --check   # exit 1 naming every stale page (tests/test_docs.py runs it)

- `config.md`: the run YAML, from the config dataclasses of `srdit/config.py` (fields, types, defaults, `ranged`
  ranges and patterns, the docstring under each field) and the presets of `srdit/techniques.py`;
- `study.md`: the study YAML, from the schema of `srdit/study/spec.py` (its key tuples, the docstrings of its
  `parse_<key>` functions, its typed sections);
- `cli.md`: every `srdit` command, from its argparse parser (`srdit.commands.command_parsers` finds them);
- `techniques.md`: the technique registry (`srdit.techniques.TECHNIQUES`);
- `metrics.md`: the metric registry (`srdit.metric_registry.METRICS`).

Run from the repository root (or anywhere: the root is put on sys.path, so the working tree's srdit is documented).
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import inspect
import itertools
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference"
COMMAND = "python docs/gen_reference.py"
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------------------
# Markdown helpers
# ----------------------------------------------------------------------------------------------------------------


def header(title: str, source: str) -> str:
    return (
        f'# {title}\n\n!!! note "Generated page"\n    Generated from {source} by `{COMMAND}` (run by `make docs`). '
        f"Edit the source, then regenerate; `tests/test_docs.py` fails while this page is stale.\n\n"
    )


def md(text: Any) -> str:
    """Text for a table cell: one line; outside code spans pipes escaped and `<`, `>`, `&` as entities (they would
    be HTML). Inside code spans a pipe needs no escape (Python-Markdown's tables skip code spans)."""
    parts = re.sub(r"\s+", " ", str(text)).strip().split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


def code(value: Any) -> str:
    """A value as inline code in a table cell (YAML spelling: null, true, lists)."""
    text = json.dumps(value) if isinstance(value, (bool, type(None), list, tuple, dict)) else str(value)
    return f"`{text}`" if text != "" else '`""`'


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (`x: int = 1` then `"what x is"`)."""
    tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs, body = {}, node.body
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc or "").split("\n\n")[0]


# ----------------------------------------------------------------------------------------------------------------
# The run YAML (srdit/config.py)
# ----------------------------------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(code(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} {type_name(args[0])}" if len(set(args)) == 1 else "list"
    if tp is type(None):
        return "null"
    if origin in (dict, collections.abc.Mapping):
        return "mapping"
    return {"bool": "bool", "int": "int", "float": "float", "str": "str"}.get(getattr(tp, "__name__", ""), str(tp))


def allowed(f: dataclasses.Field, tp: Any) -> str:
    """The field's rule in words: its `ranged` Range, its `matching` pattern, or what its type admits."""
    from srdit.config import PATTERN, RANGE

    if PATTERN in f.metadata:
        return md(f.metadata[PATTERN][1])
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is tuple else args[0]
    if RANGE in f.metadata:
        return md(f.metadata[RANGE].describe("integer" if base is int else "number"))
    if base is float:
        return "finite number"
    return ""


def config_rows(cls: type, prefix: str, presets: dict[str, dict[str, Any]]) -> list[tuple[str, list[list[str]]]]:
    """One table per dataclass, nested sections after their parent: (dotted section, rows)."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested += config_rows(tp, key, presets)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values = [presets[p].get(key) for p in presets]
        rows.append(
            [
                f"`{f.name}`",
                type_name(tp),
                code(default),
                allowed(f, tp),
                md(docs.get(f.name, "")),
                *(
                    "" if v == default or (isinstance(default, tuple) and v == list(default)) else code(v)
                    for v in values
                ),
            ]
        )
    return [(prefix, rows)] + nested


def config_page() -> str:
    from srdit.config import RunConfig, flatten
    from srdit.techniques import PRESETS, preset

    presets = {p: flatten(preset(p)) for p in PRESETS if p != "digits"}
    out = [
        header(
            "Run YAML reference", "the config dataclasses of `srdit/config.py` and the presets of `srdit/techniques.py`"
        )
    ]
    out.append(f"{first_paragraph(inspect.getmodule(RunConfig).__doc__)}\n\n")
    out.append(
        "A run YAML (and a study's `base:`) has these top-level keys: `preset` (one of "
        f"{', '.join(code(p) for p in PRESETS)}; default `digits`), `techniques` (a list of technique names, "
        "see [Techniques](techniques.md)), and the sections below, each written key by key over the preset. "
        "Overrides on the command line use dotted keys: `srdit train train.steps=200 model.qk_norm=true`.\n\n"
        "Columns: the key, its type, its default (the `digits` preset), the values allowed, what it does, and "
        f"its value in the {', '.join(code(p) for p in presets)} preset where it differs from the default.\n\n"
    )
    for section, rows in config_rows(RunConfig, "", presets):
        if not rows:
            continue
        title = section or "top level"
        cls = RunConfig
        for part in filter(None, section.split(".")):
            cls = typing.get_type_hints(cls)[part]
        out.append(f"## `{title}`\n\n" if section else "## Top level (record)\n\n")
        out.append(f"{md(first_paragraph(cls.__doc__))}\n\n")
        out.append(table(["key", "type", "default", "allowed", "description", *presets], rows) + "\n")
    out.append(
        "## Cross-field rules\n\n"
        f"{md(first_paragraph(RunConfig.validate.__doc__))} The rules (`RunConfig.validate` in "
        "`srdit/config.py`) and their messages are listed in [Troubleshooting](../troubleshooting.md).\n"
    )
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# The study YAML (srdit/study/spec.py)
# ----------------------------------------------------------------------------------------------------------------


def section_table(cls: type, keys: tuple[str, ...]) -> str:
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = set(keys) - set(fields)
    if missing:
        raise SystemExit(f"{cls.__name__} lacks the YAML keys {sorted(missing)}: update docs/gen_reference.py")
    rows = []
    for k in keys:
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append([f"`{k}`", type_name(hints[k]), code(default), md(docs.get(k, ""))])
    return table(["key", "type", "default", "description"], rows)


def study_page() -> str:
    from srdit.study import spec

    out = [header("Study YAML reference", "the schema of `srdit/study/spec.py`")]
    intro, example = inspect.cleandoc(spec.__doc__).split("\n\n", 1)[1].split("\n\n", 1)
    out.append(f"{md(intro)}\n\n```yaml\n{inspect.cleandoc(chr(10) + example)}\n```\n\n")
    out.append(
        "Loading is strict: an unknown key, a wrong type or a value out of range is one error line naming "
        "the key and the allowed values.\n\n## Top-level keys\n\n"
    )
    fdocs = attribute_docs(spec.StudySpec)
    rows = []
    for key in spec.STUDY_KEYS:
        fn = getattr(spec, f"parse_{key}", None)
        doc = first_paragraph(fn.__doc__) if fn is not None and fn.__doc__ else fdocs.get(key)
        if not doc:
            raise SystemExit(
                f"study key {key!r} has no docstring (parse_{key} or StudySpec.{key} in "
                f"srdit/study/spec.py): document it there"
            )
        rows.append([f"`{key}`", md(doc)])
    out.append(table(["key", "what it is"], rows) + "\n")
    out.append(
        "## `design`\n\n"
        + table(["kind", "keys"], [[f"`{k}`", ", ".join(f"`{x}`" for x in v)] for k, v in spec.DESIGN_KEYS.items()])
    )
    out.append(
        f"\nA search's `space` maps a dotted config key (or `<technique>.<knob>`) to a mapping with the keys "
        f"{', '.join(f'`{k}`' for k in spec.SPACE_KEYS)}. A fold-over repeats "
        f"{', '.join(f'`{k}`' for k in spec.FOLDOVER_INHERITED)} of the study it folds only unchanged "
        f"(`FOLDOVER_INHERITED`).\n\n"
    )
    out.append(
        "## `constraints`\n\n" + f"Kinds: {', '.join(f'`{k}`' for k in spec.CONSTRAINT_KINDS)} "
        f"(`wins` with `over`). A custom technique item has the keys "
        f"{', '.join(f'`{k}`' for k in spec.CUSTOM_TECHNIQUE_KEYS)}.\n\n"
    )
    out.append("## `metrics`\n\n" + section_table(spec.Metrics, spec.METRICS_KEYS))
    out.append(
        "\nMetrics a study may name, with their default direction (from the metric registry, see "
        "[Metrics](metrics.md)): " + ", ".join(f"`{m}` ({d})" for m, d in spec.METRIC_DIRECTIONS.items()) + ".\n\n"
    )
    out.append("## `resources`\n\n" + section_table(spec.Resources, spec.RESOURCES_KEYS))
    out.append("\n## `tracking`\n\n" + section_table(spec.Tracking, spec.TRACKING_KEYS))
    out.append(f"\n## Limits\n\nAt most {spec.MAX_SEEDS} seeds per cell (`MAX_SEEDS`).\n")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# The command line (argparse parsers)
# ----------------------------------------------------------------------------------------------------------------


def command_parsers() -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Every `srdit` command: name -> (one-line help, parser), in the order of `srdit --help`.

    The one place that knows where commands live is `srdit.commands.COMMANDS`; each command's parser is built by
    the same function its `main` parses with."""
    from srdit import commands

    return commands.command_parsers()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """A parser's sub-commands: name -> (help, parser); empty when it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), p) for name, p in action.choices.items()}
    return {}


def _metavar(a: argparse.Action) -> str:
    if a.metavar is not None:
        return a.metavar if isinstance(a.metavar, str) else " ".join(a.metavar)
    if a.choices is not None and not isinstance(a, argparse._SubParsersAction):
        return "{" + ",".join(map(str, a.choices)) + "}"
    return a.dest.upper() if a.option_strings else a.dest


def _spelling(a: argparse.Action) -> str:
    """How an argument is written: `--steps STEPS`, `--json`, `overrides ...`."""
    if not a.option_strings:
        return {
            "?": f"[{_metavar(a)}]",
            "*": f"[{_metavar(a)} ...]",
            "+": f"{_metavar(a)} ...",
            argparse.REMAINDER: "...",
        }.get(a.nargs, _metavar(a))
    flags = ", ".join(a.option_strings)
    if a.nargs == 0:
        return flags
    return f"{flags} [{_metavar(a)}]" if a.nargs == "?" else f"{flags} {_metavar(a)}"


def _usage(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = [prog]
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        s = _spelling(a).split(", ")[-1] if a.option_strings else _spelling(a)
        parts.append(s if not a.option_strings or a.required else f"[{s}]")
    if subcommands(parser):
        parts.append("{" + ",".join(subcommands(parser)) + "} ...")
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > 100:
            lines.append(" " * (len(prog) + 1) + part)
        else:
            lines[-1] += " " + part
    return "\n".join(lines)


def _default(a: argparse.Action) -> str:
    if a.nargs == 0 or a.default in (None, argparse.SUPPRESS) or a.required:
        return ""
    return code(a.default)


def command_section(prog: str, hlp: str, parser: argparse.ArgumentParser, level: int) -> str:
    out = [f"{'#' * level} `{prog}`\n\n"]
    text = hlp or parser.description or ""
    if text:
        out.append(f"{md(text)}\n\n")
    out.append(f"```\n{_usage(prog, parser)}\n```\n\n")
    rows = [
        [
            f"`{_spelling(a)}`",
            ("required" if a.required else "") if a.option_strings else "positional",
            _default(a),
            md(a.help or ""),
        ]
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
    ]
    if rows:
        out.append(table(["argument", "", "default", "help"], rows) + "\n")
    for name, (sub_help, sub) in subcommands(parser).items():
        out.append(command_section(f"{prog} {name}", sub_help, sub, level + 1))
    return "".join(out)


def cli_page() -> str:
    from srdit import commands

    out = [header("Command-line reference", "the argparse parsers of every `srdit` command")]
    out.append(f"{md(first_paragraph(commands.__doc__))}\n\n")
    commands = command_parsers()
    out.append(
        table(["command", "what it does"], [[f"[`srdit {n}`](#srdit-{n})", md(h)] for n, (h, _) in commands.items()])
        + "\n"
    )
    for name, (hlp, parser) in commands.items():
        out.append(command_section(f"srdit {name}", hlp, parser, 2))
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# The registries
# ----------------------------------------------------------------------------------------------------------------


def techniques_page() -> str:
    from srdit import techniques as tq

    out = [header("Technique registry", "`srdit.techniques.TECHNIQUES`")]
    out.append(
        "A technique is a named config diff; a run or a study cell is `base + the merged diffs of its "
        "enabled techniques`. Stage `train` shapes the trained weights; stage `eval` acts only when sampling "
        "or evaluating, so cells that differ only in it share one training. Knobs are short names a study "
        "overrides (`- sprint: {drop_ratio: 0.5}`). `srdit techniques` prints the same registry.\n\n"
    )
    rows = [
        [
            f"`{t.name}`",
            md(t.description),
            "<br>".join(code(f"{k}: {json.dumps(v)}") for k, v in t.diff.items()),
            "<br>".join(f"`{k}` → `{v}`" for k, v in t.knobs.items()),
            t.stage,
            md(t.paper),
            "<br>".join(f"`{c}`" for c in t.code),
        ]
        for t in tq.TECHNIQUES.values()
    ]
    out.append(table(["name", "what it does", "diff", "knobs", "stage", "paper", "code"], rows))
    out.append(f"\nThe `SR-DiT-B/1` preset enables {', '.join(f'`{t}`' for t in tq.SRDIT_STACK)} (`SRDIT_STACK`).\n")
    return "".join(out)


def metrics_page() -> str:
    from srdit import metric_registry as mr

    out = [header("Metric registry", "`srdit.metric_registry.METRICS`")]
    out.append(mr.__doc__.split("\n\n", 1)[1].strip().replace("`tests/test_metric_registry.py`", "a test") + "\n\n")
    rows = [
        [
            f"`{m.name}`",
            m.direction,
            m.scale,
            md(m.unit),
            ", ".join(m.producers),
            "yes" if m.curve else "",
            "yes" if m.analysable else "",
            md(m.description),
        ]
        for m in mr.METRICS.values()
    ]
    out.append(table(["name", "direction", "scale", "unit", "producers", "curve", "study metric", "description"], rows))
    out.append(
        f"\n`direction`: which way is better (gains are oriented so that positive = better). `scale: log`: "
        f"effects are estimated on log values (speed-ups multiply). Metrics measured with a clock carry the "
        f"machine's load: {', '.join(f'`{m}`' for m in mr.WALL_CLOCK)}. Progress lines show the first "
        f"reported of {', '.join(f'`{m}`' for m in mr.QUALITY_ORDER)}.\n"
    )
    return "".join(out)


PAGES = {
    "config.md": config_page,
    "study.md": study_page,
    "cli.md": cli_page,
    "techniques.md": techniques_page,
    "metrics.md": metrics_page,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page differs from the code")
    args = p.parse_args(argv)
    stale = []
    for name, make in PAGES.items():
        path, text = OUT / name, make()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        elif not path.exists() or path.read_text() != text:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"stale reference pages: {', '.join(stale)}; regenerate with `{COMMAND}` (or `make docs`)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
