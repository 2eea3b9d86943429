"""Our side: load, encode, denoise and decode through flux_1's own code, stage by stage.

Stages run one model at a time (as the pipeline's low-memory mode does), so each stage's peak memory
is its own: `mx.reset_peak_memory()` before, `mx.get_peak_memory()` after (plus the process RSS
high-water mark on Linux). Order per precision: for each quantization setting (unquantized first),
the text encoders (load, encode), then the transformer (load, then per LoRA rank: apply, steps);
the VAE (load, decode) once per precision: it is never quantized and LoRAs do not touch it.

Modes (per LoRA rank, on the one loaded transformer): txt2img steps on the image tokens; kontext steps
with a reference image's packed latents appended to them (`Conditioning.model_input`, the pipeline's
own code: ids from `conditioning.reference_ids`, the reference tokens' outputs dropped), as
`Flux1.denoise` does for FLUX.1 Kontext. The reference's VAE encode (`Flux1.encode_image`'s math) is
timed in the VAE stage as `encode`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from flux_1 import quantization as q
from flux_1.components import PRECISIONS
from flux_1.loading import folder as loader
from flux_1.pipeline import conditioning, sampler
from flux_1.pipeline.flux1 import StepBufferCache

from . import lora as bench_lora
from . import profile
from .common import GB, Clock, median, rss_peak_gb, rss_reset, timed_runs


def quant_spec(setting: str | None) -> q.QuantSpec | None:
    if setting in (None, "none", "0"):
        return None
    if str(setting).isdigit():
        return q.QuantSpec(bits=int(setting))
    return q.QuantSpec.from_mode(str(setting))


class Mem:
    """Time and peak memory of one stage, each stage starting from a clean slate."""

    def __enter__(self):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        self.active0 = mx.get_active_memory()
        rss_reset()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.peak = mx.get_peak_memory() / GB
        self.rss = rss_peak_gb()
        self.added = (mx.get_active_memory() - self.active0) / GB  # what the stage left resident
        return False


@dataclass
class Baseline:
    """Unquantized measurements a quantized setting's projection starts from."""

    text_s: float = 0.0
    text_linear_s: float = 0.0
    text_out: tuple | None = None
    step: dict = field(default_factory=dict)  # (lora rank, mode) -> {s, linear_s, peak, weights}


def _free():
    gc.collect()
    mx.clear_cache()


NESTED = ("load_s", "peak_gb", "rss_peak_gb", "weights_gb")


def _merge(row: dict, stage: dict) -> None:
    """Add one stage's fields to a row (the per-stage dicts are merged, not replaced)."""
    for k, v in stage.items():
        if k in NESTED:
            row[k] = {**v, **row.get(k, {})}
        else:
            row[k] = v


def run(cfg, root, inputs: dict, precisions: list[str], quants: list[str | None], ranks: list[int],
        steps: int, warmup: int, max_stage_s: float | None, sample_rows: int, profile_blocks: bool,
        log=print, decode_warmup: int | None = None, decode: bool = True, modes=("txt2img",),
        encode: bool = False, breakdown: bool = True) -> tuple[list[dict], list[dict]]:
    decode_warmup = warmup if decode_warmup is None else decode_warmup
    encode = encode and "kontext" in modes
    rows: list[dict] = []
    breakdowns: list[dict] = []
    quants = sorted(quants, key=lambda s: quant_spec(s) is not None)  # the unquantized baseline first
    ranks = sorted(ranks)
    needs_baseline = max_stage_s is not None and any(quant_spec(s) is not None for s in quants)
    for precision in precisions:
        dtype = PRECISIONS[precision]
        base = Baseline()
        final_latents = None
        for setting in quants:
            spec = quant_spec(setting)
            label = spec and (f"q{spec.bits}" if spec.mode == "affine" else spec.mode)
            log(f"[ours {precision} {label or 'unquantized'}] text encoders")
            text = _text_stage(cfg, root, inputs, dtype, spec, base, max_stage_s, sample_rows,
                               measure_linears=spec is None and needs_baseline, log=log)
            txt, pooled = text.pop("outputs")
            log(f"[ours {precision} {label or 'unquantized'}] transformer")
            for row, bd, latents in _transformer_stage(cfg, root, inputs, dtype, spec, ranks, txt, pooled, base,
                                                       steps, warmup, max_stage_s, sample_rows,
                                                       profile_blocks, log, modes,
                                                       breakdown or needs_baseline):
                _merge(row, text)
                row.update(precision=precision, quantize=label)
                rows.append(row)
                if bd:
                    breakdowns.append({"precision": precision, "quantize": label, "lora_rank": row["lora_rank"],
                                       "mode": row["mode"], **bd})
                if latents is not None and final_latents is None:
                    final_latents = latents
            del txt, pooled
            _free()
        if not decode:
            for row in rows:
                if row["precision"] == precision:
                    row["load_s"]["total"] = None
            if not encode:
                continue
        log(f"[ours {precision}] VAE")
        vae = _vae_stage(cfg, root, dtype, final_latents, decode_warmup, decode=decode,
                         reference_pixels=inputs["reference_pixels"] if encode else None)
        for row in rows:
            if row["precision"] != precision:
                continue
            if decode:
                row["load_s"]["vae"] = vae["load_s"]
                row["load_s"]["total"] = sum(v for k, v in row["load_s"].items() if k != "total")
                row["decode_s"] = vae["decode_s"]
                row["decode_first_s"] = vae["decode_first_s"]
                row["weights_gb"]["vae"] = vae["weights_gb"]
                for k in ("load_vae", "decode"):
                    row["peak_gb"][k] = vae["peak_gb"][k]
                    row["rss_peak_gb"][k] = vae["rss_peak_gb"][k]
            if encode and row["mode"] == "kontext":
                row["encode_s"] = vae["encode_s"]
                row["encode_first_s"] = vae["encode_first_s"]
                row["peak_gb"]["encode"] = vae["peak_gb"]["encode"]
                row["rss_peak_gb"]["encode"] = vae["rss_peak_gb"]["encode"]
    return rows, breakdowns


# ---------------------------------------------------------------------------------------------
# Text encoders


def _text_stage(cfg, root, inputs, dtype, spec, base: Baseline, max_stage_s, sample_rows, measure_linears, log):
    with Mem() as m_clip:
        clip = loader.load_folder_component(root, "clip", dtype, spec)
    with Mem() as m_t5:
        t5 = loader.load_folder_component(root, "t5", dtype, spec)
    clip_ids = mx.array(inputs["clip_ids"])
    t5_ids = mx.array(inputs["t5_ids"])

    def encode():
        _, pooled = clip(clip_ids)
        return t5(t5_ids), pooled

    out = {
        "load_s": {"clip": m_clip.s, "t5": m_t5.s},
        "peak_gb": {"load_text": max(m_clip.peak, m_t5.peak)},
        "rss_peak_gb": {"load_text": _max(m_clip.rss, m_t5.rss)},
        "weights_gb": {"clip": m_clip.added, "t5": m_t5.added},
    }
    method = "measured"
    if spec is not None and max_stage_s is not None and base.text_out is not None:
        calls, _ = profile.record_calls(encode)
        probe = profile.probe_linears(calls, dtype, sample_rows)
        predicted = base.text_s - base.text_linear_s + probe.seconds
        if predicted > max_stage_s:
            log(f"  text encoding projected: {predicted:.1f} s > {max_stage_s:.0f} s (quantized linears "
                f"{probe.seconds:.1f} s vs unquantized {base.text_linear_s:.1f} s)")
            out.update(text_s=predicted, text_method="projected", outputs=base.text_out)
            out["peak_gb"]["text"] = None
            out["rss_peak_gb"]["text"] = None
            clip = t5 = None  # noqa: F841 (frees the encoders; `encode` closes over them)
            return out
        method = f"measured (projection {predicted:.1f} s was under the limit)"
    with Mem() as m:
        mx.eval(encode())  # warm-up (first-call allocation, kernel compilation on GPU)

        def encode_now():
            out = encode()
            mx.eval(*out)
            return out

        times, (txt, pooled) = timed_runs(encode_now, 2)
    out.update(text_s=median(times), text_times_s=times, text_method=method, outputs=(txt, pooled))
    out["peak_gb"]["text"] = m.peak
    out["rss_peak_gb"]["text"] = m.rss
    if spec is None:
        base.text_s = out["text_s"]
        base.text_out = (txt, pooled)
        if measure_linears:
            calls, _ = profile.record_calls(encode)
            base.text_linear_s = profile.probe_linears(calls, dtype).seconds
            out["text_linear_s"] = base.text_linear_s
    clip = t5 = None  # noqa: F841 (frees the encoders; `encode` closes over them)
    return out


def _max(*xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# Transformer


def _mode_inputs(cfg, inputs, mode, dtype, img_ids):
    """What a mode adds to the latents at every step: nothing (txt2img), or Kontext's reference tokens
    with their ids, appended to the image sequence exactly as `Flux1.prepare_conditioning` builds them."""
    if mode == "txt2img":
        return conditioning.Conditioning()
    if mode == "kontext":
        ref = mx.array(inputs["reference"]).astype(dtype)
        return conditioning.Conditioning(tokens=(ref, conditioning.reference_ids(cfg.height, cfg.width)))
    raise ValueError(f"unknown mode {mode!r}")


def _transformer_stage(cfg, root, inputs, dtype, spec, ranks, txt, pooled, base: Baseline, steps, warmup,
                       max_stage_s, sample_rows, profile_blocks, log, modes=("txt2img",), breakdown=True):
    with Mem() as m_load:
        tr = loader.load_folder_component(root, "transformer", dtype, spec)
    weights = m_load.added
    sigmas = [float(s) for s in inputs["sigmas"]]
    x0 = mx.array(inputs["noise"]).astype(dtype)
    img_ids = sampler.image_ids(cfg.height, cfg.width)
    txt_ids = sampler.text_ids(cfg.txt_tokens)
    n = x0.shape[1]
    guidance = mx.array([3.5], dtype=mx.float32) if tr.params.guidance_embed else None
    per_mode = {}
    for mode in modes:  # as Flux1.denoise: the ids and RoPE tables once, the latents joined per step
        cond = _mode_inputs(cfg, inputs, mode, dtype, img_ids)
        inp0, ids = cond.model_input(x0, img_ids)
        pe = tr.position_embedding(ids, txt_ids)
        mx.eval(inp0, pe)
        per_mode[mode] = (cond, ids, pe, inp0)

    def make_step(cond, ids, pe):
        def step(x, i):
            t = mx.array([sigmas[i]], dtype=mx.float32)
            inp, _ = cond.model_input(x, img_ids)
            v = tr(inp, txt, pooled, t, ids, txt_ids, guidance=guidance, pe=pe)
            if cond.tokens is not None:
                v = v[:, :n]  # the reference tokens' outputs are dropped
            return sampler.euler_step(x, v, sigmas[i], sigmas[i + 1])
        return step

    for rank, mode in ((r, m) for r in ranks for m in modes):
        cond, ids, pe, inp0 = per_mode[mode]
        step = make_step(cond, ids, pe)
        ref_tokens = cond.tokens[0].shape[1] if cond.tokens is not None else 0
        row = {
            "impl": "ours", "lora_rank": rank, "mode": mode,
            "tokens": {"image": n, "reference": ref_tokens, "text": cfg.txt_tokens,
                       "sequence": n + ref_tokens + cfg.txt_tokens},
            "load_s": {"transformer": m_load.s},
            "peak_gb": {"load_transformer": m_load.peak},
            "rss_peak_gb": {"load_transformer": m_load.rss},
            "weights_gb": {"transformer": weights},
        }
        if rank and mode == modes[0]:  # one LoRA per rank, kept over the modes
            with Clock() as c:
                info = bench_lora.apply(tr, rank)
            lora_row = dict(lora_impl=info["lora_impl"], lora_layers=info["lora_layers"], lora_apply_s=c.s)
        if rank:
            row.update(lora_row)
        calls, build = profile.record_calls(lambda step=step: step(x0, 0))
        flops = calls.linear_flops() + calls.attention_flops()
        row["flops_per_step"] = flops
        bd = {}
        latents = None
        projected = False
        if spec is not None and max_stage_s is not None and (rank, mode) in base.step:
            b = base.step[(rank, mode)]
            probe = profile.probe_linears(calls, dtype, sample_rows)
            # The unquantized step less its linears (timed apart, so on tiny shapes their sum can pass the
            # step: the remainder is then 0, never negative), plus the quantized linears.
            rest = max(b["s"] - b["linear_s"], 0.0)
            predicted = rest + probe.seconds
            if predicted > max_stage_s:
                projected = True
                # The alternative CPU path (dequantize, then the dense GEMM), once per quantization.
                dq = (profile.probe_linears(calls, dtype, fn=profile.dequantized_matmul)
                      if rank == ranks[0] and mode == modes[0] else None)
                dq_step = rest + dq.seconds if dq else None
                log(f"  rank {rank}: step projected {predicted:.1f} s > {max_stage_s:.0f} s "
                    f"(quantized linears {probe.seconds:.1f} s vs unquantized {b['linear_s']:.1f} s"
                    + (f"; with dequantize+GEMM {dq_step:.1f} s)" if dq else ")"))
                row.update(step_s=predicted, step_times_s=[], step_method="projected",
                           step_linear_s=probe.seconds, step_linear_sampled_rows=sample_rows)
                row["peak_gb"]["step"] = b["peak"] - b["weights"] + weights  # same activations
                row["rss_peak_gb"]["step"] = None
                bd = {"kind": "quantized projection", "step_s": predicted, "base_step_s": b["s"],
                      "linear_detail": probe.detail, "dequant_gemm_detail": dq.detail if dq else None,
                      "base_linear_s": b["linear_s"], "quantized_linear_s": probe.seconds,
                      "dequant_gemm_linear_s": dq.seconds if dq else None,
                      "dequant_gemm_step_s": dq_step,
                      "linear_calls": probe.calls, "linear_groups": probe.groups}
        if not projected:
            times, cpu, others = [], [], []
            with Mem() as m, StepBufferCache() as buffers:  # as Flux1.denoise
                x = x0
                for i in range(warmup + steps):
                    with Clock() as c:
                        x = step(x, i)
                        mx.eval(x)
                    buffers.step_done()
                    times.append(c.s)
                    cpu.append(c.cpu)
                    others.append(c.others)
            latents = x
            row.update(step_s=median(times[warmup:]), step_times_s=times[warmup:],
                       step_cpu_s=cpu[warmup:], step_others_cpu_s=others[warmup:],
                       warmup_times_s=times[:warmup], step_method="measured")
            row["peak_gb"]["step"] = m.peak
            row["rss_peak_gb"]["step"] = m.rss
            log(f"  rank {rank}, {mode} ({row['tokens']['sequence']} tokens): step {row['step_s']:.3f} s "
                f"(median of {steps}; warm-up {', '.join(f'{t:.2f}' for t in times[:warmup])} s), "
                f"peak {m.peak:.2f} GB")
            if (spec is None and breakdown) or profile_blocks:
                bd = _breakdown(calls, build, row["step_s"], dtype, sample_rows)
                if spec is None:
                    base.step[(rank, mode)] = {"s": row["step_s"], "linear_s": bd["linear_s"], "peak": m.peak,
                                               "weights": weights}
                if rank:
                    bd["lora_paired"] = profile.probe_lora_overhead(calls, dtype)
                if profile_blocks and rank == 0:
                    bd["blocks_s"] = _per_block(tr, inp0, txt, pooled, sigmas, ids, txt_ids, guidance, pe)
        row["step_tflops"] = flops / row["step_s"] / 1e12 if row["step_s"] else None
        yield row, bd, latents
        if rank and mode == modes[-1]:
            bench_lora.remove(tr, info)
    tr = None  # noqa: F841
    _free()


def _breakdown(calls, build, step_s, dtype, sample_rows) -> dict:
    """Split a measured step: graph building (Python), linears, attention (RoPE + SDPA), the rest."""
    with StepBufferCache():  # the probes reuse their buffers as the steps do (no fresh pages per call)
        lin = profile.probe_linears(calls, dtype, sample_rows)
        attn = profile.probe_attention(calls, dtype)
        sdpa = profile.probe_sdpa(calls, dtype) if calls.attention else 0.0
        act = profile.probe_activations(calls, dtype)
    lf, af = calls.linear_flops(), calls.attention_flops()
    other = step_s - build - lin.seconds - attn - act
    return {
        "kind": "measured step",
        "step_s": step_s,
        "graph_build_s": build,
        "linear_s": lin.seconds,
        "linear_calls": lin.calls,
        "linear_groups": lin.groups,
        "linear_detail": lin.detail,
        "attention_s": attn,
        "sdpa_s": sdpa,
        "gelu_s": act,
        "other_s": other,
        "linear_flops": lf,
        "attention_flops": af,
        "linear_gflops": lf / lin.seconds / 1e9 if lin.seconds else None,
        "attention_gflops": af / attn / 1e9 if attn else None,
        "step_gflops": (lf + af) / step_s / 1e9,
        "gemm_gflops": _gemm_rate(calls, dtype),
    }


def _gemm_rate(calls, dtype) -> float | None:
    """The machine's dense GEMM rate at this step's token count and hidden width (a practical peak)."""
    if not calls.attention:
        return None
    q = calls.attention[0][0]  # (B, H, S, d)
    width = q[1] * q[3]
    return profile.gemm_rate(dtype, q[2], width, width)


def _per_block(tr, x0, txt, pooled, sigmas, img_ids, txt_ids, guidance, pe) -> dict:
    """One step, evaluated after each block (the transformer's own blocks, called in its order)."""
    dtype = x0.dtype
    out = {}
    t = mx.array([sigmas[0]], dtype=mx.float32)
    with Clock() as c:
        vec = tr.conditioning(t, pooled, guidance, dtype)
        img = tr.img_in(x0)
        h = tr.txt_in(txt.astype(dtype))
        mx.eval(vec, img, h)
    out["embed"] = c.s
    for i, block in enumerate(tr.double_blocks):
        with Clock() as c:
            img, h = block(img, h, vec, pe)
            mx.eval(img, h)
        out[f"double_blocks.{i}"] = c.s
    L = h.shape[1]
    x = mx.concatenate([h, img], axis=1)
    for i, block in enumerate(tr.single_blocks):
        with Clock() as c:
            x = block(x, vec, pe)
            mx.eval(x)
        out[f"single_blocks.{i}"] = c.s
    with Clock() as c:
        mx.eval(tr.final_layer(x[:, L:], vec))
    out["final_layer"] = c.s
    return out


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_stage(cfg, root, dtype, latents, warmup, decode: bool = True, reference_pixels=None) -> dict:
    """Load, then decode the latents to pixels (`decode`), and encode the Kontext reference's pixels to
    packed latents (`reference_pixels` given: Flux1.encode_image's math), each after `warmup` untimed runs."""
    with Mem() as m_load:
        vae = loader.load_folder_component(root, "vae", dtype)
    result = {"load_s": m_load.s, "peak_gb": {"load_vae": m_load.peak}, "rss_peak_gb": {"load_vae": m_load.rss},
              "weights_gb": m_load.added}
    if reference_pixels is not None:
        pixels = mx.array(reference_pixels).astype(dtype)
        with Mem() as m:
            times, _ = timed_runs(lambda: mx.eval(sampler.pack(vae.encode_latents(pixels))), 1 + warmup)
        result.update(encode_s=times[-1], encode_first_s=times[0])
        result["peak_gb"]["encode"] = m.peak
        result["rss_peak_gb"]["encode"] = m.rss
        del pixels
        _free()
    if not decode:
        vae = None  # noqa: F841
        _free()
        return result
    if latents is None:  # every step was projected: decode the initial noise instead (same cost)
        rng = np.random.default_rng(0)
        latents = mx.array(rng.standard_normal((1, cfg.img_tokens, cfg.transformer.in_channels), np.float32))
    tokens = latents.astype(dtype)

    def decode():
        z = vae.unscale_latents(sampler.unpack(tokens, cfg.height, cfg.width).astype(mx.float32))
        image = vae.decode(z.astype(dtype))[0].astype(mx.float32)
        return mx.clip(image / 2 + 0.5, 0.0, 1.0)

    with Mem() as m:
        times, _ = timed_runs(lambda: np.array(decode()), 1 + warmup)
    result.update(decode_s=times[-1], decode_first_s=times[0])
    result["peak_gb"]["decode"] = m.peak
    result["rss_peak_gb"]["decode"] = m.rss
    vae = None  # noqa: F841
    _free()
    return result
