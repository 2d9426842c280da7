"""Property-based: generated YAML documents and key=value overrides thrown at the run and study loaders either load
or raise the loaders' own one-line ConfigError; never another exception, never a hang.

The documents mix real config keys with stray ones and values with the spellings YAML 1.1 reads surprisingly
(010, 1:30, .nan, on, 1e-3), anchors and aliases, merge keys, duplicate keys and raw text."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srdit.config import ConfigError, RunConfig
from srdit.study.spec import STUDY_KEYS, load_study
from srdit.techniques import TECHNIQUES, load_run_config

FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=20),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
"Deadline: a hang guard, not a timing assertion (a load takes milliseconds; 20 s only catches a runaway)."


def config_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        out += config_keys(tp, key + ".") if dataclasses.is_dataclass(tp) else [key]
    return out


KEYS = config_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
LEAVES = sorted({k.rsplit(".", 1)[-1] for k in KEYS})
TRICKY = [
    "010",
    "007",
    "0x1F",
    "1:30",
    "1:30.5",
    ".nan",
    ".NaN",
    "nan",
    ".inf",
    "-.inf",
    "1e-3",
    "3e-3",
    "0.003",
    "1e999",
    "on",
    "off",
    "yes",
    "no",
    "~",
    "null",
    "''",
    "'010'",
    "2026-11-30",
    "[]",
    "{}",
    "-1",
    "0",
    "1",
    "2",
    "64",
    "1.5",
    "-0.0",
    "sde",
    "euler",
    "cuda:0",
    "tpu",
    "digits",
    "latents",
    "!!binary aGk=",
    "!!python/object:os.system",
    "&a 5",
    "*a",
    "[qk_norm, repa]",
    "[rope, rope]",
    "9" * 40,
    "1" + "0" * 400,
    '"\\0"',
    "|\n  block",
    "10000000000",
    "[fd]",
    "[.nan]",
]

tricky = st.sampled_from(TRICKY)
scalar = st.one_of(
    tricky,
    tricky,
    tricky,
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
    .map(yaml.safe_dump)
    .map(lambda s: s.removesuffix("\n...\n").strip()),
)
key = st.one_of(
    st.sampled_from(SECTIONS + LEAVES + list(STUDY_KEYS) + list(TECHNIQUES) + ["preset", "<<", "kind"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=8),
)


@st.composite
def block(draw, depth: int = 0) -> list[str]:
    """Lines of a block mapping (indented by `depth`), keys possibly repeated, values scalars or nested."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(key)
        kind = draw(st.integers(0, 5)) if depth < 3 else 0
        pad = "  " * depth
        if kind == 5:
            lines.append(f"{pad}{k}:")
            lines += draw(block(depth + 1))
        elif kind == 4:
            items = draw(st.lists(scalar, max_size=4))
            lines.append(f"{pad}{k}: [{', '.join(items)}]")
        elif kind == 3:
            lines.append(f"{pad}{k}: {{{draw(key)}: {draw(scalar)}, {draw(key)}: {draw(scalar)}}}")
        else:
            lines.append(f"{pad}{k}: {draw(scalar)}")
    return lines


RUN_YAML = """preset: digits
techniques: [qk_norm]
model:
  size: debug
  patch_size: 2
  mlp: gelu
  rope: {enabled: true, theta: 10000.0}
  sprint:
    enabled: false
    drop_ratio: 0.75
transport: {time_sampling: uniform, shift: null}
loss: {repa: 0.5, cfm: 0.0}
train:
  steps: 10
  batch_size: 16
  lr: 1e-3
  betas: [0.9, 0.999]
  grad_clip: 1.0
  log_every: 5
  ckpt_every: 5
  device: cpu
sample: {sampler: sde, steps: 4, cfg_scale: 1.0}
eval: {n_samples: 8, batch_size: 8}
"""
STUDY_YAML = """name: fuzz
description: a study
base:
  train: {steps: 20, batch_size: 32, lr: 2.0e-3, log_every: 10}
  sample: {sampler: euler, steps: 4}
techniques:
  - sprint: {drop_ratio: 0.5}
  - rope
  - {name: wide, diff: {train.lr: 3e-3}}
design:
  kind: fractional_factorial
  resolution: 3
seeds: [0, 1]
constraints:
  - excludes: [sprint, wide]
  - {wins: rope, over: sprint}
metrics:
  primary: fd
  direction: min
  others: [kd]
resources:
  cpus: 1
  gpus: 0
  workers: 2
tracking:
  uri: null
"""


@st.composite
def mutated(draw, text: str) -> str:
    """A valid document with a few lines changed: a value replaced by a tricky scalar, a line repeated (a duplicate
    key), a line dropped, or a key renamed."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        what = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]))
        if what == 0 and ":" in line:
            lines[i] = f"{line.split(':', 1)[0]}: {draw(scalar)}"
        elif what == 1:
            lines.insert(i, line)
        elif what == 2:
            del lines[i]
        else:
            lines[i] = f"{indent}{draw(key)}:{line.split(':', 1)[1] if ':' in line else ''}"
        if not lines:
            break
    return "\n".join(lines)


documents = st.one_of(
    mutated(RUN_YAML),
    mutated(STUDY_YAML),
    block().map("\n".join),
    # a plausible study: the required keys, then stray content
    st.tuples(st.lists(st.sampled_from(list(TECHNIQUES)), min_size=1, max_size=3), block()).map(
        lambda t: f"name: fuzz\ntechniques: [{', '.join(t[0])}]\n" + "\n".join(t[1])
    ),
    # plausible sections of a run YAML
    st.lists(st.tuples(st.sampled_from(KEYS), scalar), min_size=1, max_size=5).map(
        lambda kvs: "\n".join(
            f"{k.split('.')[0]}:\n  " + ".".join(k.split(".")[1:]).replace(".", ":\n    ") + f": {v}"
            for k, v in kvs
            if "." in k
        )
    ),
    st.text(max_size=80),
    st.binary(max_size=40),  # written as bytes: not UTF-8, NUL bytes
    mutated(RUN_YAML).map(lambda t: t.encode("latin-1", "replace") + b"\xe9"),
)
overrides = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(KEYS + ["techniques", "preset", "train", "nope.x"]), scalar).map(
            lambda kv: "=".join(kv)
        ),
        st.text(max_size=20),
    ),
    max_size=3,
)


def only_config_errors(call) -> None:
    try:
        call()
    except ConfigError as e:
        assert "\n" not in str(e).strip(), str(e)
        assert str(e).strip(), "an empty message"


def write(p: Path, text: str | bytes) -> None:
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="srdit-fuzz-") as d:
        yield Path(d)


@FUZZ
@given(text=documents, extra=overrides)
def test_run_loader_loads_or_says_why(folder, text, extra):
    p = folder / "run.yaml"
    write(p, text)
    only_config_errors(lambda: load_run_config(p, extra))


@FUZZ
@given(extra=overrides)
def test_overrides_alone(extra):
    only_config_errors(lambda: load_run_config(None, extra))


@FUZZ
@given(text=documents)
def test_study_loader_loads_or_says_why(folder, text):
    p = folder / "study.yaml"
    write(p, text)
    only_config_errors(lambda: load_study(p))


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\ntrain: *a\n",  # a recursive alias
        "base: &b {train: *b}\n",
        "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
        + "model: *l8\n",  # alias bomb
        "[" * 600 + "]" * 600,  # deeper than the parser's recursion
    ],
)
def test_pathological_documents(folder, text):
    p = folder / "bomb.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_run_config(p)
    with pytest.raises(ConfigError):
        load_study(p)
