"""Step time of a GGUF transformer (Q4_K, Q8_0) against our own `-q 4` / `-q 8` and the float model.

`python -m bench.gguf_speed --config mid --height 512 --width 512 --steps 3 --warmup 1`

Settings (`--settings`, default all):
- `float`: the bench folder's transformer (random weights, `bench.weights.write_folder`, the folder
  `python -m bench` uses) at the compute precision (`--precision`, default float32 on CPU);
- `q8`, `q4`: the same folder quantized while loading (`-q 8`, `-q 4`: MLX affine, group 64);
- `gguf-q8_0`, `gguf-q4k`: a GGUF in city96's layout at the configuration's transformer shapes, written by
  `tests/fixtures/make_tiny_gguf.py`'s `write_synthetic_transformer_gguf` (random weights; profile
  `q8_0`: every quantized tensor Q8_0; profile `q4k`: Q4_K wherever the input width is a multiple of 256,
  Q4_1 elsewhere; as city96 writes them, the embedders, `txt_in`, `img_in` and `final_layer` F16, 1-D and
  small tensors F32), loaded through our real loader (`flux_1.loading.gguf.load_gguf_component`): Q8_0
  and Q4_K are repacked into MLX affine quantization at group 32 (8 and 4 bits), so they run the same
  quantized-matmul kernels as `-q 8` / `-q 4`, at half the group size (twice the scales and biases).

Each transformer is loaded alone (the previous one freed) and stepped as `bench/ours.py` and
`Flux1.denoise` step it: the same inputs for all (`bench.common.make_inputs`: noise, sigmas; random T5
and CLIP outputs at the configuration's token count), Euler steps, `mx.eval` after each step, `--warmup`
unmeasured steps then the median of `--steps`. Written: a JSON (`--output-json`) and a markdown table
(`--markdown`), with the load average and the CPU time other processes took during the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gguf_speed.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402,F401  (sys.path for flux_1 in a plain checkout)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("float", "q8", "q4", "gguf-q8_0", "gguf-q4k")
GGUF_PROFILES = {"gguf-q8_0": "q8_0", "gguf-q4k": "q4k"}
GGUF_MARKER = "gguf-speed.json"


def fixtures():
    """tests/fixtures/make_tiny_gguf.py (the city96-layout GGUF writers)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fixtures import make_tiny_gguf as mk

    return mk


@contextmanager
def extra_profiles():
    """make_tiny_gguf's profiles plus `q8_0` (every quantized tensor Q8_0, quantized with gguf-py from the
    weights: lossless to repack) and `q4_1` (every quantized tensor Q4_1, likewise), for as long as the
    block runs (the fixture's own table is left as it was)."""
    from gguf import GGMLQuantizationType as T

    mk = fixtures()
    added = {name: ((t,), (t,)) for name, t in (("q8_0", T.Q8_0), ("q4_1", T.Q4_1)) if name not in mk.PROFILES}
    mk.PROFILES.update(added)
    try:
        yield mk
    finally:
        for name in added:
            mk.PROFILES.pop(name, None)


def gguf_sizes(p) -> dict:
    """`bfl_transformer_shapes` keywords for a FluxParams."""
    return dict(hidden=p.hidden_size, heads=p.num_heads, mlp=p.mlp_hidden, depth=p.depth, depth_single=p.depth_single,
                in_channels=p.in_channels, out_channels=p.out_channels, context_dim=p.context_dim, vec_dim=p.vec_dim,
                guidance=p.guidance_embed, time_dim=p.time_dim)


def write_gguf(cfg, folder: Path, profile: str, log=print) -> tuple[Path, dict]:
    """The synthetic GGUF of this configuration and profile (reused when already written); {type: count}."""
    from collections import Counter

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.name}-{profile}.gguf"
    marker = folder / f"{cfg.name}-{profile}.{GGUF_MARKER}"
    sizes = gguf_sizes(cfg.transformer)
    if path.exists() and marker.exists() and json.loads(marker.read_text()).get("sizes") == sizes:
        log(f"reusing {path}")
        return path, json.loads(marker.read_text())["types"]
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with extra_profiles() as mk:
        types = dict(Counter(mk.write_synthetic_transformer_gguf(path, profile, **sizes).values()))
    marker.write_text(json.dumps({"sizes": sizes, "types": types}))
    log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s): {types}")
    return path, types


def bfl_name(ours: str) -> str:
    """Our transformer parameter name -> the BFL / city96 GGUF name (the inverse of tables.BFL_TRANSFORMER
    and BFL_PARAM_RENAMES)."""
    name = re.sub(r"_mlp\.layers\.(\d)\.", r"_mlp.\1.", ours)
    name = name.replace("final_layer.adaLN_modulation.layers.1.", "final_layer.adaLN_modulation.1.")
    return re.sub(r"(query_norm|key_norm)\.weight$", r"\1.scale", name)


def gguf_from_folder(root: Path, out: Path, profile: str = "q8_0", log=print) -> dict[str, int]:
    """A city96-layout GGUF of a model folder's own transformer weights, typed by make_tiny_gguf's rule and
    `profile`; only profiles of 32-value block types (`q8_0`, `q4_1`, ...): gguf-py quantizes those from the
    weights (it cannot quantize K-quants). Loaded at float32 (exact for the bench folders' bfloat16 and for
    float32 checkpoints), converted one tensor at a time. Returns {type: count}."""
    from collections import Counter

    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize
    from mlx.utils import tree_flatten

    from flux_1.loading import folder as loader

    tr = loader.load_folder_component(Path(root), "transformer", mx.float32)
    writer = GGUFWriter(str(out), arch="flux")
    writer.add_quantization_version(2)
    writer.add_file_type(1)
    counters: dict = {}
    types = Counter()
    with extra_profiles() as mk:
        for ours, value in sorted(tree_flatten(tr.parameters())):
            name = bfl_name(ours)
            w = np.array(value.astype(mx.float32))
            qtype = mk.transformer_type(name, w.shape, profile, counters)
            if qtype == T.F32:
                data = w
            elif qtype == T.F16:
                data = w.astype(np.float16)
            elif qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
                data = quantize(w, qtype)
            else:
                raise ValueError(f"profile {profile!r} gives {qtype.name} for {name}: gguf-py cannot quantize it")
            writer.add_tensor(name, data, raw_dtype=qtype)
            types[qtype.name] += 1
    del tr
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB): {dict(types)}")
    return dict(types)


def layer_mix(model) -> dict[str, int]:
    """{"8-bit g32": n, "float32": n, ...} over the linear layers (and embeddings) of a model."""
    import mlx.nn as nn

    counts: dict[str, int] = {}
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            key = f"{m.bits}-bit g{m.group_size}" if getattr(m, "mode", "affine") == "affine" else m.mode
        elif isinstance(m, nn.Linear):
            key = str(m.weight.dtype).removeprefix("mlx.core.")
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _free():
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def load(setting: str, cfg, weights_dir: Path, gguf_dir: Path, dtype, log=print):
    from flux_1 import quantization as q
    from flux_1.loading import folder as loader
    from flux_1.loading.gguf import load_gguf_component

    info = {}
    if setting in GGUF_PROFILES:
        path, types = write_gguf(cfg, gguf_dir, GGUF_PROFILES[setting], log)
        info.update(gguf_file=str(path), gguf_file_gb=path.stat().st_size / 1e9, gguf_types=types)
        return (lambda: load_gguf_component(path, "transformer", dtype)), info
    spec = {"float": None, "q8": q.QuantSpec(bits=8), "q4": q.QuantSpec(bits=4)}[setting]
    return (lambda: loader.load_folder_component(weights_dir, "transformer", dtype, spec)), info


def time_steps(tr, cfg, inputs, txt, pooled, dtype, steps: int, warmup: int) -> dict:
    """Euler steps as Flux1.denoise takes them (txt2img), `mx.eval` after each; times of each step."""
    import mlx.core as mx

    from flux_1.pipeline import sampler

    from .common import Clock, median

    sigmas = [float(s) for s in inputs["sigmas"]]
    x = mx.array(inputs["noise"]).astype(dtype)
    img_ids = sampler.image_ids(cfg.height, cfg.width)
    txt_ids = sampler.text_ids(cfg.txt_tokens)
    guidance = mx.array([3.5], dtype=mx.float32) if tr.params.guidance_embed else None
    pe = tr.position_embedding(img_ids, txt_ids)
    mx.eval(pe)
    times, others = [], []
    for i in range(warmup + steps):
        with Clock() as c:
            t = mx.array([sigmas[i]], dtype=mx.float32)
            v = tr(x, txt, pooled, t, img_ids, txt_ids, guidance=guidance, pe=pe)
            x = sampler.euler_step(x, v, sigmas[i], sigmas[i + 1])
            mx.eval(x)
        times.append(c.s)
        others.append(c.others)
    return {"step_s": median(times[warmup:]), "step_times_s": times[warmup:], "warmup_times_s": times[:warmup],
            "others_cpu_s": others[warmup:], "finite": bool(mx.isfinite(x).all().item())}


def run(args, log=print) -> dict:
    import mlx.core as mx
    import numpy as np

    from flux_1.components import PRECISIONS, default_precision

    from . import configs
    from . import weights as bench_weights
    from .common import cpu_name, loadavg, make_inputs, openblas_preloaded

    cfg = configs.get(args.config)
    cfg = dataclasses.replace(cfg, height=args.height or cfg.height, width=args.width or cfg.width)
    precision = args.precision or default_precision()
    dtype = PRECISIONS[precision]
    weights_dir = Path(args.weights_dir or f"/tmp/flux-bench-{cfg.name}")
    gguf_dir = Path(args.gguf_dir or f"/tmp/flux-bench-gguf-{cfg.name}")
    if any(s not in GGUF_PROFILES for s in args.settings):
        bench_weights.write_folder(cfg, weights_dir, log=log)
    for s in args.settings:  # written before anything is timed
        if s in GGUF_PROFILES:
            write_gguf(cfg, gguf_dir, GGUF_PROFILES[s], log)
    inputs = make_inputs(cfg, args.warmup + args.steps, seed=0)
    rng = np.random.default_rng(1)
    txt = rng.standard_normal((1, cfg.txt_tokens, cfg.transformer.context_dim)).astype(np.float32)
    txt = mx.array(txt).astype(dtype)
    pooled = mx.array(rng.standard_normal((1, cfg.transformer.vec_dim)).astype(np.float32)).astype(dtype)
    report = {
        "tool": "python -m bench.gguf_speed", "argv": sys.argv[1:],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "device": str(mx.default_device()), "mlx": mx.__version__,
                    "openblas": openblas_preloaded(), "load_average_start": loadavg()},
        "config": cfg.describe(), "precision": precision, "steps": args.steps, "warmup": args.warmup, "rows": [],
    }
    for setting in args.settings:
        make, info = load(setting, cfg, weights_dir, gguf_dir, dtype, log)
        _free()
        mx.reset_peak_memory()
        active0 = mx.get_active_memory()
        t0 = time.perf_counter()
        tr = make()
        mx.eval(tr.parameters())
        load_s = time.perf_counter() - t0
        weights_gb = (mx.get_active_memory() - active0) / 1e9
        load_peak = mx.get_peak_memory() / 1e9
        mix = layer_mix(tr)
        log(f"[{setting}] loaded in {load_s:.1f} s, {weights_gb:.2f} GB resident; linears: {mix}")
        mx.reset_peak_memory()
        row = {"setting": setting, **info, "load_s": load_s, "weights_gb": weights_gb, "load_peak_gb": load_peak,
               "linears": mix, "load_average_before": loadavg()}
        row.update(time_steps(tr, cfg, inputs, txt, pooled, dtype, args.steps, args.warmup))
        row["step_peak_gb"] = mx.get_peak_memory() / 1e9
        row["load_average_after"] = loadavg()
        log(f"[{setting}] step {row['step_s']:.3f} s (median of {args.steps}: "
            f"{', '.join(f'{t:.2f}' for t in row['step_times_s'])}; warm-up "
            f"{', '.join(f'{t:.2f}' for t in row['warmup_times_s'])}), load average {row['load_average_after']}")
        report["rows"].append(row)
        del tr
        _free()
    report["machine"]["load_average_end"] = loadavg()
    base = {r["setting"]: r["step_s"] for r in report["rows"]}
    for r in report["rows"]:
        r["vs_float"] = r["step_s"] / base["float"] if base.get("float") else None
        twin = {"gguf-q8_0": "q8", "gguf-q4k": "q4"}.get(r["setting"])
        r["vs_ours"] = r["step_s"] / base[twin] if twin in base and base[twin] else None
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    print(md)
    return report


LABELS = {"float": "{precision} (folder)", "q8": "`-q 8` (affine 8-bit, group 64)",
          "q4": "`-q 4` (affine 4-bit, group 64)", "gguf-q8_0": "GGUF Q8_0 (repacked: 8-bit, group 32)",
          "gguf-q4k": "GGUF Q4_K (+Q4_1) (repacked: 4-bit, group 32)"}


def _x(ratio) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def markdown(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    lines = [
        f"- config `{cfg['name']}` ({cfg['note']}), {cfg['width']}x{cfg['height']} ({cfg['img_tokens']} image + "
        f"{cfg['txt_tokens']} text tokens), {report['precision']} activations; {report['warmup']} warm-up + "
        f"{report['steps']} measured steps each, median",
        f"- machine: {m['cpu']}, {m['device']}, MLX {m['mlx']}, OpenBLAS {'yes' if m['openblas'] else 'no'}; "
        f"load average {m['load_average_start']} -> {m['load_average_end']}; {report['date']}",
        "",
        "| setting | step s | steps s | vs float | vs ours at same bits | linears | resident weights GB | load s | "
        "load avg after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        label = LABELS[r["setting"]].format(precision=report["precision"])
        mix = ", ".join(f"{k} x{n}" for k, n in r["linears"].items())
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {' / '.join(f'{t:.3f}' for t in r['step_times_s'])} | "
            f"{_x(r['vs_float'])} | {_x(r['vs_ours'])} | {mix} | {r['weights_gb']:.2f} | "
            f"{r['load_s']:.1f} | {r['load_average_after'][0] if r['load_average_after'] else '–'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gguf_speed", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="tiny | mid | full (bench/configs.py)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--weights-dir", help="the bench folder (default /tmp/flux-bench-CONFIG; written if missing)")
    p.add_argument("--gguf-dir", help="where the synthetic GGUFs go (default /tmp/flux-bench-gguf-CONFIG)")
    p.add_argument("--output-json")
    p.add_argument("--markdown")
    p.add_argument("--convert", nargs=2, metavar=("FOLDER", "OUT.gguf"),
                   help="only write a GGUF (profile --profile) of FOLDER's own transformer weights, e.g. to compare "
                   "it with the folder in python -m bench.quality, and exit")
    p.add_argument("--profile", default="q8_0", help="for --convert: q8_0 (default) or q4_1")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.convert:
        return gguf_from_folder(Path(args.convert[0]), Path(args.convert[1]), args.profile)
    return run(args)


if __name__ == "__main__":
    main()
