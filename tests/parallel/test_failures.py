"""A rank that dies, hangs or never connects ends the run on every rank with a one-line message within
the --parallel-timeout bound, and no image (nor a temporary file) is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.parallel.launching import REPO, free_ports, launch

ARGS = ["-m", "schnell", "-p", "a red fox", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3",
        "--parallel", "tensor", "--parallel-timeout", "4"]


@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_failing_rank_stops_every_rank(tmp_path, tiny_schnell, how):
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    run = launch(str(REPO / "tests/parallel/launched_failure.py"), how, *ARGS, "--path", str(tiny_schnell),
                 "-o", str(out / "x.png"), timeout=120)
    elapsed = time.monotonic() - t0
    errors = re.findall(r"error: .*", run.stderr)  # a progress bar may precede one on its line
    assert list(out.iterdir()) == []  # no image, no temporary file
    if how == "hang":  # each rank's watchdog: 4 s without an answer
        for rank in (0, 1):
            assert any(f"error: rank {rank} of 2: no answer from the other ranks for 4 s while waiting for denoising "
                       f"step 2 of 2" in e for e in errors), run.stderr[-3000:]
    else:  # the ring backend sees the closed connection at once, or the launcher stops the survivor first,
        # or (blocked where neither reaches it) its watchdog does
        reasons = ("lost another rank", "stopped by the launcher", "no answer from the other ranks for 4 s")
        assert any(e.startswith("error: rank 0 of 2: ") and any(r in e for r in reasons) for e in errors), \
            run.stderr[-3000:]
        assert "rank 1 exited with code 7" in run.stderr
    assert elapsed < 100


def test_a_rank_that_cannot_connect_stops_within_the_timeout(tmp_path, tiny_schnell):
    port = free_ports(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')  # rank 1 never comes
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "flux_1.cli.main", *ARGS, "--parallel-timeout", "2", "--path",
                          str(tiny_schnell), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        "error: rank 0: no answer from the other ranks for 2 s while joining the group (a rank died or cannot "
        "connect); stopping, no image written")
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "x.png").exists()
