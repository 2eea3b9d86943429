"""Reference outputs of diffusers / transformers on the tiny FLUX.1 fixtures (torch, CPU, float32).

``compute_reference(workdir)`` writes the tiny schnell and dev checkpoints (float32, with the BFL single
files) into ``workdir``, proves that diffusers / transformers load them with zero missing / unexpected /
mismatched keys and exactly the stored values, proves that diffusers' own BFL converters turn the BFL files
into exactly the diffusers weights, and returns a dict of seeded inputs and outputs. ``main()`` saves it as
``tests/reference/reference_outputs.npz`` (compressed). Every float array is float32, every id array int32.

Keys ("{v}" is "schnell" or "dev"; sizes are image pixels H x W):

Component inputs / outputs
    prompts                              (P,) unicode   prompts of the text-encoder tests
    t5.input_ids                         (P, 32)        tokenizer_2(padding="max_length", max_length=32,
                                                        truncation=True); pads 0, ends with </s>=1
    t5.last_hidden_state                 (P, 32, 32)    T5EncoderModel(input_ids), no attention mask
                                                        (as FluxPipeline)
    clip.input_ids                       (P, 77)        tokenizer(padding="max_length", max_length=77,
                                                        truncation=True); BOS, ..., EOS, padded with EOS
    clip.last_hidden_state               (P, 77, 64)
    clip.pooler_output                   (P, 64)        final-LN hidden state at argmax(input_ids)
                                                        (the first EOS)
    transformer.{v}.{H}x{W}.hidden_states          (1, N, 64)  packed latents, N = (H/16)*(W/16)
    transformer.{v}.{H}x{W}.encoder_hidden_states  (1, L, 32)
    transformer.{v}.{H}x{W}.pooled_projections     (1, 64)
    transformer.{v}.{H}x{W}.timestep               (1,)  0.75 (in [0, 1]: the pipeline passes t / 1000)
    transformer.{v}.{H}x{W}.guidance               (1,)  3.5 (dev only; the model multiplies by 1000 itself)
    transformer.{v}.{H}x{W}.img_ids                (N, 3) float32: (0, row, col) over the (H/16, W/16) grid
    transformer.{v}.{H}x{W}.txt_ids                (L, 3) zeros
    transformer.{v}.{H}x{W}.output                 (1, N, 64)
    vae.decode.latents                   (1, 16, 6, 10) NCHW, the z given to AutoencoderKL.decode (already
                                                        un-scaled: FluxPipeline passes x / 0.3611 + 0.1159)
    vae.decode.sample                    (1, 3, 48, 80) NCHW, unclamped decoder output (about [-1, 1])
    vae.encode.image                     (1, 3, 40, 56) NCHW, uniform in [-1, 1]
    vae.encode.mean / .logvar / .std     (1, 16, 5, 7)  NCHW, latent_dist (logvar clamped to [-30, 20])

Schedules (FluxPipeline: sigmas = linspace(1, 1/steps, steps), mu = calculate_shift(N), retrieve_timesteps)
    schedule.{v}.{H}x{W}x{steps}.timesteps  (steps,)    scheduler.timesteps (sigma * 1000)
    schedule.{v}.{H}x{W}x{steps}.sigmas     (steps+1,)  scheduler.sigmas (ends with 0)
    schedule.{v}.{H}x{W}x{steps}.mu         ()          the shift mu (only used by dev: use_dynamic_shifting)

Whole pipeline (FluxPipeline.from_pretrained(fixture), float32, CPU, fixed packed latents)
    pipeline.{v}.prompt                  () unicode
    pipeline.{v}.height / .width / .steps / .max_sequence_length   () int32
    pipeline.{v}.guidance_scale          () float32
    pipeline.{v}.latents                 (1, N, 64)     packed initial noise (seeded numpy RNG)
    pipeline.{v}.t5_input_ids            (1, max_sequence_length)
    pipeline.{v}.clip_input_ids          (1, 77)
    pipeline.{v}.prompt_embeds           (1, max_sequence_length, 32)
    pipeline.{v}.pooled_prompt_embeds    (1, 64)
    pipeline.{v}.text_ids                (max_sequence_length, 3)
    pipeline.{v}.latent_image_ids        (N, 3)
    pipeline.{v}.timesteps / .sigmas     (steps,) / (steps+1,)
    pipeline.{v}.latents_per_step        (steps, 1, N, 64)  packed latents after each Euler step
    pipeline.{v}.image                   (1, H, W, 3)   float32 in [0, 1] (output_type="np"), NHWC
    pipeline.{v}.image_uint8             (1, H, W, 3)   uint8, round(image * 255) as diffusers' numpy_to_pil

    versions                             (k,) unicode   "name version" of the libraries used

Run: ``python tests/reference/make_reference_outputs.py`` (about 15 s on 2 CPU cores).
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NPZ_PATH = HERE / "reference_outputs.npz"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fixtures import make_tiny_checkpoints as tiny  # noqa: E402

COMPONENT_PROMPTS = [
    "a photograph of a cat sitting on a wooden table",
    "Café crème brûlée, 東京の夜",
    "",
    "A very long prompt about a medieval castle on a hill with a river winding below, children playing "
    "football on a sandy beach at golden hour, and a hot air balloon floating above a valley at dawn",
]
T5_COMPONENT_MAX_LENGTH = 32

# (H, W) in pixels and text length L of the transformer component tests.
TRANSFORMER_CASES = [((48, 80), 12), ((112, 64), 20)]
TRANSFORMER_TIMESTEP = 0.75
DEV_GUIDANCE = 3.5

VAE_DECODE_LATENT_HW = (6, 10)
VAE_ENCODE_IMAGE_HW = (40, 56)

SCHEDULE_CASES = [(1024, 1024, 4), (512, 768, 28), (256, 256, 1), (1360, 768, 50), (64, 96, 2)]

PIPELINE_CASES = {
    "schnell": dict(
        prompt="Café crème brûlée, 東京の夜",
        height=64,
        width=96,
        steps=2,
        guidance_scale=0.0,
        max_sequence_length=256,
        seed=11,
    ),
    "dev": dict(
        prompt="a photograph of a red fox in the snow at golden hour",
        height=80,
        width=48,
        steps=3,
        guidance_scale=DEV_GUIDANCE,
        max_sequence_length=512,
        seed=12,
    ),
}


class ReferenceCheckError(AssertionError):
    """A fixture failed to load cleanly, or a converter disagreed with the stored weights."""


def _check_loading_info(what: str, info: dict) -> None:
    bad = {k: v for k, v in info.items() if isinstance(v, (list, set, tuple, dict)) and len(v) > 0}
    if bad:
        raise ReferenceCheckError(f"{what}: loading reported problems: {bad}")


def _check_state_equal(what: str, ours: dict, theirs: dict) -> None:
    """Exact equality of two {name: tensor} dicts (same keys, shapes, values)."""
    import torch

    if set(ours) != set(theirs):
        raise ReferenceCheckError(
            f"{what}: key sets differ; only in ours {sorted(set(ours) - set(theirs))[:10]}, "
            f"only in theirs {sorted(set(theirs) - set(ours))[:10]}"
        )
    for k in ours:
        a, b = ours[k], theirs[k]
        if tuple(a.shape) != tuple(b.shape) or not torch.equal(a.float(), b.float()):
            raise ReferenceCheckError(f"{what}: tensor {k} differs ({tuple(a.shape)} vs {tuple(b.shape)})")


def _load_files(paths) -> dict:
    from safetensors.torch import load_file

    out = {}
    for p in paths:
        out.update(load_file(str(p)))
    return out


def _patched_flux_converter(hidden: int):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers with its hard-coded `inner_dim = 3072`
    (FLUX.1's width) replaced by the tiny width; everything else is diffusers' own code."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if src.count("inner_dim = 3072") != 1 or src.count("mlp_ratio = 4.0") != 1:
        raise ReferenceCheckError("diffusers' flux converter changed: cannot patch inner_dim")
    src = src.replace("inner_dim = 3072", f"inner_dim = {hidden}")
    namespace = dict(vars(sfu))
    exec(compile(src, sfu.__file__, "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def load_and_check(folder: Path, variant: str) -> dict:
    """Load every component of a fixture folder strictly; check the BFL files convert to the same weights."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, T5EncoderModel

    # diffusers loads float32 by default (its dtype argument was renamed across versions, so none is passed);
    # transformers 5 would follow config.json's torch_dtype, so it is told explicitly.
    f32 = torch.float32
    transformer, info = FluxTransformer2DModel.from_pretrained(
        folder, subfolder="transformer", output_loading_info=True
    )
    _check_loading_info(f"{variant} transformer", info)
    vae, info = AutoencoderKL.from_pretrained(folder, subfolder="vae", output_loading_info=True)
    _check_loading_info(f"{variant} vae", info)
    clip, info = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", dtype=f32, output_loading_info=True
    )
    _check_loading_info(f"{variant} text_encoder", info)
    t5, info = T5EncoderModel.from_pretrained(
        folder, subfolder="text_encoder_2", dtype=f32, output_loading_info=True
    )
    _check_loading_info(f"{variant} text_encoder_2", info)
    for m in (transformer, vae, clip, t5):
        m.eval()
        if m.dtype != f32:
            raise ReferenceCheckError(f"{variant} {type(m).__name__} loaded as {m.dtype}, not float32")

    # The loaded parameters are exactly the stored tensors.
    tr_files = _load_files(sorted((folder / "transformer").glob("*.safetensors")))
    _check_state_equal(f"{variant} transformer", tr_files, transformer.state_dict())
    vae_file = _load_files([folder / "vae" / "diffusion_pytorch_model.safetensors"])
    _check_state_equal(f"{variant} vae", vae_file, vae.state_dict())
    clip_file = _load_files([folder / "text_encoder" / "model.safetensors"])
    clip_state = clip.state_dict()
    prefixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip_state.items()}
    _check_state_equal(f"{variant} text_encoder", clip_file, prefixed)
    t5_file = _load_files(sorted((folder / "text_encoder_2").glob("*.safetensors")))
    t5_state = dict(t5.state_dict())
    if not torch.equal(t5_state.pop("encoder.embed_tokens.weight"), t5_file["shared.weight"]):
        raise ReferenceCheckError(f"{variant} text_encoder_2: encoder.embed_tokens is not tied to shared")
    _check_state_equal(f"{variant} text_encoder_2", t5_file, t5_state)

    # diffusers' own converters map the BFL files onto exactly the diffusers weights.
    convert = _patched_flux_converter(
        transformer.config.num_attention_heads * transformer.config.attention_head_dim
    )
    bfl_name = tiny.BFL_FILE[variant]  # flux1-dev.safetensors, flux1-fill-dev.safetensors, ...
    bfl = _load_files([folder / bfl_name])
    _check_state_equal(f"{variant} {bfl_name} -> diffusers", convert(dict(bfl)), tr_files)
    ae = _load_files([folder / "ae.safetensors"])
    converted = sfu.convert_ldm_vae_checkpoint(dict(ae), dict(vae.config))
    _check_state_equal(f"{variant} ae.safetensors -> diffusers", converted, vae_file)
    return dict(transformer=transformer, vae=vae, clip=clip, t5=t5)


def _img_ids(height: int, width: int):
    """FluxPipeline's latent image ids for an image of height x width pixels."""
    import torch
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 16, width // 16, "cpu", torch.float32)


def _quiet_libraries() -> None:
    """Silence progress bars and info / deprecation chatter of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def compute_reference(workdir: Path) -> dict[str, np.ndarray]:
    """Write the tiny fixtures into `workdir`, check them against diffusers / transformers, return the
    reference arrays (see the module docstring for the keys)."""
    import torch

    _quiet_libraries()

    workdir = Path(workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: one thread is ~20x faster than two on a 2-core machine
    try:
        return _compute_reference(workdir)
    finally:
        torch.set_num_threads(threads)


def _compute_reference(workdir: Path) -> dict[str, np.ndarray]:
    import diffusers
    import safetensors
    import sentencepiece
    import tokenizers
    import torch
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from transformers import CLIPTokenizer, T5TokenizerFast

    folders = {v: tiny.write_tiny_flux(workdir / v, v, "float32", seed=0, bfl=True) for v in tiny.VARIANTS}
    models = {v: load_and_check(folders[v], v) for v in tiny.VARIANTS}

    ref: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(1234)

    def f32(x) -> np.ndarray:
        return np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)

    def i32(x) -> np.ndarray:
        return np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.int32)

    with torch.no_grad():
        # Text encoders (identical weights in both variants; use schnell's).
        folder, m = folders["schnell"], models["schnell"]
        t5_tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
        clip_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        ref["prompts"] = np.array(COMPONENT_PROMPTS)
        ids = t5_tok(
            COMPONENT_PROMPTS,
            padding="max_length",
            max_length=T5_COMPONENT_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        ref["t5.input_ids"] = i32(ids)
        ref["t5.last_hidden_state"] = f32(m["t5"](ids).last_hidden_state)
        ids = clip_tok(
            COMPONENT_PROMPTS,
            padding="max_length",
            max_length=clip_tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = m["clip"](ids, output_hidden_states=False)
        ref["clip.input_ids"] = i32(ids)
        ref["clip.last_hidden_state"] = f32(out.last_hidden_state)
        ref["clip.pooler_output"] = f32(out.pooler_output)

        # Transformer (same seeded inputs for both variants, different weights).
        for (height, width), text_len in TRANSFORMER_CASES:
            n = (height // 16) * (width // 16)
            inputs = dict(
                hidden_states=rng.standard_normal((1, n, 64)).astype(np.float32),
                encoder_hidden_states=rng.standard_normal((1, text_len, tiny.T5_D_MODEL)).astype(np.float32),
                pooled_projections=rng.standard_normal((1, tiny.CLIP_HIDDEN)).astype(np.float32),
                timestep=np.array([TRANSFORMER_TIMESTEP], np.float32),
                img_ids=f32(_img_ids(height, width)),
                txt_ids=np.zeros((text_len, 3), np.float32),
            )
            for v in tiny.VARIANTS:
                key = f"transformer.{v}.{height}x{width}"
                args = {k: torch.from_numpy(x) for k, x in inputs.items()}
                if v == "dev":
                    args["guidance"] = torch.tensor([DEV_GUIDANCE], dtype=torch.float32)
                    ref[f"{key}.guidance"] = np.array([DEV_GUIDANCE], np.float32)
                for k, x in inputs.items():
                    ref[f"{key}.{k}"] = x
                ref[f"{key}.output"] = f32(models[v]["transformer"](**args, return_dict=False)[0])

        # VAE (identical in both variants).
        vae = models["schnell"]["vae"]
        z = rng.standard_normal((1, tiny.VAE_LATENT_CHANNELS, *VAE_DECODE_LATENT_HW)).astype(np.float32)
        ref["vae.decode.latents"] = z
        ref["vae.decode.sample"] = f32(vae.decode(torch.from_numpy(z), return_dict=False)[0])
        img = rng.uniform(-1.0, 1.0, (1, 3, *VAE_ENCODE_IMAGE_HW)).astype(np.float32)
        dist = vae.encode(torch.from_numpy(img)).latent_dist
        ref["vae.encode.image"] = img
        ref["vae.encode.mean"] = f32(dist.mean)
        ref["vae.encode.logvar"] = f32(dist.logvar)
        ref["vae.encode.std"] = f32(dist.std)

        # Schedules, computed the FluxPipeline way.
        for v in tiny.VARIANTS:
            for height, width, steps in SCHEDULE_CASES:
                sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folders[v], subfolder="scheduler")
                sigmas = np.linspace(1.0, 1 / steps, steps)
                mu = calculate_shift(
                    (height // 16) * (width // 16),
                    sched.config.get("base_image_seq_len", 256),
                    sched.config.get("max_image_seq_len", 4096),
                    sched.config.get("base_shift", 0.5),
                    sched.config.get("max_shift", 1.15),
                )
                timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
                key = f"schedule.{v}.{height}x{width}x{steps}"
                ref[f"{key}.timesteps"] = f32(timesteps)
                ref[f"{key}.sigmas"] = f32(sched.sigmas)
                ref[f"{key}.mu"] = np.array(mu, np.float32)

        # Whole pipeline.
        for v, case in PIPELINE_CASES.items():
            pipe = FluxPipeline.from_pretrained(folders[v])
            for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                if component.dtype != torch.float32:
                    raise ReferenceCheckError(
                        f"pipeline {v}: {type(component).__name__} is {component.dtype}"
                    )
            pipe.set_progress_bar_config(disable=True)
            height, width, steps, msl = (
                case["height"],
                case["width"],
                case["steps"],
                case["max_sequence_length"],
            )
            n = (height // 16) * (width // 16)
            latents = np.random.default_rng(case["seed"]).standard_normal((1, n, 64)).astype(np.float32)
            key = f"pipeline.{v}"
            ref[f"{key}.prompt"] = np.array(case["prompt"])
            ref[f"{key}.height"] = np.array(height, np.int32)
            ref[f"{key}.width"] = np.array(width, np.int32)
            ref[f"{key}.steps"] = np.array(steps, np.int32)
            ref[f"{key}.max_sequence_length"] = np.array(msl, np.int32)
            ref[f"{key}.guidance_scale"] = np.array(case["guidance_scale"], np.float32)
            ref[f"{key}.latents"] = latents
            ref[f"{key}.t5_input_ids"] = i32(
                pipe.tokenizer_2(
                    [case["prompt"]],
                    padding="max_length",
                    max_length=msl,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
            ref[f"{key}.clip_input_ids"] = i32(
                pipe.tokenizer(
                    [case["prompt"]],
                    padding="max_length",
                    max_length=pipe.tokenizer_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=case["prompt"], prompt_2=None, device="cpu", max_sequence_length=msl
            )
            ref[f"{key}.prompt_embeds"] = f32(prompt_embeds)
            ref[f"{key}.pooled_prompt_embeds"] = f32(pooled)
            ref[f"{key}.text_ids"] = f32(text_ids)
            ref[f"{key}.latent_image_ids"] = f32(_img_ids(height, width))

            per_step: list[np.ndarray] = []

            def on_step_end(pipeline, i, t, kwargs, per_step=per_step):
                per_step.append(f32(kwargs["latents"]))
                return {}

            image = pipe(
                prompt=case["prompt"],
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=case["guidance_scale"],
                max_sequence_length=msl,
                latents=torch.from_numpy(latents.copy()),
                output_type="np",
                callback_on_step_end=on_step_end,
            ).images
            ref[f"{key}.timesteps"] = f32(pipe.scheduler.timesteps)
            ref[f"{key}.sigmas"] = f32(pipe.scheduler.sigmas)
            ref[f"{key}.latents_per_step"] = np.stack(per_step)
            ref[f"{key}.image"] = np.asarray(image, np.float32)
            ref[f"{key}.image_uint8"] = (np.asarray(image) * 255).round().astype(np.uint8)

    ref["versions"] = np.array(
        [
            f"python {sys.version.split()[0]}",
            f"numpy {np.__version__}",
            f"torch {torch.__version__}",
            f"diffusers {diffusers.__version__}",
            f"transformers {transformers.__version__}",
            f"tokenizers {tokenizers.__version__}",
            f"sentencepiece {sentencepiece.__version__}",
            f"safetensors {safetensors.__version__}",
        ]
    )
    return ref


def compare_references(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 1e-5) -> list[str]:
    """Differences between two reference dicts (keys, shapes, dtypes, relative error of floats; `versions`
    is ignored). Returns human-readable problems; empty when they agree."""
    problems = []
    keys_a, keys_b = set(a) - {"versions"}, set(b) - {"versions"}
    if keys_a != keys_b:
        problems.append(
            f"keys differ: only in first {sorted(keys_a - keys_b)}, only in second {sorted(keys_b - keys_a)}"
        )
    for k in sorted(keys_a & keys_b):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{k}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
        elif x.dtype.kind == "f":
            err = float(
                np.linalg.norm((x - y).astype(np.float64)) / max(np.linalg.norm(y.astype(np.float64)), 1e-30)
            )
            if err > rtol:
                problems.append(f"{k}: relative error {err:.3g} > {rtol}")
        elif x.dtype == np.uint8:
            if np.abs(x.astype(np.int16) - y.astype(np.int16)).max(initial=0) > 1:
                problems.append(f"{k}: uint8 values differ by more than 1")
        elif k.endswith(("_effect", "max_diff")) and x.dtype.kind in "iu":
            # Max pixel differences between two images, each of which may round 1 level apart (torch's
            # threading changes the last float bit): allowed to move by 2 levels.
            if np.abs(x.astype(np.int64) - y.astype(np.int64)).max(initial=0) > 2:
                problems.append(f"{k}: differs by more than 2 levels")
        elif not np.array_equal(x, y):
            problems.append(f"{k}: values differ")
    return problems


def write_reference(npz_path: Path, compute, prefix: str) -> None:
    """Run `compute(workdir)` in a temporary folder and write its arrays to `npz_path` (every reference
    script's main)."""
    import time

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        ref = compute(Path(tmp))
    np.savez_compressed(npz_path, **ref)
    print(f"wrote {npz_path} ({npz_path.stat().st_size / 1024:.0f} KiB, {len(ref)} arrays) "
          f"in {time.perf_counter() - start:.1f} s")


def main() -> None:
    write_reference(NPZ_PATH, compute_reference, "flux1-tiny-")


if __name__ == "__main__":
    main()
