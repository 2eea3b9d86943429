"""Starting 2 local ranks with MLX's own launcher (`mlx.launch --backend ring`, loopback only)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240  # s: a hung test run ends, whatever happens to the ranks


def launcher() -> Path:
    path = Path(sys.executable).parent / "mlx.launch"
    if not path.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    return path


def free_ports(count: int = 2) -> int:
    """A first port of `count` consecutive free ones (the ring backend takes one per rank): concurrent
    test runs must not meet on mlx.launch's default port."""
    for _ in range(100):
        first = random.randrange(20_000, 60_000)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free local ports")


def launch(*command: str, ranks: int = 2, timeout: float = LAUNCH_TIMEOUT, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """Run `python COMMAND...` on `ranks` local processes; stdout and stderr of all ranks, merged."""
    args = [str(launcher()), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)),
            "--python", sys.executable, "--", *command]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environ)
