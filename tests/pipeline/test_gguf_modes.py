"""GGUF transformers beyond text to image (issue #12): LoRAs on the exact side path, Kontext / Fill / Canny
GGUFs, and the memory of loading a larger Q4_K-heavy GGUF.

References are float32 safetensors models carrying exactly the values the GGUF model computes with: a copy of
the tiny folder whose transformer is a BFL single file of those values. For the mixed file (LoRA tests, with
re-quantized Q6_K/Q3_K/Q2_K layers) they are the GGUF-loaded layers dequantized with their own MLX settings;
for the lossless files (Kontext / Fill / Canny) gguf-py's own dequantization, which those types load to bit
for bit (tests/loading/test_gguf.py). So any difference is the LoRA path or the conditioning, not quantization.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

gguf = pytest.importorskip("gguf")

from flux_1 import Config, Flux1  # noqa: E402
from flux_1 import quantization as q  # noqa: E402
from flux_1.loading import gguf as gg  # noqa: E402
from flux_1.loading import tables  # noqa: E402
from flux_1.lora.layers import LoRALinear  # noqa: E402
from tests.cli.common import write_lora  # noqa: E402
from tests.fixtures import make_tiny_gguf as mk  # noqa: E402
from tests.fixtures.make_tiny_checkpoints import BFL_FILE  # noqa: E402
from tests.pipeline.test_conditioning_modes import config_for, write_inputs  # noqa: E402

HEIGHT, WIDTH, STEPS = 32, 64, 2
PROMPT = "a red fox in the snow at golden hour"
LATENTS = np.random.default_rng(7).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 64)).astype(np.float32)
REPO = Path(__file__).resolve().parents[2]
SHARED = ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler", "model_index.json")
FLOAT_TYPES = {"F32", "F16", "BF16"}


def our_key(gguf_name: str) -> str:
    module, param = tables.split_param(gguf_name)
    return f"{tables.resolve(gg.GGUF_TRANSFORMER, module).target}.{gg.GGUF_TRANSFORMER_RENAMES.get(param, param)}"


def float_values(model) -> dict[str, np.ndarray]:
    """Every parameter of a loaded transformer in our names, float32; quantized layers dequantized with
    their own settings (the values the model computes with)."""
    params = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    out = {}
    for key, value in params.items():
        module, _, param = key.rpartition(".")
        layer = modules.get(module)
        if isinstance(layer, q.QUANTIZED) and param in ("scales", "biases"):
            continue
        if isinstance(layer, q.QUANTIZED) and param == "weight":
            value = mx.dequantize(value, params[f"{module}.scales"], params.get(f"{module}.biases"),
                                  group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        out[key] = np.array(value.astype(mx.float32))
    return out


def float_folder(root, gguf_file, out, variant: str):
    """A copy of the tiny folder (shared parts symlinked) whose transformer is a float32 BFL single file
    holding the values the GGUF-loaded transformer computes with, under the GGUF's (BFL) tensor names."""
    out.mkdir()
    for sub in SHARED:
        if (root / sub).exists():
            os.symlink(root / sub, out / sub)
    values = float_values(gg.load_gguf_component(gguf_file, "transformer", mx.float32))
    names = [t.name for t in gguf.GGUFReader(gguf_file).tensors]
    weights = {n: values[our_key(n)] for n in names}
    assert len(weights) == len(values)  # every parameter, once
    save_file(weights, str(out / BFL_FILE[variant]))
    return out


def pixels(image) -> np.ndarray:
    return np.asarray(image.image).astype(np.int16)


def quantized_arrays(model) -> dict[str, bytes]:
    """The bytes of every quantized layer's codes, scales and biases (the layer wrapped or not)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, q.QUANTIZED) or (isinstance(layer, LoRALinear) and layer.quantized):
            for k in ("weight", "scales", "biases"):
                if k in layer:
                    out[f"{name}.{k}"] = np.array(layer[k]).tobytes()
    return out


# -- LoRAs on a mixed GGUF: quantized layers on the side path ------------------------------------------------


def write_bfl_lora(path, targets: dict[str, tuple[int, int]], seed: int = 5, rank: int = 4, std: float = 0.15):
    """A LoRA in fal's trainer format (PEFT lora_A/lora_B under `base_model.model.` + BFL names) on the given
    BFL modules {name: (out, in)}."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for stem, (out, inp) in sorted(targets.items()):
        tensors[f"base_model.model.{stem}.lora_A.weight"] = (std * rng.standard_normal((rank, inp))).astype(np.float32)
        tensors[f"base_model.model.{stem}.lora_B.weight"] = (std * rng.standard_normal((out, rank))).astype(np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def mixed(tiny_flux, tmp_path_factory):
    root = tiny_flux("schnell")
    out = tmp_path_factory.mktemp("gguf_lora")
    path = out / "flux1-schnell-mixed.gguf"
    mk.write_transformer_gguf(root / BFL_FILE["schnell"], path, "mixed")
    reader = gguf.GGUFReader(path)
    # every quantized linear (all its types) plus two float ones (F16 img_in and txt_in: merged)
    targets, types = {}, {}
    for t in reader.tensors:
        module, param = tables.split_param(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if param == "weight" and len(shape) == 2 and (t.tensor_type.name not in FLOAT_TYPES
                                                      or module in ("img_in", "txt_in")):
            targets[module] = shape
            types[module] = t.tensor_type.name
    quantized = {m: s for m, s in targets.items() if types[m] not in FLOAT_TYPES}
    return {"root": root, "gguf": path, "types": types,
            "lora": write_bfl_lora(out / "all.safetensors", targets),
            "quantized_lora": write_bfl_lora(out / "quantized.safetensors", quantized, seed=6),
            # diffusers/PEFT names: q/k/v split over the fused (quantized) qkv, to_out, proj_mlp (rows of linear1)
            "diffusers_lora": write_lora(out / "diffusers.safetensors", seed=2, std=0.3),
            "float": float_folder(root, path, out / "float", "schnell")}


def generate(flux):
    return flux.generate_image(None, PROMPT, Config(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH),
                               latents=LATENTS, progress=False)


def test_loras_on_a_mixed_gguf_use_the_side_path_and_match_the_merged_float_model(mixed):
    """Two LoRAs (fal/BFL names on every quantized layer + img_in/txt_in; diffusers names with q/k/v split
    over a fused qkv) on the mixed GGUF: quantized layers are wrapped on the side path with their codes,
    scales and biases untouched (after applying and after removing); the image equals the float32 model of
    the same values with both LoRAs merged."""
    assert {"Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q8_0", "Q4_0", "Q5_1", "F16"} <= set(mixed["types"].values())
    loras, scales = [str(mixed["lora"]), str(mixed["diffusers_lora"])], [1.0, 0.8]
    flux = Flux1.from_alias("schnell", path=mixed["root"], transformer_gguf=mixed["gguf"], precision="float32",
                            progress=False, low_memory=False)
    base = pixels(generate(flux))
    before = quantized_arrays(flux.transformer)
    floats = {m: np.array(dict(flux.transformer.named_modules())[m]["weight"]) for m in ("img_in", "txt_in")}
    plan = q.describe(flux.transformer)
    assert len(before) == 3 * len(plan) and q.is_mixed(plan)

    flux.set_loras(loras, scales)
    modules = dict(flux.transformer.named_modules())
    wrapped = {m: modules[our_key(f"{m}.weight").rpartition(".")[0]] for m in mixed["types"]}
    assert all(isinstance(layer, LoRALinear) for layer in wrapped.values())
    for m, layer in wrapped.items():
        if mixed["types"][m] in FLOAT_TYPES:  # full precision: merged (lora_merge, the default)
            assert not layer.quantized and layer._merged and layer._side.a is None, m
        else:  # quantized: the low-rank side path, codes untouched
            assert layer.quantized and not layer._merged and layer._side.a is not None, m
    qkv = modules["double_blocks.0.img_attn.qkv"]  # both LoRAs: fal's fused B and diffusers' q/k/v rows
    assert qkv.quantized and set(qkv._live) == {"all", "diffusers"} and qkv._side.a.shape[0] == 4 + 3 * 4
    assert quantized_arrays(flux.transformer) == before  # bit for bit
    with_lora = generate(flux)
    assert [entry["scale"] for entry in with_lora.metadata()["loras"]] == scales
    lora_pixels = pixels(with_lora)

    # the float32 model of the same values, both LoRAs merged into every layer
    ref = Flux1.from_alias("schnell", path=mixed["float"], lora_paths=loras, lora_scales=scales,
                           precision="float32", progress=False, low_memory=False)
    assert not q.describe(ref.transformer)
    ref_pixels = pixels(generate(ref))
    d = np.abs(lora_pixels - ref_pixels)
    effect = np.abs(lora_pixels - base)
    print(f"\nGGUF + 2 LoRAs (side path) vs float + merged LoRAs: max {d.max()}/255, mean {d.mean():.4f}/255; "
          f"the LoRAs' own effect: mean {effect.mean():.2f}/255, max {effect.max()}/255")
    assert d.max() <= 1 and d.mean() <= 0.05
    assert effect.mean() > 2  # the LoRAs visibly change the image (so the comparison means something)
    # as the CLI does it: LoRAs given at construction, applied when the (low_memory) transformer loads
    cli_like = Flux1.from_alias("schnell", path=mixed["root"], transformer_gguf=mixed["gguf"], lora_paths=loras,
                                lora_scales=scales, precision="float32", progress=False)
    assert np.array_equal(pixels(generate(cli_like)), lora_pixels)
    del cli_like

    flux.set_loras([])
    assert quantized_arrays(flux.transformer) == before
    assert not any(isinstance(m, LoRALinear) for _, m in flux.transformer.named_modules())
    modules = dict(flux.transformer.named_modules())
    drift = max(float(np.abs(np.array(modules[m]["weight"]) - w).max()) for m, w in floats.items())
    after = pixels(generate(flux))
    d_after = np.abs(after - base)
    print(f"after set_loras([]): max {d_after.max()}/255 from the base image (merged float layers unmerged in "
          f"float32: weights off by at most {drift:.2e})")
    # float layers were merged then unmerged (w + d - d in float32): rounding, not exact
    assert d_after.max() <= 1 and drift < 1e-5


@pytest.mark.parametrize("lora,merge", [("quantized_lora", True), ("lora", False)])
def test_removing_a_lora_from_a_gguf_model_gives_the_exact_base_image(mixed, lora, merge):
    """A LoRA on quantized layers only (the default lora_merge: side path there anyway), or any LoRA with
    lora_merge=False: removing it gives back every parameter and the base image bit for bit."""
    flux = Flux1.from_alias("schnell", path=mixed["root"], transformer_gguf=mixed["gguf"], precision="float32",
                            progress=False, low_memory=False, lora_merge=merge)
    base = pixels(generate(flux))
    before = {k: np.array(v).tobytes() for k, v in tree_flatten(flux.transformer.parameters())}
    flux.set_loras([str(mixed[lora])], [0.7])
    changed = pixels(generate(flux))
    assert np.abs(changed - base).mean() > 1
    flux.set_loras([])
    after = {k: np.array(v).tobytes() for k, v in tree_flatten(flux.transformer.parameters())}
    assert after == before
    assert np.array_equal(pixels(generate(flux)), base)


# -- Kontext / Fill / Canny GGUFs --------------------------------------------------------------------------

MODES = {"kontext": "dev-kontext", "fill": "dev-fill", "canny": "dev-canny"}


CLI_INPUTS = {"kontext": ["--image-path", "{image}", "--no-auto-resize"],
              "fill": ["--image-path", "{image}", "--mask-path", "{mask}"],
              "canny": ["--control-image-path", "{control}"]}


@pytest.fixture(scope="module")
def ckpt(tiny_flux):
    return {alias: tiny_flux(alias) for alias in MODES.values()}  # before capsys (sentencepiece needs stderr)


@pytest.mark.parametrize("mode", list(MODES))
def test_conditioning_gguf_matches_the_float_model_of_its_values(mode, ckpt, tmp_path, capsys):
    """A lossless-typed city96-layout GGUF of the variant, run by flux1-generate with --transformer-gguf beside
    the tiny folder, against the float32 BFL file of the same (gguf-py-dequantized) values through the Python
    API, same inputs and seed."""
    from flux_1.cli.main import main
    from flux_1.pipeline.metadata import read_png_metadata
    from tests.cli.common import pixels as png_pixels
    from tests.cli.common import run_main

    alias = MODES[mode]
    root = ckpt[alias]
    path = tmp_path / f"{alias}-Q.gguf"
    types = mk.write_transformer_gguf(root / BFL_FILE[alias], path, "lossless")
    assert {"Q4_K", "Q5_K", "Q8_0", "Q4_0", "Q5_1", "F16"} <= set(types.values())
    # the lossless types load exactly (tests/loading/test_gguf.py): the reference is gguf-py's dequantization
    folder = tmp_path / "float"
    folder.mkdir()
    for sub in SHARED:
        if (root / sub).exists():
            os.symlink(root / sub, folder / sub)
    dequantized = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                   for t in gguf.GGUFReader(path).tensors}
    save_file(dequantized, str(folder / BFL_FILE[alias]))
    from safetensors.numpy import load_file

    original = load_file(str(root / BFL_FILE[alias]))
    w_err = max(float(np.abs(dequantized[k] - original[k]).max()) for k in original)
    assert w_err > 1e-3  # the GGUF's values are not the original's: the comparison below sees the GGUF

    files = write_inputs(tmp_path / "inputs")
    out = tmp_path / "out.png"
    inputs = [a.format(**files) for a in CLI_INPUTS[mode]]
    code, _, err = run_main(main, ["-m", alias, "-p", PROMPT, "--path", str(root), "--transformer-gguf", str(path),
                                   *inputs, "--seed", "1", "--steps", "2", "--precision", "float32", "-o", str(out)],
                            capsys)
    assert code == 0, err
    got = png_pixels(out).astype(np.int16)
    meta = read_png_metadata(out)["flux_1"]
    assert meta["quantization"]["mode"] == "gguf"
    assert meta["quantization"]["gguf"]["transformer"]["types"] == gg.gguf_types(path, "transformer")

    ref = Flux1.from_alias(alias, path=folder, precision="float32", progress=False)
    assert ref.conditioning == {"kontext": "reference", "fill": "fill", "canny": "control"}[mode]
    want = ref.generate_image(1, PROMPT, config_for(mode, files), progress=False)
    d = np.abs(got - pixels(want))
    print(f"\n{mode} GGUF ({len(types)} tensors: {', '.join(sorted(set(types.values())))}) via --transformer-gguf "
          f"vs float32 of its values: max {d.max()}/255, mean {d.mean():.4f}/255")
    assert got.shape == pixels(want).shape
    assert d.max() <= 1 and d.mean() <= 0.05
    assert meta["mode"] == want.metadata()["mode"]


# -- memory: a larger Q4_K GGUF -----------------------------------------------------------------------------


def test_synthetic_shapes_are_the_tiny_bfl_files():
    """The fixture's own name/shape list agrees with the tiny checkpoints' BFL files."""
    from tests.fixtures.make_tiny_checkpoints import transformer_to_bfl, transformer_weights

    for variant, kw in (("schnell", {}), ("dev-fill", {"in_channels": 384, "guidance": True})):
        shapes = mk.bfl_transformer_shapes(**kw)
        bfl = transformer_to_bfl(transformer_weights(variant))
        assert {k: tuple(v.shape) for k, v in bfl.items()} == shapes, variant


RSS_PROBE = """
import sys
import mlx.core as mx
from flux_1 import quantization as q
from flux_1.loading import gguf as gg

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

dtype = getattr(mx, sys.argv[2])
import gguf, numpy  # noqa: imported before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
before = status("VmRSS")
model = gg.load_gguf_component(sys.argv[1], "transformer", dtype)
print(status("VmHWM") - before, status("VmRSS") - before, q.parameter_bytes(model))
"""


def rss_of_a_load(path, dtype: str) -> tuple[int, int, int] | None:
    """(peak RSS growth, RSS growth after, loaded bytes) of loading `path` once in a fresh process, from a
    baseline taken after the imports (Linux only: VmHWM reset through /proc/self/clear_refs)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), dtype], capture_output=True, text=True,
                         env=env, timeout=120)
    if run.returncode != 0:
        if "clear_refs" in run.stderr:
            return None  # not permitted here
        raise AssertionError(run.stderr)
    peak, after, loaded = (int(x) for x in run.stdout.split()[-3:])
    return peak, after, loaded


def test_loading_a_larger_q4k_gguf_peaks_near_its_file_size(tmp_path):
    path = tmp_path / "mid-Q4_K.gguf"
    sizes = dict(hidden=512, heads=4, depth=2, depth_single=2, context_dim=512, vec_dim=256)
    types = mk.write_synthetic_transformer_gguf(path, "q4k", **sizes)
    counts = {k: list(types.values()).count(k) for k in set(types.values())}
    size = path.stat().st_size
    shapes = mk.bfl_transformer_shapes(**sizes)
    float32 = sum(int(np.prod(s)) * 4 for s in shapes.values())
    q4k_values = sum(int(np.prod(shapes[n])) for n, k in types.items() if k == "Q4_K")
    assert q4k_values > 0.9 * float32 / 4  # all but the F16 embedders / final layer and the F32 vectors
    mb = 1 / 2**20
    print(f"\nQ4_K GGUF, hidden 512, 2 double + 2 single blocks ({counts}): file {size * mb:.1f} MiB; "
          f"as float32 {float32 * mb:.1f} MiB, as bfloat16 {float32 / 2 * mb:.1f} MiB")
    for dtype in ("float32", "bfloat16"):
        gg.load_gguf_component(path, "transformer", getattr(mx, dtype))  # warm up kernels and allocator
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = gg.load_gguf_component(path, "transformer", getattr(mx, dtype))
        peak = mx.get_peak_memory() - base
        loaded = q.parameter_bytes(model)
        del model
        rss = rss_of_a_load(path, dtype)
        print(f"  load at {dtype}: loaded {loaded * mb:.1f} MiB, MLX peak {peak * mb:.1f} MiB, process RSS "
              + ("n/a" if rss is None else f"peak growth {rss[0] * mb:.1f} MiB (after: {rss[1] * mb:.1f} MiB)"))
        # scales and biases are held in the compute dtype: 6 bits a value in float32, 5 in bfloat16, vs 4.5
        assert peak < 1.25 * loaded + (1 << 20)
        assert peak < 0.3 * float32  # float32 and bfloat16 sizes: 108 / 54 MiB
        if rss is not None:
            assert rss[2] == loaded
            # a fresh process: the converted model + the mapped file's pages + numpy temporaries and lazily
            # imported code (measured: loaded + file + ~5 MiB)
            assert rss[0] < 1.25 * loaded + size + (16 << 20) and rss[0] < 0.6 * float32
