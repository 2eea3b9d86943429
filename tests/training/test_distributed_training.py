"""Data-parallel training (#13): two local ranks over the ring backend (loopback) train the same adapters as
one process with the same global batch.

The two runs are not bitwise equal: one process sums the gradients of a batch of 2 inside one backward pass,
two ranks each take 1 sample and average with all_sum, so float32 additions happen in another order (about
1e-7 relative on the gradients). Adam divides by sqrt(v), which turns these into slightly larger, still tiny,
differences of the factors after a few steps: we compare with atol 1e-4 (the factors are about 0.1). An element
whose gradient is within that rounding of 0 can change sign, and Adam moves it by a whole learning rate either
way: a few such elements may differ by up to 2 lr per step, no more."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from flux_1.training.trainer import TrainConfig, train
from tests.parallel.launching import launch
from tests.training.tiny_runs import tiny_settings, write_images

SCRIPT = Path(__file__).with_name("dp_train_script.py")
LR, STEPS = 1e-3, 2  # tiny_settings' learning rate
SETTINGS = {"grad_accum": 2, "steps": STEPS, "save_every": 1, "learning_rate": LR}


@pytest.fixture(scope="module")
def single(tiny_schnell, tmp_path_factory):
    """One process, batch 2: the reference every 2-rank run (batch 1 per rank) must equal."""
    root = tmp_path_factory.mktemp("dp")
    data = write_images(root / "data", sizes=((64, 64), (64, 64)))
    train(TrainConfig(**tiny_settings(data, root / "one", tiny_schnell, **{**SETTINGS, "batch_size": 2})))
    return data, root / "one"


def run_two_ranks(model, data, out: Path, steps: int, **settings) -> None:
    overrides = json.dumps({**SETTINGS, **settings, "steps": steps})
    args = (str(SCRIPT), str(model), str(data), str(out), str(steps), overrides)
    proc = launch(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_run(one: Path, two: Path) -> None:
    ours, theirs = mx.load(str(one / "lora.safetensors")), mx.load(str(two / "lora.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        diff = np.abs(np.array(theirs[key]) - np.array(ours[key]))
        assert diff.max() <= 2 * LR * STEPS, key
        assert (diff > 1e-4).mean() <= 0.005, (key, np.sort(diff.ravel())[-10:])
    losses = [[json.loads(line)["loss"] for line in (o / "log.jsonl").read_text().splitlines()] for o in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    # Rank 0 alone wrote the outputs: one log line per step, one checkpoint per save.
    assert len(losses[1]) == 2 and sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_two_ranks_train_as_one_process(tiny_schnell, single, tmp_path):
    data, one = single
    two = tmp_path / "two"
    shutil.copytree(one / "cache", two / "cache")  # the ranks find every latent and embedding cached
    run_two_ranks(tiny_schnell, data, two, 2)
    state = json.loads((two / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["world_size"] == 2
    assert_same_run(one, two)


def test_two_ranks_resume_as_one_uninterrupted_run(tiny_schnell, single, tmp_path):
    """Stopped after step 1, resumed to step 2 with the same 2 ranks: the single process's 2-step run."""
    data, one = single
    two = tmp_path / "two"
    shutil.copytree(one / "cache", two / "cache")
    run_two_ranks(tiny_schnell, data, two, 1)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_1"]
    run_two_ranks(tiny_schnell, data, two, 2, resume=True)
    assert_same_run(one, two)


def test_a_single_process_never_initialises_distributed(monkeypatch):
    from flux_1 import parallel
    from flux_1.training import trainer

    for name in parallel.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: pytest.fail("mx.distributed.init was called"))
    ranks = trainer.Ranks.from_environment()
    assert (ranks.rank, ranks.size, ranks.group) == (0, 1, None)
    grads = {"a": [mx.ones((2,))]}
    assert ranks.average(grads) is grads  # nothing is summed, nothing copied
