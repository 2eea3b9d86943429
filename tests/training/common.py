"""Shared pieces of the training tests: a batch, our gradients by diffusers name, and diffusers +
PEFT on the same tiny checkpoint with our factors copied in (the live reference)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from flux_1.loading.tables import DIFFUSERS_TRANSFORMER, part_rows, source_names
from flux_1.training.adapters import adapted_layers, adapter_state, load_adapter_state

B, H, W, L = 2, 4, 6, 5  # batch, latent rows and columns (even: 2x2 packing), text tokens
SIGMAS = [0.3, 0.85]


def batch(params, seed: int = 0) -> dict[str, np.ndarray]:
    """Channels-last latents and noise (B, H, W, 16), T5 states, pooled vector, sigmas."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"latents": f(B, H, W, 16), "noise": f(B, H, W, 16), "txt": f(B, L, params.context_dim),
            "pooled": f(B, params.vec_dim), "sigmas": np.array(SIGMAS, np.float32)}


def mx_batch(b: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in b.items()}


def randomize_ups(transformer, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B factors (PEFT's init has B = 0, where every A gradient is 0)."""
    rng = np.random.default_rng(seed)
    state = {k: (mx.array(rng.standard_normal(v.shape).astype(np.float32) * std) if ".lora_B." in k else v)
             for k, v in adapter_state(transformer).items()}
    load_adapter_state(transformer, state)


def by_diffusers_name(transformer, tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tree like trainable_parameters() (factors or gradients) -> {diffusers name: (A, B)}."""
    flat = dict(tree_flatten(tree))
    out = {}
    for module, layer in adapted_layers(transformer):
        for i, p in enumerate(layer.projections):
            out[p.name] = (np.array(flat[f"{module}.lora_A.{i}"]), np.array(flat[f"{module}.lora_B.{i}"]))
    return out


def diffusers_with_peft(folder, transformer, config, torch, dequantized: bool = False):
    """diffusers' FluxTransformer2DModel from the fixture folder, PEFT-wrapped on the names we adapt,
    our current factors copied in. `dequantized`: its weights replaced by our quantized layers'
    dequantized values (QLoRA reference)."""
    import diffusers
    from peft import LoraConfig

    theirs = diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    if dequantized:
        _copy_dequantized(theirs, transformer, torch)
    factors = by_diffusers_name(transformer, transformer.trainable_parameters())
    theirs.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=sorted(factors),
                                  init_lora_weights=True))
    with torch.no_grad():
        for name, (a, b) in factors.items():
            m = theirs.get_submodule(name)
            m.lora_A["default"].weight.copy_(torch.from_numpy(a))
            m.lora_B["default"].weight.copy_(torch.from_numpy(b))
    return theirs


def _copy_dequantized(theirs, transformer, torch) -> None:
    for module, layer in transformer.named_modules():
        if "scales" not in layer:
            continue
        w = np.array(mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"),
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
        names = source_names(DIFFUSERS_TRANSFORMER, module)
        rows = part_rows(module, w.shape[0], w.shape[1], names[0][1].parts)
        with torch.no_grad():
            for name, r in names:
                block = w[sum(rows[: r.part]) : sum(rows[: r.part + 1])]
                if r.swap_halves:
                    block = np.concatenate(np.split(block, 2)[::-1])
                theirs.get_submodule(name).weight.copy_(torch.from_numpy(np.ascontiguousarray(block)))


def torch_prediction(theirs, b: dict[str, np.ndarray], torch, guidance: float | None = 3.5):
    """diffusers' transformer on x_t of the batch as train_dreambooth_lora_flux.py builds it:
    (x_t channels-first (B, 16, h, w), packed prediction (B, N, 64))."""
    from diffusers import FluxPipeline

    x0 = torch.from_numpy(b["latents"]).permute(0, 3, 1, 2)
    noise = torch.from_numpy(b["noise"]).permute(0, 3, 1, 2)
    sigmas = torch.from_numpy(b["sigmas"])
    n, c, h, w = x0.shape
    s = sigmas[:, None, None, None]
    noisy = (1.0 - s) * x0 + s * noise
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x0.device, x0.dtype)
    txt = torch.from_numpy(b["txt"])
    txt_ids = torch.zeros(txt.shape[1], 3)
    g = None if guidance is None else torch.tensor([guidance]).expand(n)
    pred = theirs(hidden_states=packed, timestep=sigmas, guidance=g, pooled_projections=torch.from_numpy(b["pooled"]),
                  encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return noisy, pred


def ours_prediction(transformer, b: dict[str, np.ndarray], guidance: float | None = 3.5) -> np.ndarray:
    """Our transformer on the same x_t, packed prediction (B, N, 64)."""
    from flux_1.pipeline import sampler

    x0, e, s = (mx.array(b[k]) for k in ("latents", "noise", "sigmas"))
    n, h, w, _ = x0.shape
    x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * e
    g = None if guidance is None else mx.full((n,), guidance)
    out = transformer(sampler.pack(x_t), mx.array(b["txt"]), mx.array(b["pooled"]), s,
                      sampler.image_ids(8 * h, 8 * w), sampler.text_ids(b["txt"].shape[1]), guidance=g)
    return np.array(out)


def torch_loss(theirs, b: dict[str, np.ndarray], torch, guidance: float | None = 3.5, weights=None):
    """train_dreambooth_lora_flux.py's loss on one batch (channels-first latents, as it has them)."""
    from diffusers import FluxPipeline

    noisy, pred = torch_prediction(theirs, b, torch, guidance)
    x0 = torch.from_numpy(b["latents"]).permute(0, 3, 1, 2)
    noise = torch.from_numpy(b["noise"]).permute(0, 3, 1, 2)
    n, _, h, w = x0.shape
    pred = FluxPipeline._unpack_latents(pred, height=h * 8, width=w * 8, vae_scale_factor=8)
    target = noise - x0
    weighting = torch.from_numpy(np.ones(n, np.float32) if weights is None else np.asarray(weights))
    weighting = weighting[:, None, None, None]
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(n, -1), 1)
    return loss.mean()


def torch_grads(theirs, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in names:
        m = theirs.get_submodule(name)
        out[name] = (m.lora_A["default"].weight.grad.numpy().copy(), m.lora_B["default"].weight.grad.numpy().copy())
    return out


def torch_factors(theirs, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in names:
        m = theirs.get_submodule(name)
        out[name] = (m.lora_A["default"].weight.detach().numpy().copy(),
                     m.lora_B["default"].weight.detach().numpy().copy())
    return out
