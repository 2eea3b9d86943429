"""The whole tiny pipeline with a LoRA of each format == diffusers with the delta merged by hand.

For every format a LoRA file is written with the format's real key names for the tiny model. Ours:
`Flux1.from_alias(..., lora_paths=[file], lora_scales=[0.7])`, fixed packed latents, a non-square
image, 2 steps, float32. Ground truth: diffusers' `FluxPipeline` on the same tiny folder, with the
delta added by hand to the torch weights of `pipe.transformer` / `pipe.text_encoder`, computed here
plainly from the format's own arithmetic (delta W = strength * scale * up @ down, the format's scale
rule, fused rows split onto to_q / to_k / to_v / proj_mlp, BFL's final adaLN (shift | scale) swapped
into diffusers' (scale | shift)). diffusers' own LoRA loader needs peft, and would only check us
against another converter; this is independent of `flux_1.lora` and `flux_1.loading.tables`.

Each test asserts: ours == the hand-merged reference within 2/255 per pixel; the LoRA changes the
reference image by clearly more than that; and, for the rule that test is about (scale, swap,
split, component), the reference merged by the *wrong* rule is visibly different from ours, so the
tolerance cannot hide it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.fixtures import make_tiny_checkpoints as tiny

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flux_1 import Config, Flux1  # noqa: E402

H, MLP, IN, TXT, TIME = (
    tiny.FLUX_HIDDEN,
    tiny.FLUX_MLP,
    tiny.FLUX_IN_CHANNELS,
    tiny.T5_D_MODEL,
    tiny.FLUX_TIME_FREQ_DIM,
)
CLIP, CLIP_MLP = tiny.CLIP_HIDDEN, tiny.CLIP_INTERMEDIATE
HEIGHT, WIDTH, STEPS = 32, 64, 2  # non-square: 2 x 4 latent tokens
PROMPT = "a red fox in the snow at golden hour"
STRENGTH = 0.7
TOL = 2  # ours vs the hand-merged reference, uint8 levels
MIN_EFFECT = 10  # the LoRA (and each wrong rule) must move some pixel by at least this much
MAX_SEQ = {"schnell": 256, "dev": 512}
GUIDANCE = {"schnell": 0.0, "dev": 3.5}
LATENTS = np.random.default_rng(5).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 64)).astype(np.float32)

RESULTS: dict[str, dict] = {}  # test id -> measured numbers (printed with -s)


# ---------------------------------------------------------------------------------------------
# The hand merge: deltas on diffusers' parameters, BFL names mapped by the table of the reference
# notes (lora-and-gguf-formats.md section 0), written out here on purpose


def swap(x: np.ndarray) -> np.ndarray:
    """(a | b) -> (b | a) along the rows: BFL's final adaLN is shift | scale, diffusers' scale | shift."""
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]])


BFL_RENAMES = [
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"img_in", "x_embedder"),
    (r"txt_in", "context_embedder"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
]


class Merge:
    """Hand-computed changes (float64) of the diffusers pipeline's parameters, by (component, name)."""

    def __init__(self):
        self.deltas: dict[tuple[str, str], np.ndarray] = {}

    def add(self, component: str, param: str, delta) -> Merge:
        key = (component, param)
        self.deltas[key] = self.deltas.get(key, 0.0) + np.asarray(delta, np.float64)
        return self

    def diffusers(self, module: str, dw=None, db=None) -> Merge:
        """A delta on one of diffusers' FluxTransformer2DModel modules, in its own row order."""
        if dw is not None:
            self.add("transformer", f"{module}.weight", dw)
        if db is not None:
            self.add("transformer", f"{module}.bias", db)
        return self

    def clip(self, module: str, dw) -> Merge:
        """A delta on a CLIP module, named as transformers 4 did (`text_model.encoder...`)."""
        return self.add("text_encoder", f"{module}.weight", dw)

    def bfl(self, module: str, dw=None, db=None, swap_final: bool = True) -> Merge:
        """A delta on a BFL-named module, in BFL row order: fused rows split, final adaLN swapped."""
        if m := re.fullmatch(r"double_blocks\.(\d+)\.img_attn\.qkv", module):
            parts = [(f"transformer_blocks.{m[1]}.attn.to_{p}", H) for p in "qkv"]
        elif m := re.fullmatch(r"double_blocks\.(\d+)\.txt_attn\.qkv", module):
            parts = [(f"transformer_blocks.{m[1]}.attn.add_{p}_proj", H) for p in "qkv"]
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.linear1", module):
            b = f"single_transformer_blocks.{m[1]}"
            parts = [(f"{b}.attn.to_{p}", H) for p in "qkv"] + [(f"{b}.proj_mlp", MLP)]
        elif module == "final_layer.adaLN_modulation.1":
            if swap_final:
                dw = None if dw is None else swap(dw)
                db = None if db is None else swap(db)
            parts = [("norm_out.linear", 2 * H)]
        else:
            name = next(re.sub(p, r, module) for p, r in BFL_RENAMES if re.fullmatch(p, module))
            parts = [(name, None)]
        rows = (dw if dw is not None else db).shape[0]
        row = 0
        for name, n in parts:
            n = n or rows
            cut = [None if x is None else x[row : row + n] for x in (dw, db)]
            self.diffusers(name, *cut)
            row += n
        assert row == rows, f"{module}: rows do not add up"
        return self

    def scaled(self, s: float) -> Merge:
        out = Merge()
        out.deltas = {k: s * v for k, v in self.deltas.items()}
        return out

    def __add__(self, other: Merge) -> Merge:
        out = self.scaled(1.0)
        for (c, p), d in other.deltas.items():
            out.add(c, p, d)
        return out

    def without(self, component: str) -> Merge:
        out = Merge()
        out.deltas = {k: v for k, v in self.deltas.items() if k[0] != component}
        return out


# ---------------------------------------------------------------------------------------------
# The diffusers reference


class Reference:
    """diffusers' FluxPipeline on a tiny folder (float32, CPU); runs with a hand merge, then restores."""

    def __init__(self, root, variant: str):
        from diffusers import FluxPipeline

        self.variant = variant
        self.pipe = FluxPipeline.from_pretrained(root)  # float32 by default, as make_reference_outputs
        self.pipe.set_progress_bar_config(disable=True)
        self.models = {"transformer": self.pipe.transformer, "text_encoder": self.pipe.text_encoder}
        for m in self.models.values():
            assert m.dtype == torch.float32
        self.saved = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in self.models.items()}
        self.base = self.image(Merge())

    def _param(self, component: str, name: str):
        params = dict(self.models[component].named_parameters())
        # transformers 5 drops CLIPTextModel's `text_model.` prefix from parameter names
        for candidate in (name, name.removeprefix("text_model.")):
            if candidate in params:
                return params[candidate]
        raise KeyError(f"{component} has no parameter {name}")

    def image(self, merge: Merge) -> np.ndarray:
        try:
            with torch.no_grad():
                for (component, name), delta in merge.deltas.items():
                    p = self._param(component, name)
                    assert tuple(p.shape) == delta.shape, f"{name}: {tuple(p.shape)} vs delta {delta.shape}"
                    p.copy_(torch.from_numpy((p.double().numpy() + delta).astype(np.float32)))
                images = self.pipe(
                    prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE[self.variant], max_sequence_length=MAX_SEQ[self.variant],
                    latents=torch.from_numpy(LATENTS.copy()), output_type="np",
                ).images  # fmt: skip
        finally:
            for component, model in self.models.items():
                model.load_state_dict(self.saved[component])
        return (np.asarray(images[0]) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def references(tiny_schnell, tiny_dev):
    """variant -> Reference, loaded on first use; torch on one thread (about 20x faster for these sizes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    roots, loaded = {"schnell": tiny_schnell, "dev": tiny_dev}, {}

    def get(variant: str) -> Reference:
        if variant not in loaded:
            loaded[variant] = Reference(roots[variant], variant)
        return loaded[variant]

    try:
        yield get
    finally:
        torch.set_num_threads(threads)
        if RESULTS:
            print("\nLoRA pipeline parity (uint8 levels): max|ours - hand-merged|, LoRA effect, wrong rules")
            for name, r in RESULTS.items():
                print(f"  {name}: {r}")


def ours(root, variant: str, paths, scales, quantize=None, merge: bool = True) -> tuple[np.ndarray, Flux1]:
    flux = Flux1.from_alias(
        variant, path=root, precision="float32", quantize=quantize,
        lora_paths=[str(p) for p in paths], lora_scales=scales, lora_merge=merge,
    )  # fmt: skip
    config = Config(STEPS, HEIGHT, WIDTH, GUIDANCE[variant])
    image = flux.generate_image(seed=0, prompt=PROMPT, config=config, latents=LATENTS, progress=False)
    return np.asarray(image.image), flux


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (HEIGHT, WIDTH, 3)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def check(request, ref: Reference, image: np.ndarray, merge: Merge, wrong: dict[str, Merge] = (),
          tol: int = TOL, flux: Flux1 | None = None) -> dict:  # fmt: skip
    """ours == hand merge within tol; the LoRA matters; every wrong rule is visibly different."""
    if flux is not None:  # every key of every file was applied
        for e in flux.loras.entries.values():
            assert e.report.matched == e.report.total and not e.report.skipped, e.report.line()
    expected = ref.image(merge)
    r = {"diff": max_diff(image, expected), "effect": max_diff(expected, ref.base)}
    r.update({f"wrong {k}": max_diff(image, ref.image(m)) for k, m in dict(wrong).items()})
    RESULTS[request.node.name] = r
    assert r["diff"] <= tol, r
    assert r["effect"] >= MIN_EFFECT, r
    for k in dict(wrong):
        assert r[f"wrong {k}"] >= MIN_EFFECT, (k, r)
    return r


# ---------------------------------------------------------------------------------------------
# LoRA files: each builder returns (tensors, metadata, hand merge at strength 1, wrong merges)


def write(tmp_path, name: str, tensors: dict, metadata: dict | None = None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata)
    return path


class Rand:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def lowrank(self, out: int, inp: int, rank: int, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(down (rank, in), up (out, rank)); up @ down is about gain x the base weight's size."""
        return self.normal(rank, inp, std=inp**-0.5), self.normal(out, rank, std=gain * rank**-0.5)


def f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def peft(seed: int = 0, scale_by: str = "alpha"):
    """diffusers/PEFT: `transformer.<diffusers module>.lora_A/B.weight`, `text_encoder.` for CLIP.
    scale_by "alpha": per-module `.alpha` keys (scale alpha / rank); "metadata": the
    `lora_adapter_metadata` header diffusers writes (lora_alpha / r, alpha_pattern, rank_pattern)."""
    r = Rand(seed)
    # (component, module, out, in, rank, alpha (the .alpha key, or what the metadata says), size of the
    # delta relative to the weight's)
    modules = [
        ("transformer", "transformer_blocks.0.attn.to_q", H, H, 4, 8.0, 2.0),
        ("transformer", "transformer_blocks.0.attn.add_v_proj", H, H, 4, 4.0, 1.0),  # alpha_pattern
        ("transformer", "single_transformer_blocks.1.proj_mlp", MLP, H, 4, 2.0, 0.5),  # alpha_pattern
        ("transformer", "norm_out.linear", 2 * H, H, 2, 8.0, 0.3),  # rank_pattern: r 2
        ("transformer", "x_embedder", H, IN, 4, 8.0, 0.2),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", CLIP, CLIP, 4, 12.0, 1.5),
    ]
    t, merge, unscaled, misplaced = {}, Merge(), Merge(), Merge()
    for component, module, out, inp, rank, alpha, gain in modules:
        down, up = r.lowrank(out, inp, rank, gain)
        t[f"{component}.{module}.lora_A.weight"], t[f"{component}.{module}.lora_B.weight"] = down, up
        if scale_by == "alpha":
            t[f"{component}.{module}.alpha"] = np.array(alpha, np.float32)
        d, u = f64(down, up)
        if component == "text_encoder":
            for m in (merge, unscaled, misplaced):
                m.clip(module, alpha / rank * u @ d if m is not unscaled else u @ d)
            continue
        merge.diffusers(module, alpha / rank * u @ d)
        unscaled.diffusers(module, u @ d)
        misplaced.diffusers(module.replace("add_v_proj", "add_q_proj"), alpha / rank * u @ d)
    metadata = None
    if scale_by == "metadata":
        config = {
            "transformer.r": 4, "transformer.lora_alpha": 8.0,
            "transformer.rank_pattern": {"norm_out.linear": 2},
            "transformer.alpha_pattern": {"proj_mlp": 2.0, "add_v_proj": 4.0},
            "transformer.target_modules": ["to_q", "add_v_proj", "proj_mlp", "norm_out.linear", "x_embedder"],
            "text_encoder.r": 4, "text_encoder.lora_alpha": 12.0, "text_encoder.target_modules": ["q_proj"],
        }  # fmt: skip
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    wrong = {"scale 1 (alpha ignored)": unscaled, "no CLIP": merge.without("text_encoder"),
             "add_v_proj on q rows": misplaced}  # fmt: skip
    return t, metadata, merge, wrong


def kohya(seed: int = 1):
    """kohya / sd-scripts: `lora_unet_<BFL name, _ for .>`, fused qkv and linear1 with one shared
    down, `.alpha` != rank (scale alpha / rank), final adaLN in BFL order, CLIP as `lora_te1_`."""
    r = Rand(seed)
    modules = [  # (BFL module, out, in, rank, alpha, size)
        ("double_blocks.0.txt_attn.qkv", 3 * H, H, 4, 2.0, 2.0),
        ("single_blocks.0.linear1", 3 * H + MLP, H, 8, 4.0, 0.5),
        ("final_layer.adaLN_modulation.1", 2 * H, H, 4, 8.0, 0.5),
        ("txt_in", H, TXT, 4, 1.0, 0.5),
    ]
    t, merge, unswapped, reversed_qkv = {}, Merge(), Merge(), Merge()
    for module, out, inp, rank, alpha, gain in modules:
        down, up = r.lowrank(out, inp, rank, gain)
        stem = "lora_unet_" + module.replace(".", "_")
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
        d, u = f64(down, up)
        delta = alpha / rank * u @ d
        merge.bfl(module, delta)
        unswapped.bfl(module, delta, swap_final=False)
        if module.endswith("qkv"):  # v | k | q
            delta = np.concatenate([delta[2 * H :], delta[H : 2 * H], delta[:H]])
        reversed_qkv.bfl(module, delta)
    down, up = r.lowrank(CLIP_MLP, CLIP, 4, gain=2.0)
    stem = "lora_te1_text_model_encoder_layers_1_mlp_fc1"
    t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
    t[f"{stem}.alpha"] = np.array(8.0, np.float32)
    d, u = f64(down, up)
    for m in (merge, unswapped, reversed_qkv):
        m.clip("text_model.encoder.layers.1.mlp.fc1", 8.0 / 4 * u @ d)
    wrong = {"final adaLN not swapped": unswapped, "no CLIP": merge.without("text_encoder"),
             "qkv rows as v | k | q": reversed_qkv}  # fmt: skip
    return t, None, merge, wrong


def kohya_split_qkv(seed: int = 2):
    """kohya `split_qkv=True`: per-part LoRAs saved fused, down = cat(per-part downs), up block
    diagonal, `.alpha` the per-part alpha; everyone's scale is alpha / (parts * rank) (kohya #2204).
    Ground truth as diffusers' sparse path: each part alone, up's diagonal block @ its down rows."""
    r = Rand(seed)
    t, merge, per_part_scale = {}, Merge(), Merge()
    cases = [  # (kohya stem, [(diffusers part, rows)], per-part rank, alpha)
        ("lora_unet_double_blocks_1_txt_attn_qkv",
         [(f"transformer_blocks.1.attn.add_{p}_proj", H) for p in "qkv"], 2, 4.0),
        ("lora_unet_single_blocks_1_linear1",
         [(f"single_transformer_blocks.1.attn.to_{p}", H) for p in "qkv"]
         + [("single_transformer_blocks.1.proj_mlp", MLP)], 2, 2.0),
    ]  # fmt: skip
    for stem, parts, rank, alpha in cases:
        n = len(parts)
        down = np.zeros((n * rank, H), np.float32)
        up = np.zeros((sum(rows for _, rows in parts), n * rank), np.float32)
        row = 0
        for i, (module, rows) in enumerate(parts):
            d, u = r.lowrank(rows, H, rank, gain=4.0)
            down[i * rank : (i + 1) * rank], up[row : row + rows, i * rank : (i + 1) * rank] = d, u
            d, u = f64(d, u)
            merge.diffusers(module, alpha / (n * rank) * u @ d)
            per_part_scale.diffusers(module, alpha / rank * u @ d)
            row += rows
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
    return t, None, merge, {"scale alpha / per-part rank": per_part_scale}


def bfl(seed: int = 3):
    """BFL / ComfyUI: `diffusion_model.<BFL name>.lora_A/B.weight`, `.alpha` where given (else
    scale 1); the final adaLN's up is in BFL (shift | scale) order."""
    r = Rand(seed)
    modules = [  # (BFL module, out, in, rank, alpha or None, size)
        ("double_blocks.1.txt_attn.qkv", 3 * H, H, 4, 2.0, 2.0),
        ("single_blocks.1.linear2", H, H + MLP, 4, None, 0.4),
        ("final_layer.adaLN_modulation.1", 2 * H, H, 2, None, 1.0),
        ("img_in", H, IN, 4, 8.0, 0.2),
    ]
    t, merge, unswapped = {}, Merge(), Merge()
    for module, out, inp, rank, alpha, gain in modules:
        down, up = r.lowrank(out, inp, rank, gain)
        stem = f"diffusion_model.{module}"
        t[f"{stem}.lora_A.weight"], t[f"{stem}.lora_B.weight"] = down, up
        if alpha is not None:
            t[f"{stem}.alpha"] = np.array(alpha, np.float32)
        d, u = f64(down, up)
        scale = 1.0 if alpha is None else alpha / rank
        merge.bfl(module, scale * u @ d)
        unswapped.bfl(module, scale * u @ d, swap_final=False)
    return t, None, merge, {"final adaLN not swapped": unswapped}


def xlabs(seed: int = 4):
    """XLabs x-flux: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 = image,
    2 = text stream), single `qkv_lora` (q | k | v rows of linear1 only) and `proj_lora` (linear2);
    no alpha, scale 1."""
    r = Rand(seed)
    modules = [  # (XLabs stem, BFL module, out, in, rank, XLabs stem the other stream would have)
        ("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", 3 * H, H, 4,
         "double_blocks.0.txt_attn.qkv"),
        ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", H, H, 4,
         "double_blocks.0.img_attn.proj"),
        ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", 3 * H, H, 4, None),
        ("single_blocks.1.processor.proj_lora", "single_blocks.1.linear2", H, H + MLP, 4, None),
    ]  # fmt: skip
    t, merge, streams_swapped = {}, Merge(), Merge()
    for stem, module, out, inp, rank, other in modules:
        down, up = r.lowrank(out, inp, rank, gain=2.0)
        t[f"{stem}.down.weight"], t[f"{stem}.up.weight"] = down, up
        d, u = f64(down, up)
        delta = u @ d
        if module.endswith("linear1"):  # q | k | v rows; the MLP rows get nothing
            delta = np.concatenate([delta, np.zeros((MLP, H))])
        merge.bfl(module, delta)
        streams_swapped.bfl(other or module, delta)
    return t, None, merge, {"lora1/lora2 streams swapped": streams_swapped}


def onetrainer(seed: int = 5):
    """OneTrainer: `lora_transformer_<diffusers module, _ for .>.lora_down/up.weight` + `.alpha`
    (diffusers names, so norm_out is already (scale | shift)), CLIP as `lora_te1_`."""
    r = Rand(seed)
    modules = [  # (component, diffusers / transformers module, out, in, rank, alpha)
        ("transformer", "transformer_blocks.0.attn.to_k", H, H, 4, 8.0),
        ("transformer", "single_transformer_blocks.0.proj_out", H, H + MLP, 4, 2.0),
        ("transformer", "norm_out.linear", 2 * H, H, 4, 6.0),
        ("transformer", "context_embedder", H, TXT, 2, 4.0),
        ("transformer", "time_text_embed.timestep_embedder.linear_1", H, TIME, 4, 8.0),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.v_proj", CLIP, CLIP, 4, 8.0),
    ]
    t, merge, swapped = {}, Merge(), Merge()
    for component, module, out, inp, rank, alpha in modules:
        down, up = r.lowrank(out, inp, rank, gain=0.4 if component == "transformer" else 1.5)
        prefix = "lora_transformer_" if component == "transformer" else "lora_te1_"
        stem = prefix + module.replace(".", "_")
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
        d, u = f64(down, up)
        delta = alpha / rank * u @ d
        if component == "text_encoder":
            merge.clip(module, delta)
            swapped.clip(module, delta)
        else:
            merge.diffusers(module, delta)
            swapped.diffusers(module, swap(delta) if module == "norm_out.linear" else delta)
    return t, None, merge, {"norm_out swapped": swapped, "no CLIP": merge.without("text_encoder")}


def lokr(seed: int = 6):
    """LyCORIS LoKr: `lycoris_<diffusers module, _ for .>.lokr_w1 / lokr_w2` (or `_a` @ `_b`),
    delta = kron(w1, w2); scale alpha / dim only when a factor is low rank (dim its inner size),
    else 1 even when the file has an alpha."""
    r = Rand(seed)
    t, merge, alpha_always = {}, Merge(), Merge()
    # full w1 and w2, alpha present but unused: (4 x 4) kron (16 x 16) = add_v_proj (64 x 64), a
    # part of our fused txt qkv
    w1, w2 = r.normal(4, 4), r.normal(16, 16, std=0.5 * H**-0.5)
    stem = "lycoris_transformer_blocks_0_attn_add_v_proj"
    t |= {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2, f"{stem}.alpha": np.array(3.0, np.float32)}
    merge.diffusers("transformer_blocks.0.attn.add_v_proj", np.kron(*f64(w1, w2)))
    alpha_always.diffusers("transformer_blocks.0.attn.add_v_proj", 3.0 * np.kron(*f64(w1, w2)))
    # low-rank w2 (rank 2), alpha 1: scale 1 / 2; (8 x 4) kron (32 x 16) = proj_mlp (256 x 64)
    w1, w2a, w2b = r.normal(8, 4), r.normal(32, 2, std=H**-0.5), r.normal(2, 16)
    stem = "lycoris_single_transformer_blocks_0_proj_mlp"
    t |= {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
          f"{stem}.alpha": np.array(1.0, np.float32)}  # fmt: skip
    w1, w2a, w2b = f64(w1, w2a, w2b)
    for m in (merge, alpha_always):
        m.diffusers("single_transformer_blocks.0.proj_mlp", 0.5 * np.kron(w1, w2a @ w2b))
    # a non-block layer, no alpha: (8 x 4) kron (8 x 8) = context_embedder (64 x 32)
    w1, w2 = r.normal(8, 4), r.normal(8, 8, std=0.5 * TXT**-0.5)
    t |= {"lycoris_context_embedder.lokr_w1": w1, "lycoris_context_embedder.lokr_w2": w2}
    for m in (merge, alpha_always):
        m.diffusers("context_embedder", np.kron(*f64(w1, w2)))
    return t, None, merge, {"alpha applied to full factors": alpha_always}


def loha(seed: int = 7):
    """LyCORIS LoHa: `lycoris_<diffusers module>.hada_w{1,2}_{a,b}` + `.alpha`,
    delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (rank = w1_b rows)."""
    r = Rand(seed)
    t, merge, unscaled = {}, Merge(), Merge()
    modules = [  # (diffusers module, out, in, rank, alpha)
        ("transformer_blocks.1.ff.net.0.proj", MLP, H, 4, 2.0),
        ("norm_out.linear", 2 * H, H, 2, 4.0),
        ("x_embedder", H, IN, 4, 8.0),
    ]
    for module, out, inp, rank, alpha in modules:
        stem = "lycoris_" + module.replace(".", "_")
        w = {
            "hada_w1_a": r.normal(out, rank, std=0.5 * (rank * inp) ** -0.5),
            "hada_w1_b": r.normal(rank, inp),
            "hada_w2_a": r.normal(out, rank, std=rank**-0.5),
            "hada_w2_b": r.normal(rank, inp),
        }
        t |= {f"{stem}.{k}": v for k, v in w.items()} | {f"{stem}.alpha": np.array(alpha, np.float32)}
        w1a, w1b, w2a, w2b = f64(*w.values())
        delta = (w1a @ w1b) * (w2a @ w2b)
        merge.diffusers(module, alpha / rank * delta)
        unscaled.diffusers(module, delta)
    return t, None, merge, {"scale 1 (alpha ignored)": unscaled}


def full_diff(seed: int = 8):
    """Full deltas: `<stem>.diff` (weight) and `.diff_b` (bias), scale 1; one BFL-named layer (the
    final adaLN: weight rows and bias swapped into diffusers' order) and one diffusers part (to_k)."""
    r = Rand(seed)
    t, merge, unswapped = {}, Merge(), Merge()
    dw, db = r.normal(2 * H, H, std=0.3 * H**-0.5), r.normal(2 * H, std=0.3)
    t["diffusion_model.final_layer.adaLN_modulation.1.diff"] = dw
    t["diffusion_model.final_layer.adaLN_modulation.1.diff_b"] = db
    merge.bfl("final_layer.adaLN_modulation.1", *f64(dw, db))
    unswapped.bfl("final_layer.adaLN_modulation.1", *f64(dw, db), swap_final=False)
    dw, db = r.normal(H, H, std=0.5 * H**-0.5), r.normal(H, std=0.3)
    t["transformer.transformer_blocks.1.attn.to_k.diff"] = dw
    t["transformer.transformer_blocks.1.attn.to_k.diff_b"] = db
    for m in (merge, unswapped):
        m.diffusers("transformer_blocks.1.attn.to_k", *f64(dw, db))
    return t, None, merge, {"final adaLN not swapped": unswapped}


def kohya_dev(seed: int = 9):
    """kohya on dev: the guidance embedder, a double-block MLP, a single-block modulation, vector_in."""
    r = Rand(seed)
    modules = [  # (BFL module, out, in, rank, alpha)
        ("guidance_in.in_layer", H, TIME, 4, 8.0),
        ("double_blocks.1.img_mlp.0", MLP, H, 4, 2.0),
        ("single_blocks.1.modulation.lin", 3 * H, H, 4, 6.0),
        ("vector_in.out_layer", H, H, 2, 1.0),
    ]
    t, merge, no_guidance = {}, Merge(), Merge()
    for module, out, inp, rank, alpha in modules:
        down, up = r.lowrank(out, inp, rank, gain=0.6)
        stem = "lora_unet_" + module.replace(".", "_")
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
        d, u = f64(down, up)
        merge.bfl(module, alpha / rank * u @ d)
        if not module.startswith("guidance_in"):
            no_guidance.bfl(module, alpha / rank * u @ d)
    return t, None, merge, {"guidance_in dropped": no_guidance}


FORMATS = {
    "peft_alpha": lambda: peft(scale_by="alpha"),
    "peft_metadata": lambda: peft(scale_by="metadata"),
    "kohya": kohya,
    "kohya_split_qkv": kohya_split_qkv,
    "bfl_comfyui": bfl,
    "xlabs": xlabs,
    "onetrainer": onetrainer,
    "lycoris_lokr": lokr,
    "lycoris_loha": loha,
    "full_diff": full_diff,
}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_matches_hand_merged_diffusers(request, tmp_path, tiny_schnell, references, fmt):
    tensors, metadata, merge, wrong = FORMATS[fmt]()
    image, flux = ours(tiny_schnell, "schnell", [write(tmp_path, fmt, tensors, metadata)], [STRENGTH])
    wrong = {k: m.scaled(STRENGTH) for k, m in wrong.items()}
    check(request, references("schnell"), image, merge.scaled(STRENGTH), wrong, flux=flux)


def test_dev_with_guidance(request, tmp_path, tiny_dev, references):
    tensors, metadata, merge, wrong = kohya_dev()
    image, flux = ours(tiny_dev, "dev", [write(tmp_path, "kohya_dev", tensors, metadata)], [STRENGTH])
    assert flux.is_guidance_distilled
    wrong = {k: m.scaled(STRENGTH) for k, m in wrong.items()}
    check(request, references("dev"), image, merge.scaled(STRENGTH), wrong, flux=flux)


@pytest.mark.parametrize("merge_weights", [True, False], ids=["merged", "side_path"])
def test_two_loras_add_up(request, tmp_path, tiny_schnell, references, merge_weights):
    """A PEFT file x 0.5 and a kohya file x 1.2 on overlapping layers (block 0's text qkv: add_v_proj
    and the fused kohya qkv; the final adaLN once in diffusers order, once in BFL order; CLIP): the
    hand merge adds both."""
    (t1, m1, merge1, _), (t2, m2, merge2, _) = peft(seed=10), kohya(seed=11)
    paths = [write(tmp_path, "peft", t1, m1), write(tmp_path, "kohya", t2, m2)]
    image, flux = ours(tiny_schnell, "schnell", paths, [0.5, 1.2], merge=merge_weights)
    wrong = {
        "second LoRA dropped": merge1.scaled(0.5),
        "strengths swapped": merge1.scaled(1.2) + merge2.scaled(0.5),
    }
    check(request, references("schnell"), image, merge1.scaled(0.5) + merge2.scaled(1.2), wrong, flux=flux)


def test_quantized_with_lora_is_within_quantization_error(request, tmp_path, tiny_schnell, references):
    """8-bit transformer, T5 and CLIP with a kohya LoRA (side path on quantized layers) vs the float32
    hand-merged reference: only the quantization error remains (the 8-bit model without a LoRA is
    measured against the float32 reference for comparison)."""
    tensors, metadata, merge, _ = kohya()
    path = write(tmp_path, "kohya", tensors, metadata)
    image, flux = ours(tiny_schnell, "schnell", [path], [STRENGTH], quantize=8)
    assert flux.quantization is not None
    ref = references("schnell")
    r = check(request, ref, image, merge.scaled(STRENGTH), tol=3, flux=flux)
    base_q8 = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", quantize=8)
    base_image = base_q8.generate_image(seed=0, prompt=PROMPT, config=Config(STEPS, HEIGHT, WIDTH),
                                        latents=LATENTS, progress=False)  # fmt: skip
    r["q8 without LoRA vs float32 reference"] = max_diff(np.asarray(base_image.image), ref.base)
