"""training/trainer.py end to end on the tiny checkpoints: a run overfits, writes its outputs, and the LoRA it
saves changes what the pipeline draws; kohya output; Ctrl+C; settings checks; the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from flux_1.pipeline.flux1 import Config, Flux1
from flux_1.training import trainer
from flux_1.training.trainer import TrainConfig, TrainingError, TrainingInterrupted, train
from tests.training.tiny_runs import tiny_settings, write_images


@pytest.fixture(scope="module")
def overfit(tiny_schnell, tmp_path_factory):
    """30 steps at a high learning rate on two images, every linear adapted; validation at 15 and 30."""
    root = tmp_path_factory.mktemp("overfit")
    data = write_images(root / "data", sizes=((64, 64), (64, 64)))
    config = TrainConfig(**tiny_settings(data, root / "out", tiny_schnell, steps=30, learning_rate=1e-2,
                                         targets="all", rank=8, alpha=8, save_every=10, keep_checkpoints=2,
                                         validation_prompts=("a photo of thing 0",), validation_steps=2,
                                         validate_every=15))
    return train(config), root / "out"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls(overfit):
    _, out = overfit
    curve = losses(out)
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5]), curve


def test_outputs(overfit):
    lora, out = overfit
    assert lora == out / "lora.safetensors" and lora.is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31)) and all(e["lr"] == pytest.approx(1e-2) for e in log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20", "step_30"]  # keep_checkpoints=2
    for name in ("adapter.safetensors", "optimizer.safetensors", "lora.safetensors", "state.json"):
        assert (out / "checkpoints" / "step_30" / name).is_file()
    state = json.loads((out / "checkpoints" / "step_30" / "state.json").read_text())
    assert state["step"] == 30 and state["world_size"] == 1 and state["config"]["rank"] == 8
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_15_0_seed0.png", "step_30_0_seed0.png"]
    with Image.open(out / "validation" / "step_30_0_seed0.png") as im:
        assert im.size == (64, 64)
    with Image.open(out / "loss.png") as im:
        assert im.size == (640, 360) and im.format == "PNG"
    assert not list(out.rglob(".*tmp*"))  # no temporary file or folder left


def test_the_saved_lora_changes_the_image(overfit, tiny_schnell):
    lora, _ = overfit
    flux = Flux1.from_alias("schnell", path=tiny_schnell, progress=False)
    config = Config(num_inference_steps=2, height=64, width=64)
    plain = np.asarray(flux.generate_image(seed=0, prompt="a photo of thing 0", config=config, progress=False).image)
    flux.set_loras([str(lora)])
    tuned = np.asarray(flux.generate_image(seed=0, prompt="a photo of thing 0", config=config, progress=False).image)
    assert np.abs(tuned.astype(int) - plain.astype(int)).mean() > 1.0


def test_kohya_output_on_dev(tiny_dev, tmp_path):
    """dev (guidance embedder: the guidance-scale path), kohya layout, read back by our loader."""
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    lora = train(TrainConfig(**tiny_settings(data, tmp_path / "out", tiny_dev, model="dev", steps=2,
                                             learning_rate=1e-2, save_format="kohya")))
    keys = mx.load(str(lora)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    flux = Flux1.from_alias("dev", path=tiny_dev, lora_paths=[str(lora)], progress=False)
    assert flux.lora_info()[0]["name"] == "lora"


def test_ctrl_c_saves_the_last_completed_step(tiny_schnell, tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    original = trainer.Trainer.optimizer_step

    def interrupted(self):
        if self.step == 2:
            original(self)  # the update of step 3 is applied, then Ctrl+C: it must be rolled back
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "optimizer_step", interrupted)
    settings = tiny_settings(data, tmp_path / "out", tiny_schnell, steps=5)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2: checkpoint .*step_2") as caught:
        train(TrainConfig(**settings))
    assert caught.value.checkpoint == tmp_path / "out" / "checkpoints" / "step_2"
    assert json.loads((caught.value.checkpoint / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    # A new run may not start over a run's checkpoints.
    with pytest.raises(TrainingError, match=r"already holds checkpoints of a run: resume it"):
        train(TrainConfig(**settings))


def test_settings_are_checked():
    base = {"data": "d", "output": "o"}
    for wrong, message in [({"rank": 0}, "rank must be at least 1, got 0"),
                           ({"learning_rate": -1e-4}, "learning rate must be greater than 0, got -0.0001"),
                           ({"steps": 0}, "steps must be at least 1, got 0"),
                           ({"resolution": 100}, "resolution must be a multiple of 64, got 100"),
                           ({"model": "sdxl"}, "unknown model 'sdxl'"),
                           ({"model": "dev-fill"}, "training 'dev-fill' is not supported"),
                           ({"lr_scheduler": "linear"}, "lr_scheduler must be one of constant, cosine"),
                           ({"weighting_scheme": "x"}, "weighting_scheme must be one of"),
                           ({"learning_rate": float("nan")}, "learning rate must be a finite number"),
                           ({"batch_size": 1.5}, "batch size must be an integer")]:
        with pytest.raises(TrainingError, match=message):
            TrainConfig(**base, **wrong)
    config = TrainConfig(**base, validation_prompts=["p"])
    assert TrainConfig.from_json(config.as_json()).as_json() == config.as_json()


def test_lr_schedule_warmup_then_cosine():
    config = TrainConfig(data="d", output="o", steps=10, learning_rate=1.0, lr_warmup_steps=4, lr_scheduler="cosine")
    schedule = trainer.lr_schedule(config)
    values = [schedule(mx.array(s)).item() for s in range(10)]
    assert values[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # torch: step 0 runs at lr * 0 / warmup
    assert values[5] == pytest.approx(0.5 * (1 + np.cos(np.pi / 6)))  # cosine over the 6 steps after warm-up
    constant = trainer.lr_schedule(TrainConfig(data="d", output="o", learning_rate=0.5))
    assert constant(mx.array(7)).item() == 0.5


def test_loss_plot_of_no_and_flat_losses(tmp_path):
    trainer.plot_loss([], tmp_path / "a.png")
    trainer.plot_loss([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}], tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert np.asarray(im).min() < 100  # a line was drawn


def test_gradient_checkpointing_and_freed_encoders(tiny_schnell, tmp_path):
    """Recomputing each block in the backward pass changes no number; the text encoders and the VAE are gone
    once training runs (validation reloads the VAE for its decode only)."""
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    curves = []
    for checkpointing in (False, True):
        out = tmp_path / f"out{checkpointing}"
        run = trainer.Trainer(TrainConfig(**tiny_settings(data, out, tiny_schnell, steps=2,
                                                          gradient_checkpointing=checkpointing)))
        run.run()
        assert run.transformer.grad_checkpoint is checkpointing
        assert run.flux.t5 is None and run.flux.clip is None and run.flux.vae is None
        curves.append(losses(out))
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-6)


def test_qlora_leaves_the_quantized_base_unchanged(tiny_schnell, tmp_path):
    from mlx.utils import tree_flatten

    from flux_1 import quantization
    from flux_1.loading import load_component

    data = write_images(tmp_path / "data", sizes=((64, 64),))
    run = trainer.Trainer(TrainConfig(**tiny_settings(data, tmp_path / "out", tiny_schnell, steps=1, quantize=4,
                                                      learning_rate=1e-2, targets="all")))
    run.run()
    trained = dict(tree_flatten(run.transformer.parameters()))
    fresh = dict(tree_flatten(load_component(tiny_schnell, "transformer", run.flux.dtype,
                                             quantization.parse(4)).parameters()))
    assert any(k.endswith(".scales") for k in fresh)  # the base is quantized
    assert set(fresh) == {k for k in trained if ".lora_" not in k}
    for key, value in fresh.items():
        assert np.array_equal(np.array(trained[key]), np.array(value)), key
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_diffusers_draws_the_same_image_with_the_trained_lora(overfit, tiny_schnell):
    """The PEFT file the overfit run wrote, loaded by diffusers' own `load_lora_weights` into its tiny
    FluxPipeline, draws the image our pipeline draws with it (float32, fixed latents, max 2/255), and the
    LoRA visibly changes that image (so the tolerance cannot hide a dropped or mis-scaled key)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")

    lora, _ = overfit
    prompt, height, width, steps = "a photo of thing 0", 64, 64, 2
    latents = np.random.default_rng(7).standard_normal((1, (height // 16) * (width // 16), 64)).astype(np.float32)

    pipe = diffusers.FluxPipeline.from_pretrained(tiny_schnell)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> np.ndarray:
        with torch.no_grad():
            out = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
                       max_sequence_length=256, latents=torch.from_numpy(latents.copy()), output_type="np").images
        return (np.asarray(out[0]) * 255).round().astype(np.uint8)

    base = theirs()
    pipe.load_lora_weights(str(lora))
    reference = theirs()

    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", lora_paths=[str(lora)])
    image = flux.generate_image(seed=0, prompt=prompt, config=Config(steps, height, width), latents=latents,
                                progress=False)
    ours = np.asarray(image.image)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 2
    assert np.abs(base.astype(int) - reference.astype(int)).max() > 10  # the LoRA changes the image
