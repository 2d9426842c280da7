"""The documentation cannot drift: the generated reference pages equal what the code generates now, the benchmark
tables equal what their JSON renders, the README stays short, and the site builds with warnings as errors (a broken
link, a missing anchor or a page left out of the navigation fails)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_reference_pages_are_current():
    r = run("docs/gen_reference.py", "--check")
    assert r.returncode == 0, f"{r.stderr.strip()}\nregenerate with: python docs/gen_reference.py"


def test_benchmark_tables_are_current():
    r = run("bench/tables.py", "--check")
    assert r.returncode == 0, f"{r.stderr.strip()}\nrerender with: python bench/tables.py"


def test_reference_pages_cover_every_field_command_technique_and_metric():
    """Spot-checks that the generator walks everything: each config field, sub-command, technique and metric."""
    import dataclasses
    import typing

    from srdit.config import RunConfig
    from srdit.metric_registry import METRICS
    from srdit.techniques import TECHNIQUES

    ref = ROOT / "docs" / "reference"
    config = (ref / "config.md").read_text()

    def sections(cls, prefix=""):
        """(dotted section, its leaf field names) for every config dataclass under RunConfig."""
        hints = typing.get_type_hints(cls)
        leaves = [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        yield prefix, leaves
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from sections(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)

    for section, names in sections(RunConfig):
        if section:
            body = config.split(f"## `{section}`\n", 1)[1].split("\n## ", 1)[0]
            assert all(f"| `{n}` |" in body for n in names), section
    assert "| `drop_ratio` | float | `0.75` | number in [0, 1) |" in config
    assert "| `device` | str | `auto` | auto, cpu, cuda, cuda:N |" in config
    cli = (ref / "cli.md").read_text()
    for command in ("train", "sample", "study", "study plan", "study run", "analyze", "report", "ui", "reference"):
        assert f"`srdit {command}`" in cli
    assert "--target-mde Y" in cli and "--all-steps" in cli  # options of delegated parsers
    techniques = (ref / "techniques.md").read_text()
    assert all(f"| `{name}` |" in techniques for name in TECHNIQUES)
    metrics = (ref / "metrics.md").read_text()
    assert all(f"| `{name}` |" in metrics for name in METRICS)
    for page in ref.glob("*.md"):
        assert "python docs/gen_reference.py" in page.read_text().split("\n\n", 2)[1], page.name


def test_check_mode_names_a_stale_page(tmp_path, monkeypatch):
    """--check fails (and writes nothing) when a page differs from the code."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name in gen.PAGES:
        (tmp_path / name).write_text("stale\n" if name == "metrics.md" else gen.PAGES[name]())
    monkeypatch.setattr(gen, "OUT", tmp_path)
    monkeypatch.setattr(gen, "ROOT", tmp_path.parent)
    assert gen.main(["--check"]) == 1
    assert (tmp_path / "metrics.md").read_text() == "stale\n"
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


def test_readme_is_short_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", text):
        assert (ROOT / target).exists(), target


def test_site_builds_with_warnings_as_errors(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (it is in the dev extra: pip install -e '.[dev]')")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("index.html", "results.html", "troubleshooting.html", "reference/config.html", "reference/cli.html"):
        assert (tmp_path / "site" / page).exists(), page
    results = (tmp_path / "site" / "results.html").read_text()
    assert "Measured results" in results and "<table>" in results  # bench/README.md included, tables rendered
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text()  # offline: no web fonts
