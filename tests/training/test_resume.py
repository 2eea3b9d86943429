"""Resuming: a run interrupted (Ctrl+C in the middle of a step) and resumed gives bitwise the loss curve and
the adapters of the uninterrupted run; a resume under other settings is refused, naming the setting."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from flux_1.training import trainer
from flux_1.training.trainer import TrainConfig, TrainingError, TrainingInterrupted, train
from tests.training.tiny_runs import tiny_settings, write_images

# Everything that carries state across steps: moments, warm-up + cosine, accumulation, batches, flip.
SETTINGS = dict(steps=4, batch_size=2, grad_accum=2, flip=True, lr_scheduler="cosine", lr_warmup_steps=2,
                learning_rate=5e-3, save_every=3)


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_schnell, tmp_path_factory):
    """(data, uninterrupted output, interrupted-then-resumed output)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_images(root / "data")
    train(TrainConfig(**tiny_settings(data, root / "straight", tiny_schnell, **SETTINGS)))

    original = trainer.Trainer.optimizer_step

    def interrupted(self):
        result = original(self)
        if self.step == 2:  # step 3's update is applied but not committed when Ctrl+C arrives
            raise KeyboardInterrupt
        return result

    trainer.Trainer.optimizer_step = interrupted
    try:
        with pytest.raises(TrainingInterrupted) as caught:
            train(TrainConfig(**tiny_settings(data, root / "resumed", tiny_schnell, **SETTINGS)))
    finally:
        trainer.Trainer.optimizer_step = original
    assert caught.value.step == 2
    assert [e["step"] for e in log(root / "resumed")] == [1, 2]
    (root / "resumed" / "checkpoints" / ".step_9.tmp").mkdir()  # a checkpoint write that never completed
    train(TrainConfig(**tiny_settings(data, root / "resumed", tiny_schnell, resume=True, **SETTINGS)))
    return data, root / "straight", root / "resumed"


def test_resume_is_bit_exact(runs):
    _, straight, resumed = runs
    assert log(resumed) == log(straight)  # every loss and learning rate, bitwise (JSON floats round-trip)
    a, b = mx.load(str(straight / "lora.safetensors")), mx.load(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.array(a[key]), np.array(b[key])), key
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step_2", "step_3", "step_4"]


def test_steps_may_be_raised(runs, tiny_schnell, tmp_path):
    data, straight, _ = runs
    out = tmp_path / "more"
    shutil.copytree(straight, out)
    train(TrainConfig(**tiny_settings(data, out, tiny_schnell, resume=True, **{**SETTINGS, "steps": 5})))
    assert [e["step"] for e in log(out)] == list(range(1, 6))
    assert log(out)[:4] == log(straight)


@pytest.mark.parametrize("change, named", [
    ({"rank": 8}, "rank is 8 but the checkpoint was trained with 16"),
    ({"learning_rate": 1e-3}, "learning_rate is 0.001 but the checkpoint was trained with 0.005"),
    ({"targets": "all"}, "targets is 'all'"),
    ({"seed": 1}, "seed is 1"),
    ({"batch_size": 1}, "batch_size is 1"),
    ({"model": "dev"}, "model is 'dev'"),
    ({"steps": 3}, "steps is 3, fewer than the 4 already trained"),
])
def test_conflicting_settings_are_refused(runs, tiny_schnell, change, named):
    data, straight, _ = runs
    with pytest.raises(TrainingError, match=f"cannot resume .*step_4: {named}"):
        train(TrainConfig(**tiny_settings(data, straight, tiny_schnell, resume=True, **{**SETTINGS, **change})))


def test_changed_data_is_refused(runs, tiny_schnell, tmp_path):
    data, straight, _ = runs
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    (changed / "img1.txt").write_text("another caption")
    with pytest.raises(TrainingError, match="cannot resume .*: data differs from the checkpoint's"):
        train(TrainConfig(**tiny_settings(changed, straight, tiny_schnell, resume=True, **SETTINGS)))


def test_other_world_size_is_refused(runs, tiny_schnell):
    data, straight, _ = runs
    state = trainer.read_checkpoint(straight)
    config = TrainConfig(**tiny_settings(data, straight, tiny_schnell, resume=True, **SETTINGS))
    with pytest.raises(TrainingError, match=r"trained by 1 process\(es\), this run has 2; launch the same number"):
        trainer.check_resume(state, config, world_size=2)


def test_nothing_to_resume(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint to resume in"):
        train(TrainConfig(data=tmp_path, output=tmp_path / "none", resume=True))
