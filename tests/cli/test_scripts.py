"""The root scripts `main.py`, `save.py`, `compare.py` run from a plain checkout: no install, no PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# script -> a flag its --help must list
SCRIPTS = {"main.py": "--prompt", "save.py": "--overwrite", "compare.py": "--strengths"}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


def assert_usage(proc: subprocess.CompletedProcess, script: str) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}"), proc.stdout[:200]
    assert SCRIPTS[script] in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_from_the_repo_root(script):
    assert_usage(run([script, "--help"], cwd=REPO), script)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_from_another_folder(script, tmp_path):
    assert_usage(run([str(REPO / script), "--help"], cwd=tmp_path), script)


@pytest.fixture(scope="module")
def bare_checkout(tmp_path_factory) -> Path:
    """A copy of the scripts and src/ in a fresh folder, where no installed flux_1 can be found."""
    root = tmp_path_factory.mktemp("checkout")
    for script in SCRIPTS:
        shutil.copy(REPO / script, root / script)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return root


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_when_flux_1_is_not_installed(script, bare_checkout, tmp_path):
    # -S skips site-packages' .pth files, among them an editable install's; the dependencies (mlx, numpy,
    # ...) stay importable through PYTHONPATH.
    deps = {"PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    probe = run(["-S", "-c", "import flux_1"], cwd=tmp_path, **deps)
    assert "No module named 'flux_1'" in probe.stderr  # the setting really hides any installed copy
    assert_usage(run(["-S", str(bare_checkout / script), "--help"], cwd=tmp_path, **deps), script)
