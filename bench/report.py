"""Ratios and markdown tables from bench results.

`python -m bench.report a.json [b.json ...]` merges runs of the same configuration (e.g. ours and
diffusers measured in separate commands) and prints the tables; ratios are recomputed across files.
A setting measured in several files keeps the first file's row, or with `--clean` the row whose timed
steps had the least CPU taken by other processes (a re-run made because a test suite ran meanwhile).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("load_text", "text", "load_transformer", "step", "load_vae", "decode")
MODE_NAMES = {"txt2img": "text to image", "kontext": "Kontext"}


def _mode(row) -> str:
    """A row's mode; results written before modes existed are text to image."""
    return row.get("mode") or "txt2img"


def _key(row):
    return (row["precision"], row.get("quantize"), row["lora_rank"], _mode(row))


def add_ratios(result: dict) -> None:
    """ours / diffusers (same precision; same LoRA rank when diffusers has one), ours / unquantized,
    LoRA / no LoRA, each within one mode; and for a Kontext row (either side) Kontext / text to image,
    step time and step peak. A projected step gives a projected ratio."""
    rows = result["rows"]
    ref = {(r["precision"], r["lora_rank"], _mode(r)): r for r in rows if r["impl"] == "diffusers"}
    ours = {_key(r): r for r in rows if r["impl"] == "ours"}
    for r in rows:
        if r["impl"] != "ours":
            if _mode(r) != "txt2img":
                r["ratios"] = _vs_txt2img(r, ref.get((r["precision"], r["lora_rank"], "txt2img")))
            continue
        ratios = {}
        same = ref.get((r["precision"], r["lora_rank"], _mode(r)))
        plain = ref.get((r["precision"], 0, _mode(r)))
        target = same or plain
        if target and r.get("step_s") and target.get("step_s"):
            ratios["step_vs_diffusers"] = r["step_s"] / target["step_s"]
            ratios["step_vs_diffusers_basis"] = (f"diffusers LoRA rank {r['lora_rank']}" if same and r["lora_rank"]
                                                 else "diffusers without LoRA")
        if plain:
            for k in ("text_s", "decode_s"):
                if r.get(k) and plain.get(k):
                    ratios[k.replace("_s", "_vs_diffusers")] = r[k] / plain[k]
            ol, rl = r.get("load_s", {}), plain.get("load_s", {})
            if ol.get("transformer") and rl.get("transformer"):
                ratios["load_transformer_vs_diffusers"] = ol["transformer"] / rl["transformer"]
            if ol.get("total") and rl.get("total"):
                ratios["load_total_vs_diffusers"] = ol["total"] / rl["total"]
            if r.get("encode_s") and plain.get("encode_s"):
                ratios["encode_vs_diffusers"] = r["encode_s"] / plain["encode_s"]
            op, rp = (r.get("peak_gb") or {}).get("step"), (plain.get("peak_gb") or {}).get("step")
            if op and rp and not r.get("quantize") and not r["lora_rank"]:
                ratios["peak_step_vs_diffusers"] = op / rp
        unq = ours.get((r["precision"], None, r["lora_rank"], _mode(r)))
        if r.get("quantize") and unq and unq.get("step_s"):
            ratios["step_vs_unquantized"] = r["step_s"] / unq["step_s"]
        nolora = ours.get((r["precision"], r.get("quantize"), 0, _mode(r)))
        if r["lora_rank"] and nolora and nolora.get("step_s"):
            ratios["step_vs_no_lora"] = r["step_s"] / nolora["step_s"]
        if _mode(r) != "txt2img":
            ratios.update(_vs_txt2img(r, ours.get((r["precision"], r.get("quantize"), r["lora_rank"], "txt2img"))))
        r["ratios"] = ratios
        # FLOPs are those of the unquantized math whatever the weight format: take the largest count
        # recorded for this LoRA rank and mode (a run's recorder may not see every layer class).
        flops = max((o.get("flops_per_step") or 0 for o in ours.values()
                     if o["lora_rank"] == r["lora_rank"] and _mode(o) == _mode(r)), default=0)
        if flops and r.get("step_s"):
            r["step_tflops"] = flops / r["step_s"] / 1e12


def _vs_txt2img(r: dict, t2i: dict | None) -> dict:
    """Kontext / text to image for the same implementation and setting: step time, step peak memory."""
    out = {}
    if t2i is None:
        return out
    if r.get("step_s") and t2i.get("step_s"):
        out["step_vs_txt2img"] = r["step_s"] / t2i["step_s"]
    a, b = (r.get("peak_gb") or {}).get("step"), (t2i.get("peak_gb") or {}).get("step")
    if a and b:
        out["peak_step_vs_txt2img"] = a / b
    return out


def _f(x, digits=2, unit=""):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.{digits}f}{unit}"


def _ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def _cores(r) -> str:
    """CPU seconds per wall second over the timed steps: cores the step had / cores others took."""
    cpu, wall, others = r.get("step_cpu_s"), r.get("step_times_s"), r.get("step_others_cpu_s")
    if not cpu or not wall:
        return "–"
    out = f"{sum(cpu) / sum(wall):.2f}"
    if others and all(o is not None for o in others):
        out += f" / {sum(others) / sum(wall):.2f}"
    return out


def _setting(r) -> str:
    q = r.get("quantize") or ("bf16" if r["precision"] == "bfloat16" else
                              "fp16" if r["precision"] == "float16" else "fp32")
    if r.get("quantize"):
        q = f"{q} ({'bf16' if r['precision'] == 'bfloat16' else r['precision']} act.)"
    q += f" + LoRA r{r['lora_rank']}" if r["lora_rank"] else ""
    return q + (f", {MODE_NAMES.get(_mode(r), _mode(r))}" if _mode(r) != "txt2img" else "")


def markdown(result: dict) -> str:
    cfg = result["config"]
    env = result["env"]
    renv = result.get("reference_env", {})
    lines = [f"### `{cfg['name']}`: {cfg['height']}x{cfg['width']}, {cfg['img_tokens']} image + "
             f"{cfg['txt_tokens']} T5 tokens, {cfg['transformer']['depth']} double + "
             f"{cfg['transformer']['depth_single']} single blocks"
             + (f"; Kontext: + {cfg['img_tokens']} reference tokens"
                if any(_mode(r) == "kontext" for r in result["rows"]) else ""), ""]
    for command in result.get("commands") or [result["command"]]:
        lines.append(f"- command: `{command}`")
    lines.append(f"- device: {env.get('mlx_device')} ({env.get('device')}, {env.get('cpu')}, "
                 f"{env.get('cores')} cores); "
                 f"MLX {env.get('mlx')}; OpenBLAS preloaded: {'yes' if env.get('openblas_preloaded') else 'no'}; "
                 f"load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}; {env.get('date')}")
    if env.get("blas"):
        lines.append(f"- ours: BLAS {env['blas']}; OpenBLAS threads {env.get('blas_threads')} "
                     f"(OPENBLAS_NUM_THREADS={env.get('openblas_num_threads_env')})")
    if renv:
        lines.append(f"- diffusers {renv.get('diffusers')}, transformers {renv.get('transformers')}, torch "
                     f"{renv.get('torch')} on {renv.get('device')}, {renv.get('threads')} torch threads"
                     + (f"; {_torch_blas(renv)}" if "sgemm_provider" in renv else ""))
    elif result.get("reference_skipped"):
        lines.append(f"- diffusers side skipped: {result['reference_skipped']}")
    if result.get("reference_error"):
        lines.append(f"- diffusers side failed: {result['reference_error'][:300]}")
    alt = result.get("alternate")
    if alt and alt.get("ratio_median") is not None:
        lines.append(f"- step ratio ours / diffusers, {alt['rounds']} alternating rounds (both processes resident, "
                     f"{alt['precision']}, txt2img): median {alt['ratio_median']:.2f}x, "
                     f"min-max {alt['ratio_min']:.2f}-{alt['ratio_max']:.2f}x"
                     + (f" ◊ busy machine (others > {BUSY_OTHERS_CORES} cores in a step)" if alt.get("busy") else ""))
    elif alt and alt.get("error"):
        lines.append(f"- alternating rounds failed: {alt['error']}")
    s = result["settings"]
    if not result.get("commands"):
        lines.append(f"- {s['steps']} timed steps (median) after {s['warmup']} warm-up; weights on disk "
                     f"{s['weights_dtype']}, diffusers layout")
    lines.append("")
    lines.append("| impl | setting | step s | vs diffusers | vs unquantized | vs no LoRA | TFLOP/s | "
                 "cores: ours / others | "
                 "text s | decode s | load s (transformer / T5 / CLIP / VAE) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    projected = False
    busy_rows = []
    for r in result["rows"]:
        ra = r.get("ratios", {})
        step = _f(r.get("step_s"), 3)
        if r.get("step_method") == "projected":
            step += " †"
            projected = True
        reasons = r["busy"] if "busy" in r else busy(r, env)
        if reasons:
            step += " ◊"
            busy_rows.append(f"{r['impl']} {_setting(r)}: {'; '.join(reasons)}")
        vs = _ratio(ra.get("step_vs_diffusers"))
        if ra.get("step_vs_diffusers_basis") == "diffusers without LoRA" and r["lora_rank"]:
            vs += " ‡"
        text = _f(r.get("text_s"), 3) + (" †" if r.get("text_method") == "projected" else "")
        if ra.get("text_vs_diffusers"):
            text += f" ({_ratio(ra['text_vs_diffusers'])})"
        dec = _f(r.get("decode_s"), 3)
        if ra.get("decode_vs_diffusers"):
            dec += f" ({_ratio(ra['decode_vs_diffusers'])})"
        ld = r.get("load_s", {})
        load = " / ".join(_f(ld.get(k), 2) for k in ("transformer", "t5", "clip", "vae"))
        if ra.get("load_transformer_vs_diffusers"):
            load += f" ({_ratio(ra['load_transformer_vs_diffusers'])} transformer)"
        if r.get("decode_from_other_run"):
            dec += " §"
        lines.append(f"| {r['impl']} | {_setting(r)} | {step} | {vs} | {_ratio(ra.get('step_vs_unquantized'))} | "
                     f"{_ratio(ra.get('step_vs_no_lora'))} | {_f(r.get('step_tflops'), 3)} | {_cores(r)} | "
                     f"{text} | {dec} | "
                     f"{load} |")
    lines.append("")
    notes = []
    if projected:
        notes.append("† projected, not run: the unquantized measured time minus its linears' time plus the "
                     "quantized linears' time, each timed in isolation (quantized ones on "
                     f"{s.get('sample_rows')} sampled rows, scaled); see the breakdown")
    if any(r.get("ratios", {}).get("step_vs_diffusers_basis") == "diffusers without LoRA" and r["lora_rank"]
           for r in result["rows"]):
        notes.append("‡ against diffusers without LoRA (peft, which diffusers' LoRA needs, is not installed)")
    if any(r.get("decode_from_other_run") for r in result["rows"]):
        notes.append("§ VAE stage (never quantized, no LoRA) taken from another run at the same precision")
    if busy_rows:
        notes.append(f"◊ busy machine, not a clean measurement (other processes > {BUSY_OTHERS_CORES} cores in a "
                     f"timed step, or a 1-minute load average > {BUSY_LOADAVG_PER_CORE} per core at the start): "
                     + " | ".join(busy_rows))
    lines += [f"{n}  " for n in notes]
    if notes:
        lines.append("")
    lines.append("Peak memory per stage, GB (MLX `get_peak_memory`, reset per stage; diffusers: "
                 "`max_memory_allocated` on CUDA, process RSS high-water on CPU); resident weights, GB:")
    lines.append("")
    lines.append("| impl | setting | load text | text | load transformer | step | load VAE | decode | "
                 "weights transformer / T5 / CLIP / VAE |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        pk = r.get("peak_gb") or {}
        w = r.get("weights_gb") or {}
        cells = [_f(pk.get(k), 2) for k in STAGES]
        if r.get("step_method") == "projected" and pk.get("step") is not None:
            cells[3] += " †"
        wt = " / ".join(_f(w.get(k), 2) for k in ("transformer", "t5", "clip", "vae")) if w else "–"
        lines.append(f"| {r['impl']} | {_setting(r)} | " + " | ".join(cells) + f" | {wt} |")
    lines.append("")
    bds = result.get("breakdowns", [])
    if bds:
        lines.append("Where the step time goes (linears and attention timed in isolation at the step's shapes):")
        lines.append("")
        lines.append("| setting | step s | graph build (Python) | linears | attention (RoPE+SDPA) | of which SDPA | "
                     "tanh-GELU | rest (norms, modulation, copies) | linear GFLOP/s | GEMM GFLOP/s | step GFLOP/s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for b in bds:
            name = _setting({"precision": b["precision"], "quantize": b.get("quantize"), "lora_rank": b["lora_rank"],
                             "mode": b.get("mode")})
            if b["kind"] == "measured step":
                st = b["step_s"]

                def pct(x, st=st):
                    return f"{_f(x, 3)} ({100 * x / st:.0f}%)" if x is not None else "–"

                lines.append(f"| {name} | {_f(st, 3)} | {pct(b['graph_build_s'])} | {pct(b['linear_s'])} | "
                             f"{pct(b['attention_s'])} | {pct(b['sdpa_s'])} | {pct(b.get('gelu_s'))} | "
                             f"{pct(b['other_s'])} | "
                             f"{_f(b['linear_gflops'], 1)} | {_f(b['gemm_gflops'], 1)} | {_f(b['step_gflops'], 1)} |")
            else:
                lines.append(f"| {name} † | {_f(b['step_s'], 1)} | – | {_f(b['quantized_linear_s'], 1)} "
                             f"(unquantized {_f(b['base_linear_s'], 2)}; dequantize+GEMM "
                             f"{_f(b['dequant_gemm_linear_s'], 2)} → step {_f(b['dequant_gemm_step_s'], 2)}) "
                             "| – | – | – | – | – | – | – |")
        lines.append("")
        for b in bds:
            lp = b.get("lora_paired")
            if lp:
                lines.append(f"LoRA rank {b['lora_rank']} side path ({b['precision']}"
                             f"{', ' + b['quantize'] if b.get('quantize') else ''}), paired probe of the "
                             f"{lp['layers']} wrapped linear calls (each timed alternately with and without its "
                             f"side path): {lp['linears_with_lora_s']:.2f} s vs {lp['linears_without_lora_s']:.2f} s, "
                             f"+{lp['overhead_s']:.2f} s per step (+{100 * lp['overhead_s'] / b['step_s']:.1f}% of "
                             f"the measured step).")
                lines.append("")
        for b in bds:
            if b.get("blocks_s"):
                blocks = ", ".join(f"{k} {v:.3f}" for k, v in b["blocks_s"].items())
                name = _setting({"precision": b["precision"], "quantize": b.get("quantize"),
                                 "lora_rank": b["lora_rank"], "mode": b.get("mode")})
                lines.append(f"Per block, s ({name}): {blocks}")
                lines.append("")
    lines += kontext_table(result)
    an = result.get("analytic", {})
    if an.get("full_1024"):
        f = an["full_1024"]
        rec, cf = f["recorded"], f["closed_form"]
        lines.append(f"FLOPs per step, full FLUX.1 at 1024x1024 + {f['txt_tokens']} T5 tokens: "
                     f"{rec['total'] / 1e12:.2f} TFLOP counted from the code's {f['linear_calls']} linear and "
                     f"{f['attention_calls']} attention calls (linears {rec['linear'] / 1e12:.2f}, attention "
                     f"{rec['attention'] / 1e12:.2f}); closed form {cf['total'] / 1e12:.2f}. This config: "
                     f"{an['this_config']['total'] / 1e12:.3f} TFLOP per step"
                     + (f" ({an['this_config_kontext']['total'] / 1e12:.3f} with Kontext's reference tokens)"
                        if an.get("this_config_kontext") else "") + ".")
        lines.append("")
    return "\n".join(lines)


def kontext_table(result: dict) -> list[str]:
    """Kontext beside text to image, per implementation and setting: sequence, step time and step peak,
    with Kontext / text to image on each side and ours / diffusers in each mode. Empty without Kontext rows."""
    rows = result["rows"]
    if not any(_mode(r) == "kontext" for r in rows):
        return []
    by = {(r["impl"], *_key(r)): r for r in rows}
    lines = ["Kontext beside text to image (the same step with the reference image's tokens appended: "
             "sequence = image x 2 + text); peak = the step stage's peak memory, GB:", "",
             "| impl | setting | tokens txt2img / Kontext | step s txt2img | step s Kontext | Kontext / txt2img | "
             "peak txt2img | peak Kontext | Kontext / txt2img | step ours / diffusers: txt2img / Kontext | "
             "reference encode s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if _mode(r) != "kontext":
            continue
        t = by.get((r["impl"], r["precision"], r.get("quantize"), r["lora_rank"], "txt2img")) or {}
        ra, rt = r.get("ratios", {}), t.get("ratios", {})
        tok = f"{(t.get('tokens') or {}).get('sequence', '–')} / {(r.get('tokens') or {}).get('sequence', '–')}"
        pk_t, pk_k = (t.get("peak_gb") or {}).get("step"), (r.get("peak_gb") or {}).get("step")
        if r["impl"] == "ours":
            vs = f"{_ratio(rt.get('step_vs_diffusers'))} / {_ratio(ra.get('step_vs_diffusers'))}"
        else:
            vs = "–"
        enc = _f(r.get("encode_s"), 3)
        if ra.get("encode_vs_diffusers"):
            enc += f" ({_ratio(ra['encode_vs_diffusers'])})"
        label = _setting({**r, "mode": "txt2img"})
        lines.append(f"| {r['impl']} | {label} | {tok} | {_f(t.get('step_s'), 3)} | {_f(r.get('step_s'), 3)} | "
                     f"**{_ratio(ra.get('step_vs_txt2img'))}** | {_f(pk_t, 2)} | {_f(pk_k, 2)} | "
                     f"**{_ratio(ra.get('peak_step_vs_txt2img'))}** | {vs} | {enc} |")
    lines.append("")
    return lines


def _quant_order(q: str | None) -> tuple:
    """Unquantized first, then by decreasing bits (q8 before q4), then modes by name."""
    if q is None:
        return (0, 0, "")
    digits = "".join(c for c in q if c.isdigit())
    return (1, -int(digits) if digits else 0, q)


BUSY_OTHERS_CORES = 0.2  # other processes' cores (CPU s per wall s) in any timed step
BUSY_LOADAVG_PER_CORE = 0.25  # the run's 1-minute load average at its start, per core (0.5 on 2 cores)


def busy(row: dict, env: dict) -> list[str]:
    """Why a row's step was measured on a busy machine (empty: it was not): other processes took more
    than BUSY_OTHERS_CORES cores during one of its timed steps, or the 1-minute load average at the
    run's start was above BUSY_LOADAVG_PER_CORE per core. (The reference process' own start load
    average is not used: our side just ran, so it is always high.)"""
    reasons = []
    wall, others = row.get("step_times_s") or [], row.get("step_others_cpu_s") or []
    per_step = [o / w for o, w in zip(others, wall, strict=False) if o is not None and w]
    if per_step and max(per_step) > BUSY_OTHERS_CORES:
        reasons.append(f"others took {max(per_step):.2f} cores in a timed step")
    la, cores = env.get("loadavg_start"), env.get("cores") or 1
    if la and la[0] > BUSY_LOADAVG_PER_CORE * cores:
        reasons.append(f"load average {la[0]} at the start ({cores} cores)")
    return reasons


def flag_busy(result: dict) -> None:
    """Every row's `busy` reasons (an empty list: a clean measurement), in place."""
    for r in result["rows"]:
        r["busy"] = busy(r, result["env"])


def _torch_blas(renv: dict) -> str:
    sgemm = renv.get("sgemm_provider")
    text = (f"torch BLAS {renv.get('torch_blas_build')} (MKL {'yes' if renv.get('torch_mkl') else 'no'}), "
            f"`sgemm_` from {Path(sgemm).name if sgemm else '?'}")
    if renv.get("openblas_for_sgemm"):
        text += " (an OpenBLAS, not torch's own: the ratios are not fair)"
    return text


def contention(row: dict) -> float:
    """Cores other processes took per wall second over a row's timed steps (inf when unknown)."""
    wall, others = row.get("step_times_s"), row.get("step_others_cpu_s")
    if not wall or not others or any(o is None for o in others):
        return float("inf")
    return sum(others) / sum(wall)


def merge(results: list[dict], clean: bool = False) -> dict:
    """Several runs of one configuration -> one result (rows concatenated; first run's header).

    A setting in several files: the first file's row, or with `clean` the least contended one."""
    out = dict(results[0])
    seen, rows, kept_from = set(), [], {}
    chosen, chosen_row = {}, {}  # with `clean`: key -> index of the file whose row is kept
    if clean:
        for i, res in enumerate(results):
            for r in res["rows"]:
                key = (r["impl"], *_key(r))
                if key not in chosen or contention(r) < contention(chosen_row[key]):
                    chosen[key], chosen_row[key] = i, r
    for i, res in enumerate(results):  # a setting measured in several files: the first file's row is kept
        for r in res["rows"]:
            key = (r["impl"], *_key(r))
            if clean and chosen.get(key) != i:
                continue
            if key not in seen:
                seen.add(key)
                rows.append(r)
                kept_from[key[1:]] = i if r["impl"] == "ours" else kept_from.get(key[1:])
    rows.sort(key=lambda r: (r["impl"] != "ours", r["precision"], _quant_order(r.get("quantize")), r["lora_rank"],
                             _mode(r) != "txt2img", _mode(r)))
    # The VAE stage does not depend on quantization or LoRA: a run made with --no-decode borrows it
    # from another run of the same implementation and precision.
    vae_keys = ("decode_s", "decode_first_s")
    every_row = [r for res in results for r in res["rows"]]  # in file order, duplicates included
    for r in rows:
        if r.get("decode_s") is None:
            donor = next((d for d in every_row if d.get("decode_s") is not None and d["impl"] == r["impl"]
                          and d["precision"] == r["precision"]), None)
            if donor:
                for k in vae_keys:
                    r[k] = donor.get(k)
                for group, keys in (("load_s", ("vae",)), ("peak_gb", ("load_vae", "decode")),
                                    ("rss_peak_gb", ("load_vae", "decode")), ("weights_gb", ("vae",))):
                    if isinstance(donor.get(group), dict) and isinstance(r.get(group), dict):
                        for k in keys:
                            r[group][k] = donor[group].get(k)
                ld = r.get("load_s") or {}
                ld["total"] = sum(v for k, v in ld.items() if k != "total" and v is not None)
                r["decode_from_other_run"] = True
    out["rows"] = rows
    seen, bds = set(), []
    for i, res in enumerate(results):  # only the breakdowns of the rows kept, from the same file
        for b in res.get("breakdowns", []):
            key = (b["precision"], b.get("quantize"), b["lora_rank"], _mode(b), b["kind"])
            if key not in seen and kept_from.get(key[:4]) == i:
                seen.add(key)
                bds.append(b)
    bds.sort(key=lambda b: (b["precision"], b.get("quantize") is not None, str(b.get("quantize")), b["lora_rank"],
                            _mode(b) != "txt2img"))
    out["breakdowns"] = bds
    for res in results:
        if res.get("reference_env"):
            out["reference_env"] = res["reference_env"]
    out["commands"] = [res["command"] for res in results]
    starts = [res["env"].get("loadavg_start") for res in results]
    ends = [res["env"].get("loadavg_end") for res in results]
    out["env"] = {**out["env"], "loadavg_start": starts[0], "loadavg_end": ends[-1]}
    return out


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    clean = "--clean" in args
    paths = [a for a in args if a != "--clean"]
    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = merge(results, clean=clean)
    add_ratios(merged)
    print(markdown(merged))


if __name__ == "__main__":
    main()
