"""`make setup` builds srdit with the build backend pinned in pyproject.toml (in an isolated build environment,
as pip does for `pip install -e .`): the build prints no deprecation warning (setuptools stops accepting the old
`license = {text = ...}` table after 2027-02-18) and the package declares its license as an SPDX expression."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_build_prints_no_deprecation_warning_and_declares_an_spdx_license(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "srdit", src / "srdit", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "deprecat" in line.lower()]
    assert warnings == [], "\n".join(warnings[:20])
    (wheel,) = (tmp_path / "dist").glob("srdit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta.splitlines(), meta[:800]
