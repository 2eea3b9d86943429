"""Reference images of a BFL control LoRA on plain FLUX.1-dev, made by diffusers (issue #10).

"A control LoRA on dev gives the same image as diffusers loading the same LoRA into FluxControlPipeline."
``compute_control_lora_reference(workdir)`` writes the tiny dev checkpoint (float32, seed 0, with the BFL
files; ``tests/fixtures/make_tiny_checkpoints.write_tiny_flux``, checked strictly by
``make_reference_outputs.load_and_check``) and the control LoRA file of ``control_lora_file`` (numpy only:
the test writes the very same file), then runs the real diffusers path for plain dev + a Canny/Depth LoRA:

    pipe = FluxControlPipeline.from_pretrained(dev_folder)      # components handed over, checked
    pipe.load_lora_weights(lora_file, adapter_name="control")   # x_embedder 64 -> 128, QK norms replaced
    pipe.set_adapters(["control"], adapter_weights=[scale])     # the LoRA scale (PEFT, unfused)
    pipe(control_image=..., latents=noise, ...)

float32, CPU, one torch thread. ``main()`` saves the arrays as ``tests/reference/control_lora_outputs.npz``.
Run: ``python tests/reference/make_control_lora_reference.py`` (~20 s on 2 CPU cores).

Determinism and the two deviations from stock diffusers
-------------------------------------------------------
* The control image's VAE encoding uses the posterior mean: FluxControlPipeline samples
  (``vae.encode(control_image).latent_dist.sample(generator)``), issue #10 specifies the mean, so
  ``DiagonalGaussianDistribution.sample`` returns ``self.mean`` (``make_conditioning_references._posterior_mean``).
* diffusers' BFL control-LoRA converter (``_convert_bfl_flux_control_lora_to_diffusers``) hard-codes
  FLUX.1's sizes (19 double / 38 single blocks, width 3072); while loading, ``lora_pipeline``'s reference to
  it is replaced by the same source with the tiny checkpoint's sizes (``_tiny_control_converter``).
* The initial noise is the packed ``{case}.noise`` (1, N, 64), passed as ``latents=`` (as our ``latents=``).

The LoRA scale
--------------
diffusers scales every LoRA delta (``lora_B.weight`` and ``lora_B.bias``: PEFT multiplies the LoRA branch
output by the scale) but loads the file's QK-norm weights as they are, whatever the scale. Ours does the
same at any non-zero strength (the model's own norms come back only at strength 0, where diffusers would
still use the file's), so the cases use non-zero scales. ``{case}.fused_max_diff`` records that
``fuse_lora(lora_scale=scale)`` (merged weights) gives the same image as ``set_adapters`` (within 1/255), on
a freshly loaded pipeline: diffusers' ``unfuse_lora`` restores the model's own QK norms although the
adapters stay loaded, so a pipeline once fused and unfused gives another image (33/255 apart here).

Keys (``{case}.{field}``; cases in ``CASES``)
---------------------------------------------
    {case}.prompt / .height / .width / .steps / .guidance / .max_sequence_length / .lora_scale
    {case}.control_image     (h, w, 3) uint8   the control (edge / depth) map, h x w may differ from H x W
    {case}.noise             (1, N, 64) float32
    {case}.output            (H, W, 3) uint8   round(255 x diffusers' [0, 1] image)
    {case}.control_effect    () int32   max |output - output with the control map flipped| (> 8 required)
    {case}.lora_effect       () int32   max |output - output at another scale| (scale 0.5 x, > 8 required)
    {case}.fused_max_diff    () int32   max |output - output with fuse_lora(lora_scale=scale)|
    {case}.transformer_in    () int32   transformer.config.in_channels after loading (128)
    lora_seed                () int32   control_lora_file(seed) the cases use
    lora_digest              () unicode  lora_digest(control_lora_file(lora_seed)): the file's content
    no_lora_error            () unicode  what diffusers' FluxControlPipeline raises on the plain dev
                                         transformer (64 inputs) without the LoRA (type: message)
    versions                 (k,) unicode
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NPZ_PATH = HERE / "control_lora_outputs.npz"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fixtures import make_tiny_checkpoints as tiny  # noqa: E402
from tests.reference.make_conditioning_references import make_depth, make_edges  # noqa: E402

LORA_SEED = 7
LORA_RANK = 4
PROMPT = "a futuristic city at night with neon signs"

# Non-square, two LoRA scales and step counts, an edge map given at another size (resized by both sides).
CASES: dict[str, dict] = {
    "canny.s1": dict(
        height=64, width=96, steps=2, guidance=10.0, lora_scale=1.0, control="edges", control_hw=(64, 96), seed=61
    ),
    "depth.s07": dict(
        height=80, width=48, steps=3, guidance=3.5, lora_scale=0.7, control="depth", control_hw=(100, 60), seed=62
    ),
}

MIN_EFFECT = 8  # uint8 levels: well above the 2/255 parity tolerance


class ReferenceCheckError(AssertionError):
    """diffusers did not load or run the control LoRA as expected."""


# --------------------------------------------------------------------------------------------------------
# The control LoRA file (numpy only: the tests write the same file)
# --------------------------------------------------------------------------------------------------------


def control_lora_file(seed: int = LORA_SEED, rank: int = LORA_RANK) -> dict[str, np.ndarray]:
    """A LoRA in the key format of BFL's FLUX.1-{Canny,Depth}-dev-lora for the tiny dev checkpoint.

    Every key diffusers' converter pops (all linears with ``lora_A`` / ``lora_B`` and ``lora_B.bias``, as BFL's
    ``LinearLora(lora_bias=True)``; the QK ``norm.*.scale`` weights), ``img_in`` taking 2 x 64 inputs. The
    deltas act like extra linears of gain 1 on img_in (so the control latents matter) and 0.3 elsewhere.
    ``final_layer.adaLN_modulation.1``'s ``lora_A`` has equal rank halves: diffusers' converter swaps its rows
    as if they were scale/shift (only ``lora_B``'s are), which equal halves make harmless."""
    rng = np.random.default_rng((seed, 0xC0))
    h, mlp, hd = tiny.FLUX_HIDDEN, tiny.FLUX_MLP, tiny.FLUX_HEAD_DIM
    t: dict[str, np.ndarray] = {}

    def linear(stem: str, out: int, inp: int, gain: float = 0.3):
        t[f"{stem}.lora_A.weight"] = rng.standard_normal((rank, inp)) / np.sqrt(inp)
        t[f"{stem}.lora_B.weight"] = rng.standard_normal((out, rank)) * gain / np.sqrt(rank)
        t[f"{stem}.lora_B.bias"] = rng.standard_normal(out) * 0.05

    linear("img_in", h, 2 * tiny.FLUX_IN_CHANNELS, gain=1.0)
    for stem, out, inp in [
        ("txt_in", h, tiny.T5_D_MODEL), ("time_in.in_layer", h, tiny.FLUX_TIME_FREQ_DIM),
        ("time_in.out_layer", h, h), ("vector_in.in_layer", h, tiny.CLIP_HIDDEN), ("vector_in.out_layer", h, h),
        ("guidance_in.in_layer", h, tiny.FLUX_TIME_FREQ_DIM), ("guidance_in.out_layer", h, h),
        ("final_layer.linear", tiny.FLUX_OUT_CHANNELS, h), ("final_layer.adaLN_modulation.1", 2 * h, h),
    ]:  # fmt: skip
        linear(stem, out, inp)
    a = t["final_layer.adaLN_modulation.1.lora_A.weight"]
    a[rank // 2 :] = a[: rank // 2]

    def norms(prefix: str):
        for n in ("query_norm", "key_norm"):  # sharper attention than the model's own (~1)
            t[f"{prefix}.{n}.scale"] = 2.0 + 0.2 * rng.standard_normal(hd)

    for i in range(tiny.FLUX_DOUBLE):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", mlp, h)
            linear(f"{b}_mlp.2", h, mlp)
            norms(f"{b}_attn.norm")
    for i in range(tiny.FLUX_SINGLE):
        b = f"single_blocks.{i}"
        linear(f"{b}.modulation.lin", 3 * h, h)
        linear(f"{b}.linear1", 3 * h + mlp, h)
        linear(f"{b}.linear2", h, h + mlp)
        norms(f"{b}.norm")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def lora_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sorted names, shapes and float32 bytes: ties the committed reference to the writer."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = np.ascontiguousarray(tensors[k], dtype=np.float32)
        h.update(f"{k}:{v.shape};".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def write_control_lora(folder: Path, seed: int = LORA_SEED, name: str = "control-lora") -> Path:
    from safetensors.numpy import save_file

    path = Path(folder) / f"{name}.safetensors"
    save_file(control_lora_file(seed), str(path))
    return path


def case_inputs(name: str) -> dict[str, np.ndarray]:
    c = CASES[name]
    h, w = c["height"], c["width"]
    make = make_edges if c["control"] == "edges" else make_depth
    return {
        "prompt": np.array(PROMPT),
        "height": np.array(h, np.int32),
        "width": np.array(w, np.int32),
        "steps": np.array(c["steps"], np.int32),
        "guidance": np.array(c["guidance"], np.float32),
        "max_sequence_length": np.array(512, np.int32),
        "lora_scale": np.array(c["lora_scale"], np.float32),
        "control_image": make(*c["control_hw"], seed=c["seed"] + 1000),
        "noise": np.random.default_rng(c["seed"]).standard_normal((1, (h // 16) * (w // 16), 64)).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------------


def _tiny_control_converter():
    """diffusers' `_convert_bfl_flux_control_lora_to_diffusers` with the tiny sizes (nothing else changed)."""
    from diffusers.loaders import lora_conversion_utils as conversion

    src = inspect.getsource(conversion._convert_bfl_flux_control_lora_to_diffusers)
    for old, new in [("num_layers = 19", f"num_layers = {tiny.FLUX_DOUBLE}"),
                     ("num_single_layers = 38", f"num_single_layers = {tiny.FLUX_SINGLE}"),
                     ("inner_dim = 3072", f"inner_dim = {tiny.FLUX_HIDDEN}")]:  # fmt: skip
        if src.count(old) != 1:
            raise ReferenceCheckError(f"diffusers changed: no '{old}' in its BFL control converter")
        src = src.replace(old, new)
    namespace = dict(vars(conversion))
    exec(compile(src, conversion.__file__, "exec"), namespace)  # noqa: S102
    return namespace["_convert_bfl_flux_control_lora_to_diffusers"]


@contextlib.contextmanager
def _tiny_converter_installed():
    from diffusers.loaders import lora_pipeline

    original = lora_pipeline._convert_bfl_flux_control_lora_to_diffusers
    lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = _tiny_control_converter()
    try:
        yield
    finally:
        lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = original


def load_control_pipeline(folder: Path, lora_path: Path | None, models: dict | None = None):
    """FluxControlPipeline.from_pretrained(dev folder) (components checked strictly by `load_and_check`, or
    `models` from it, handed over; the transformer a fresh copy), then
    `load_lora_weights(lora_path, adapter_name="control")` when a LoRA is given."""
    import copy

    import diffusers
    import torch

    from tests.reference.make_reference_outputs import load_and_check

    models = models or load_and_check(folder, "dev")
    pipe = diffusers.FluxControlPipeline.from_pretrained(
        folder, transformer=copy.deepcopy(models["transformer"]), vae=models["vae"], text_encoder=models["clip"],
        text_encoder_2=models["t5"],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        with _tiny_converter_installed():
            pipe.load_lora_weights(str(lora_path), adapter_name="control")
        if pipe.transformer.config.in_channels != 2 * tiny.FLUX_IN_CHANNELS:
            raise ReferenceCheckError(f"in_channels {pipe.transformer.config.in_channels} after the LoRA")
    for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if component.dtype != torch.float32:
            raise ReferenceCheckError(f"{type(component).__name__} is {component.dtype}")
    return pipe


def _pil(array: np.ndarray, folder: Path, stem: str):
    from tests.reference.make_conditioning_references import _pil as pil

    return pil(array, folder, stem)


def run(pipe, x: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    """diffusers' image (H, W, 3) uint8 for the inputs `x` (posterior mean, injected noise)."""
    import torch

    from tests.reference.make_conditioning_references import _posterior_mean

    h, w = int(x["height"]), int(x["width"])
    with _posterior_mean():
        image = pipe(
            prompt=str(x["prompt"]), control_image=_pil(x["control_image"], tmp, "control"),
            latents=torch.from_numpy(x["noise"].copy()), height=h, width=w,
            num_inference_steps=int(x["steps"]), guidance_scale=float(x["guidance"]),
            max_sequence_length=int(x["max_sequence_length"]), output_type="np",
        ).images  # fmt: skip
    image = np.asarray(image, np.float32)[0]
    if image.shape != (h, w, 3):
        raise ReferenceCheckError(f"output {image.shape} != {(h, w, 3)}")
    return (image * 255).round().astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def compute_control_lora_reference(workdir: Path) -> dict[str, np.ndarray]:
    import torch

    from tests.reference.make_reference_outputs import _quiet_libraries

    _quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _compute(Path(workdir))
    finally:
        torch.set_num_threads(threads)


def _compute(workdir: Path) -> dict[str, np.ndarray]:
    import diffusers
    import peft
    import PIL
    import torch
    import transformers

    tmp = workdir / "inputs"
    tmp.mkdir(parents=True, exist_ok=True)
    folder = tiny.write_tiny_flux(workdir / "dev", "dev", "float32", seed=0, bfl=True)
    lora_path = write_control_lora(workdir)
    ref: dict[str, np.ndarray] = {
        "lora_seed": np.array(LORA_SEED, np.int32),
        "lora_digest": np.array(lora_digest(control_lora_file(LORA_SEED))),
    }

    from tests.reference.make_reference_outputs import load_and_check

    models = load_and_check(folder, "dev")
    # Without the LoRA diffusers cannot run a control image through plain dev (64 inputs).
    plain = load_control_pipeline(folder, None, models)
    try:
        run(plain, case_inputs(next(iter(CASES))), tmp)
    except Exception as e:  # noqa: BLE001  (recorded: what diffusers does)
        ref["no_lora_error"] = np.array(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        raise ReferenceCheckError("FluxControlPipeline ran plain dev with a control image and no LoRA")
    del plain

    pipe = load_control_pipeline(folder, lora_path, models)
    for name, c in CASES.items():
        x = case_inputs(name)
        pipe.set_adapters(["control"], adapter_weights=[c["lora_scale"]])
        out = run(pipe, x, tmp)
        flipped = np.ascontiguousarray(x["control_image"][::-1, ::-1])
        control_effect = _max_diff(run(pipe, {**x, "control_image": flipped}, tmp), out)
        pipe.set_adapters(["control"], adapter_weights=[0.5 * c["lora_scale"]])
        lora_effect = _max_diff(run(pipe, x, tmp), out)
        # Merged weights on a pipeline of its own: diffusers' unfuse_lora puts the model's own QK norms back
        # while the adapters stay loaded, so a pipeline that was fused once no longer gives this image.
        fused_pipe = load_control_pipeline(folder, lora_path, models)
        fused_pipe.fuse_lora(lora_scale=c["lora_scale"])
        fused = _max_diff(run(fused_pipe, x, tmp), out)
        del fused_pipe
        print(f"{name}: control effect {control_effect}/255, lora-scale effect {lora_effect}/255, "
              f"fused vs unfused {fused}/255", file=sys.stderr)  # fmt: skip
        if min(control_effect, lora_effect) <= MIN_EFFECT:
            raise ReferenceCheckError(f"{name}: effects {control_effect}, {lora_effect} <= {MIN_EFFECT}")
        if fused > 1:
            raise ReferenceCheckError(f"{name}: fuse_lora(lora_scale) differs from set_adapters by {fused}")
        for k, v in x.items():
            ref[f"{name}.{k}"] = v
        ref[f"{name}.output"] = out
        ref[f"{name}.control_effect"] = np.array(control_effect, np.int32)
        ref[f"{name}.lora_effect"] = np.array(lora_effect, np.int32)
        ref[f"{name}.fused_max_diff"] = np.array(fused, np.int32)
        ref[f"{name}.transformer_in"] = np.array(pipe.transformer.config.in_channels, np.int32)
    ref["versions"] = np.array([
        f"python {sys.version.split()[0]}", f"numpy {np.__version__}", f"torch {torch.__version__}",
        f"diffusers {diffusers.__version__}", f"transformers {transformers.__version__}",
        f"peft {peft.__version__}", f"pillow {PIL.__version__}",
    ])  # fmt: skip
    return ref


def main() -> None:
    from tests.reference.make_reference_outputs import write_reference

    write_reference(NPZ_PATH, compute_control_lora_reference, "flux1-tiny-control-lora-")


if __name__ == "__main__":
    main()
