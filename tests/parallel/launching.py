"""Starting 2 local ranks with MLX's own launcher (`mlx.launch --backend ring`, loopback only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import free_ports  # noqa: F401  (tests take it from here too)

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240  # s: a hung test run ends, whatever happens to the ranks


def launcher() -> Path:
    path = Path(sys.executable).parent / "mlx.launch"
    if not path.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    return path


def launch(*command: str, ranks: int = 2, timeout: float = LAUNCH_TIMEOUT, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """Run `python COMMAND...` on `ranks` local processes; stdout and stderr of all ranks, merged."""
    args = [str(launcher()), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)),
            "--python", sys.executable, "--", *command]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environ)
