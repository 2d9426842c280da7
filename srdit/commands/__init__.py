"""The `srdit` command: train | sample | evaluate | convert | model-info | techniques | study | analyze | report |
ui | preprocess | cache-teacher | reference.

Bad input (missing file, malformed YAML, unknown key or technique, impossible combination, foreign checkpoint)
prints one line `srdit <command>: error: <message>` on stderr and exits with status 2, never a traceback
(`srdit.commands.errors.fail`, the one printer of a user error).

Every command is a function `main(argv) -> exit code` that parses its own arguments, with a function that builds
its parser (the CLI reference page is generated from those: `command_parsers`). Importing this package loads no
command module; `main` imports only the one it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from srdit.commands.errors import ArgError, OneLineParser, fail

__all__ = ["COMMANDS", "Command", "build_parser", "command_parsers", "main"]


@dataclass(frozen=True)
class Command:
    """Where a command lives: `srdit.commands.<module>.<main>(argv)` runs it, `<parser>()` builds its parser."""

    module: str
    main: str
    parser: str
    help: str
    "One line for `srdit --help` and the CLI reference."


COMMANDS: dict[str, Command] = {
    "train": Command("run", "train_main", "train_parser", "train one run (default: the embedded digits recipe)"),
    "sample": Command(
        "run",
        "sample_main",
        "sample_parser",
        "sample a checkpoint (EMA weights) to a PNG grid and "
        ".npz, or to seed-stable shards for cluster-scale evaluation",
    ),
    "evaluate": Command(
        "run",
        "evaluate_main",
        "evaluate_parser",
        "sample-quality metrics of a checkpoint: digits "
        "FD / KD / precision / recall; latent runs FID / sFID / IS / P / R",
    ),
    "convert": Command(
        "models", "convert_main", "convert_parser", "a reference checkpoint (SiT, REPA, SR-DiT) -> an srdit checkpoint"
    ),
    "model-info": Command(
        "models", "model_info_main", "model_info_parser", "parameters and GMACs of a model (e.g. SR-DiT-B/1, XL/2)"
    ),
    "techniques": Command(
        "models",
        "techniques_main",
        "techniques_parser",
        "list the techniques (built-ins and plugins): diff, knobs, paper, code; check one; start a new one",
    ),
    "study": Command("study", "main", "study_parser", "plan | run | resume | status | bench | submit a study YAML"),
    "analyze": Command("analyze", "main", "build_parser", "effects and synergy from a CSV"),
    "report": Command("report", "main", "report_parser", "render a study's dashboard"),
    "ui": Command("ui", "main", "ui_parser", "start the MLflow UI on the embedded store"),
    "preprocess": Command(
        "preprocess", "main", "preprocess_parser", "image folder -> center crops -> VAE latents in resumable shards"
    ),
    "cache-teacher": Command(
        "cache_teacher",
        "main",
        "cache_teacher_parser",
        "a latent folder's alignment-teacher tokens, once, for training to read",
    ),
    "reference": Command(
        "reference",
        "main",
        "reference_parser",
        "Inception (and DINOv2) reference statistics of real images for eval.reference",
    ),
}
"Every `srdit` command, in the order of `srdit --help`."


def _function(command: Command, name: str):
    return getattr(importlib.import_module(f"srdit.commands.{command.module}"), name)


def build_parser() -> argparse.ArgumentParser:
    """The top level of `srdit`: the list of commands (each command parses its own arguments)."""
    p = OneLineParser(prog="srdit", description="Ablation studies for diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return p


def command_parsers() -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Every `srdit` command: name -> (one-line help, the parser its `main` parses with), in `COMMANDS` order."""
    return {name: (c.help, _function(c, c.parser)()) for name, c in COMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    """`srdit COMMAND ...`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None:
        return _function(command, command.main)(argv[1:])
    try:  # no command, an unknown one, or --help (which prints the list and exits 0)
        build_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    return fail("srdit", f"unknown command {argv[0]!r}; see `srdit --help`")
