"""Run under `mlx.launch -n 2`: flux1-generate --parallel tensor where rank 1 fails at its second
denoising step, as asked by the first argument: `die` (the process ends at once) or `hang` (it stops
answering). The remaining arguments go to flux1-generate (tests/parallel/test_failures.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import flux_1  # noqa: E402,F401
from flux_1.cli.main import main  # noqa: E402
from flux_1.pipeline import sampler  # noqa: E402

how, argv = sys.argv[1], sys.argv[2:]
if os.environ.get("MLX_RANK") == "1":
    euler_step, calls = sampler.euler_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if how == "die":
                os._exit(7)
            time.sleep(3600)
        return euler_step(*args, **kwargs)

    sampler.euler_step = failing_step
main(argv)
