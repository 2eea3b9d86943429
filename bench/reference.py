"""The same workload through diffusers / transformers (torch), in its own process.

`python -m bench.reference SPEC.json OUT.json`, started by bench/run.py. It loads the very folder our
side loaded (from_pretrained: diffusers FluxTransformer2DModel and AutoencoderKL, transformers
T5EncoderModel and CLIPTextModel), feeds the same token ids, noise and sigmas, and times the same
stages: load, text encoding, transformer steps (eager, SDPA attention, as FluxPipeline runs them),
VAE decode. torch's thread count is set to the spec's (the machine's cores unless told).

Modes (spec "modes"): txt2img, and kontext as FluxKontextPipeline runs its transformer: the reference
image's packed latents concatenated to the latents along the sequence, `img_ids` the image's ids then
the reference's (first axis 1), the output cut back to the image tokens; and, with spec "encode", the
reference's VAE encode as FluxKontextPipeline._encode_vae_image (posterior mode, shift, scale) plus
the packing, timed as `encode`.

Peak memory: on CUDA torch.cuda.max_memory_allocated (reset per stage); on CPU the process RSS
high-water mark (reset per stage through /proc/self/clear_refs).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import bench  # noqa: F401  (sys.path for flux_1 when the repo is not installed)

from .common import (
    GB,
    Clock,
    binding_of,
    global_symbol_provider,
    loadavg,
    mapped_blas_libraries,
    median,
    rss_peak_gb,
    rss_reset,
    timed_runs,
)

BLAS_SYMBOLS = ("sgemm_", "cblas_sgemm")

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out, indent=2))


def torch_blas(before_torch: dict) -> dict:
    """Which BLAS torch's float32 GEMMs use here, measured through the dynamic linker: libtorch_cpu.so
    defines `sgemm_` (MKL, linked in statically) and exports it, so an OpenBLAS in the global scope
    (LD_PRELOAD, or flux_1's RTLD_GLOBAL load) would take its calls over. `before_torch`: the global
    scope's providers before torch was imported (none is the clean case)."""
    import torch

    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    sgemm = binding_of(str(lib), "sgemm_") if lib.exists() else None
    config = torch.__config__.show()
    info = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                None)
    return {
        "torch_blas_build": info,  # torch.__config__.show(): BLAS_INFO=mkl for the x86-64 wheels
        "torch_mkl": bool(torch.backends.mkl.is_available()),
        "sgemm_provider": sgemm,  # what torch's sgemm_ calls bind to
        "global_blas_before_torch": before_torch,
        "global_blas_after_torch": {n: global_symbol_provider(n) for n in BLAS_SYMBOLS},
        "openblas_for_sgemm": bool(sgemm and "openblas" in Path(sgemm).name.lower()),
        "blas_libraries_mapped": mapped_blas_libraries(),  # numpy's scipy_openblas64_ has prefixed symbols
        "flux_1_imported": "flux_1" in sys.modules,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "flux1_blas_env": os.environ.get("FLUX1_BLAS"),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkl_num_threads_env": os.environ.get("MKL_NUM_THREADS"),
    }


def run(spec: dict) -> dict:
    before_torch = {n: global_symbol_provider(n) for n in BLAS_SYMBOLS}
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(spec["root"])
    inputs = dict(np.load(spec["inputs"]))
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": loadavg(),
        "sdpa_backend": "torch.nn.functional.scaled_dot_product_attention (diffusers default processor)",
    }
    try:
        env.update(torch_blas(before_torch))
    except Exception as e:  # pragma: no cover - the linker query is Linux-only; never fatal
        env["blas_error"] = repr(e)
    try:
        import diffusers
        import transformers

        env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError as e:  # pragma: no cover
        return {"env": env, "rows": [], "error": f"not importable: {e}"}
    rows = []
    for precision in spec["precisions"]:
        dtype = getattr(torch, TORCH_DTYPES[precision])
        for rank in spec["ranks"]:
            rows += _one(spec, root, inputs, device, dtype, precision, rank,
                         with_other_stages=rank == spec["ranks"][0])
    return {"env": env, "rows": rows}


class Stage:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss_reset()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0
        self.rss = rss_peak_gb()
        self.peak = torch.cuda.max_memory_allocated() / GB if self.device.type == "cuda" else self.rss
        return False


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _one(spec, root, inputs, device, dtype, precision, rank, with_other_stages) -> list[dict]:
    """One row per mode (the text and VAE stages, run once, shared by them); none without peft for a LoRA."""
    import diffusers
    import torch
    import transformers

    steps, warmup = spec["steps"], spec["warmup"]
    row = {"impl": "diffusers", "precision": precision, "quantize": None, "lora_rank": rank,
           "load_s": {}, "peak_gb": {}, "rss_peak_gb": {}}
    with torch.inference_mode():
        # Text encoders (once per precision).
        if with_other_stages:
            with Stage(device) as s_clip:
                clip = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device)
            with Stage(device) as s_t5:
                t5 = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device)
            row["load_s"].update(clip=s_clip.s, t5=s_t5.s)
            row["peak_gb"]["load_text"] = max(s_clip.peak, s_t5.peak)
            clip_ids = torch.from_numpy(inputs["clip_ids"].astype(np.int64)).to(device)
            t5_ids = torch.from_numpy(inputs["t5_ids"].astype(np.int64)).to(device)

            def encode():
                pooled = clip(clip_ids, output_hidden_states=False).pooler_output
                txt = t5(t5_ids).last_hidden_state
                _sync(device)
                return txt, pooled

            with Stage(device) as s_text:
                encode()
                times, (txt, pooled) = timed_runs(encode, 2)
            row.update(text_s=median(times), text_times_s=times)
            row["peak_gb"]["text"] = s_text.peak
            del clip, t5
        else:
            # Same shapes as the encoders' outputs; values do not change a step's cost.
            txt = torch.randn(1, inputs["t5_ids"].shape[1], spec["context_dim"], dtype=dtype, device=device)
            pooled = torch.randn(1, spec["vec_dim"], dtype=dtype, device=device)
        gc.collect()

        # Transformer.
        with Stage(device) as s_load:
            tr = diffusers.FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
        row["load_s"]["transformer"] = s_load.s
        row["peak_gb"]["load_transformer"] = s_load.peak
        if rank:
            try:
                from peft import LoraConfig

                names = sorted({n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)})
                t0 = time.perf_counter()
                tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="gaussian"))
                row.update(lora_impl="diffusers add_adapter (peft, unfused)", lora_layers=len(names),
                           lora_apply_s=time.perf_counter() - t0)
            except ImportError:
                tr = None  # noqa: F841
                return []  # no peft: no LoRA row on this side
        sigmas = [float(s) for s in inputs["sigmas"]]
        x0 = torch.from_numpy(inputs["noise"]).to(device=device, dtype=dtype)
        rows_, cols = spec["latent_grid"]
        img_ids = torch.zeros(rows_, cols, 3)
        img_ids[..., 1] = torch.arange(rows_)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(device=device, dtype=dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=device, dtype=dtype)
        guidance = torch.full([1], 3.5, device=device, dtype=torch.float32) if spec["guidance"] else None
        txt = txt.to(dtype)
        pooled = pooled.to(dtype)
        n = x0.shape[1]

        def make_step(ref, ids):
            def step(x, i):
                t = torch.full([1], sigmas[i], device=device, dtype=dtype)
                inp = x if ref is None else torch.cat([x, ref], dim=1)  # FluxKontextPipeline: latents | image
                v = tr(hidden_states=inp, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                       img_ids=ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
                v = v[:, :n]  # Kontext: the reference tokens' outputs are dropped
                x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
                _sync(device)
                return x
            return step

        rows = []
        for mode in spec.get("modes", ["txt2img"]):
            ref, ids = None, img_ids
            if mode == "kontext":
                ref = torch.from_numpy(inputs["reference"]).to(device=device, dtype=dtype)
                ref_ids = img_ids.clone()
                ref_ids[..., 0] = 1  # FluxKontextPipeline.prepare_latents: image_ids[..., 0] = 1
                ids = torch.cat([img_ids, ref_ids], dim=0)
            step = make_step(ref, ids)
            m = n + (0 if ref is None else ref.shape[1])
            mrow = {**row, "mode": mode, "load_s": dict(row["load_s"]), "peak_gb": dict(row["peak_gb"]),
                    "tokens": {"image": n, "reference": m - n, "text": txt.shape[1], "sequence": m + txt.shape[1]}}
            times, cpu, others = [], [], []
            gc.collect()
            with Stage(device) as s_step:
                x = x0
                for i in range(warmup + steps):
                    with Clock() as c:
                        x = step(x, i)
                    times.append(c.s)
                    cpu.append(c.cpu)
                    others.append(c.others)
            mrow.update(step_s=median(times[warmup:]), step_times_s=times[warmup:], step_cpu_s=cpu[warmup:],
                        step_others_cpu_s=others[warmup:], warmup_times_s=times[:warmup], step_method="measured")
            mrow["peak_gb"]["step"] = s_step.peak
            rows.append(mrow)
            if mode == "txt2img" or len(rows) == 1:
                latents = x
            del ref
        x = latents
        tr = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # VAE.
        encode = with_other_stages and spec.get("encode") and "kontext" in spec.get("modes", [])
        decode = with_other_stages and spec.get("decode", True)
        if encode or decode:
            with Stage(device) as s_vload:
                vae = diffusers.AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).to(device)
        if encode:
            pixels = torch.from_numpy(inputs["reference_pixels"]).permute(0, 3, 1, 2).to(device=device, dtype=dtype)

            def encode_reference():
                z = vae.encode(pixels).latent_dist.mode()  # _encode_vae_image: retrieve_latents(argmax)
                z = (z - vae.config.shift_factor) * vae.config.scaling_factor
                b, c, hh, ww = z.shape  # FluxKontextPipeline._pack_latents
                z = z.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
                _sync(device)
                return z

            with Stage(device) as s_enc:
                times, _ = timed_runs(encode_reference, 1 + spec.get("decode_warmup", spec["warmup"]))
            for r in rows:
                if r["mode"] == "kontext":
                    r.update(encode_s=times[-1], encode_first_s=times[0])
                    r["peak_gb"]["encode"] = s_enc.peak
            del pixels
            gc.collect()
        if decode:
            row["load_s"]["vae"] = s_vload.s
            row["peak_gb"]["load_vae"] = s_vload.peak
            h, w = spec["height"], spec["width"]
            z = x.reshape(1, h // 16, w // 16, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, -1, h // 8, w // 8)
            z = z / vae.config.scaling_factor + vae.config.shift_factor

            def decode():
                image = vae.decode(z, return_dict=False)[0]
                image = (image / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
                return image

            with Stage(device) as s_dec:
                times, _ = timed_runs(decode, 1 + spec.get("decode_warmup", spec["warmup"]))
            row.update(decode_s=times[-1], decode_first_s=times[0])
            row["peak_gb"]["decode"] = s_dec.peak
            row["load_s"]["total"] = sum(row["load_s"].values())
        elif with_other_stages:
            row["load_s"]["total"] = None
        if encode or decode:
            del vae
    out = []
    for r in rows:  # the shared stages (text, VAE) from `row`, the mode's own (step, encode) kept
        merged = {**row, **{k: v for k, v in r.items() if k not in ("load_s", "peak_gb")},
                  "load_s": {**r["load_s"], **row["load_s"]}, "peak_gb": {**row["peak_gb"], **r["peak_gb"]}}
        merged["rss_peak_gb"] = None if device.type == "cuda" else dict(merged["peak_gb"])
        out.append(merged)
    return out


def serve(spec: dict) -> None:
    """`python -m bench.reference --serve SPEC.json` (bench/run.py --alternate): load the transformer at the
    first precision, print one JSON line, then time one step per `step` line read from stdin (always the
    first step, from the same inputs) and answer a JSON line {s, cpu, others}; `quit` ends it. So both
    processes stay resident and their steps alternate, each in its own process with its own BLAS."""
    before_torch = {n: global_symbol_provider(n) for n in BLAS_SYMBOLS}
    import diffusers
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, TORCH_DTYPES[spec["precisions"][0]])
    inputs = dict(np.load(spec["inputs"]))
    tr = diffusers.FluxTransformer2DModel.from_pretrained(Path(spec["root"]) / "transformer", torch_dtype=dtype)
    rows_, cols = spec["latent_grid"]
    img_ids = torch.zeros(rows_, cols, 3)
    img_ids[..., 1] = torch.arange(rows_)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(dtype)
    x = torch.from_numpy(inputs["noise"]).to(dtype)
    txt = torch.from_numpy(inputs["alt_txt"]).to(dtype)
    pooled = torch.from_numpy(inputs["alt_pooled"]).to(dtype)
    txt_ids = torch.zeros(txt.shape[1], 3, dtype=dtype)
    t = torch.full([1], float(inputs["sigmas"][0]), dtype=dtype)
    guidance = torch.full([1], 3.5, dtype=torch.float32) if spec["guidance"] else None
    env = {"threads": torch.get_num_threads(), **torch_blas(before_torch)}
    print(json.dumps({"ready": True, "env": env}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            if line.strip() != "step":
                break
            with Clock() as c:
                tr(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)
            print(json.dumps({"s": c.s, "cpu": c.cpu, "others": c.others}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
