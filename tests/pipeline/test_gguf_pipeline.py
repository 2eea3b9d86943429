"""The whole tiny pipeline with a GGUF transformer (city96 layout, mixed types incl. K-quants) against
diffusers' FluxPipeline running gguf-py's dequantization of the same file (written into a diffusers-layout
copy of the tiny folder), fixed initial latents, float32."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.numpy import save_file  # noqa: E402

from flux_1 import Config, Flux1  # noqa: E402
from flux_1.loading import gguf as gg  # noqa: E402
from flux_1.loading import tables  # noqa: E402
from tests.fixtures import make_tiny_gguf as mk  # noqa: E402

HEIGHT, WIDTH, STEPS = 32, 64, 2
PROMPT = "a red fox in the snow at golden hour"
LATENTS = np.random.default_rng(7).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 64)).astype(np.float32)


def diffusers_folder(root, gguf_file, out):
    """A copy of the tiny folder whose transformer/ holds gguf-py's dequantized weights, diffusers names."""
    from bench.weights import to_diffusers_transformer

    shutil.copytree(root, out, ignore=shutil.ignore_patterns("flux1-*"))
    for f in (out / "transformer").glob("*.safetensors*"):
        f.unlink()
    ours = {}
    for t in gguf.GGUFReader(gguf_file).tensors:
        module, param = tables.split_param(t.name)
        key = f"{tables.resolve(gg.GGUF_TRANSFORMER, module).target}.{gg.GGUF_TRANSFORMER_RENAMES.get(param, param)}"
        ours[key] = mx.array(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    weights = {k: np.array(v) for k, v in to_diffusers_transformer(ours).items()}
    save_file(weights, str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    return out


def diffusers_image(folder) -> np.ndarray:
    from diffusers import FluxPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = FluxPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=0.0,
                          max_sequence_length=256, latents=torch.from_numpy(LATENTS.copy()), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    return (np.asarray(images[0]) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def made(tiny_flux, tmp_path_factory):
    root = tiny_flux("schnell")
    out = tmp_path_factory.mktemp("gguf_pipe")
    files = {"root": root}
    for profile in ("lossless", "mixed"):
        files[profile] = out / f"{profile}.gguf"
        mk.write_transformer_gguf(root / "flux1-schnell.safetensors", files[profile], profile)
    return files


def ours(root, gguf_file, **kw):
    flux = Flux1.from_alias("schnell", path=root, transformer_gguf=gguf_file, precision="float32", progress=False,
                            **kw)
    return flux.generate_image(None, PROMPT, Config(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH),
                               latents=LATENTS, progress=False)


@pytest.mark.parametrize("profile,max_diff,mean_diff", [("lossless", 1, 0.05), ("mixed", 2, 0.2)])
def test_pipeline_matches_diffusers_on_the_dequantized_gguf(made, tmp_path, profile, max_diff, mean_diff):
    ref = diffusers_image(diffusers_folder(made["root"], made[profile], tmp_path / "diffusers"))
    image = ours(made["root"], made[profile])
    got = np.asarray(image.image)
    diff = np.abs(got.astype(int) - ref.astype(int))
    print(f"\n{profile}: max {diff.max()}/255, mean {diff.mean():.3f}/255")
    assert diff.max() <= max_diff and diff.mean() <= mean_diff
    meta = image.metadata()["quantization"]
    assert meta["mode"] == "gguf"
    assert meta["gguf"]["transformer"]["types"] == gg.gguf_types(made[profile], "transformer")
    assert sum(meta["gguf"]["transformer"]["mlx"].values()) == 26 - (4 if profile == "mixed" else 0)


def test_folder_holding_a_gguf_and_fill_in_channels(made, tiny_flux, tmp_path):
    """--path DIR with the GGUF at the root; a Fill GGUF's 384 input channels come from its shapes."""
    import os

    root = tiny_flux("dev-fill")
    folder = tmp_path / "fill"
    folder.mkdir()
    for sub in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        if (root / sub).exists():
            os.symlink(root / sub, folder / sub)
    mk.write_transformer_gguf(root / "flux1-fill-dev.safetensors", folder / "flux1-fill-dev-Q4_K_S.gguf", "mixed")
    flux = Flux1.from_alias("dev-fill", path=folder, precision="float32", progress=False)
    assert set(flux.gguf_files) == {"transformer"}
    assert flux.input_channels == 384 and flux.is_guidance_distilled
    with pytest.raises(ValueError, match="384 input channels"):
        Flux1.from_alias("dev", path=folder, precision="float32", progress=False)
