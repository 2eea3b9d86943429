"""`flux1-save` / `python save.py`: write FLUX.1 as a self-contained (optionally quantized) folder.

The folder runs with no network and no `-q` (`flux1-generate --model schnell --path OUT`): see
docs/QUANTIZATION.md for its layout. LoRAs are merged into the full-precision weights before
quantizing. The folder is written next to OUT and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..components import PRECISIONS
from ..pipeline.variants import VARIANTS
from ..quantization import CHOICES
from .errors import user_errors
from .main import (
    add_lora_arguments,
    check_lora_args,
    check_lora_files,
    check_model_folder,
    parse_quantize,
    resolve_gguf_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Save FLUX.1 as a local folder (our layout, optionally quantized, LoRAs baked in).",
        epilog="The source comes from the Hugging Face cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN) unless "
        "--source is given. Load the result with `flux1-generate --model M --path OUT` (no -q needed).",
    )
    p.add_argument("--model", "-m", required=True, choices=list(VARIANTS), help=", ".join(VARIANTS))
    p.add_argument("--path", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("-q", "--quantize", type=parse_quantize, metavar="BITS",
                   help=f"quantize: {', '.join(CHOICES)} (default: none, full precision)")
    p.add_argument("--source", type=Path,
                   help="local model folder (diffusers layout, BFL files, a folder holding a transformer .gguf, "
                   "or a full-precision saved folder) instead of the Hugging Face Hub; or a transformer .gguf file")
    p.add_argument("--transformer-gguf", type=Path, metavar="FILE",
                   help="a FLUX transformer GGUF: its per-layer quantization is saved as it is")
    p.add_argument("--t5-gguf", type=Path, metavar="FILE", help="a T5-XXL encoder GGUF")
    add_lora_arguments(p, "one strength per LoRA path (default 1.0 each)",
                       "LoRA .safetensors files merged into the weights before quantizing")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16",
                   help="dtype of everything not quantized, and of affine scales (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_lora_args(parser, args)
    with user_errors():
        # Everything that can fail without the model fails now, not after minutes of loading.
        ns = argparse.Namespace(path=args.source, transformer_gguf=args.transformer_gguf, t5_gguf=args.t5_gguf)
        gguf_files = resolve_gguf_args(ns)
        args.source, args.transformer_gguf = ns.path, ns.transformer_gguf
        if args.source is not None:
            check_model_folder(args.source, gguf_files)
        check_lora_files(args.lora_paths, args.lora_scales, args.model, args.source, args.precision, gguf_files)
        from ..pipeline.save_model import save_model

        t0 = time.perf_counter()
        out = save_model(args.path, args.model, source=args.source, quantize=args.quantize,
                         precision=args.precision, lora_paths=args.lora_paths, lora_scales=args.lora_scales,
                         overwrite=args.overwrite, log=print, transformer_gguf=args.transformer_gguf,
                         t5_gguf=args.t5_gguf)
        print(f"Saved {args.model} to {out} ({folder_bytes(out) / 1e9:.2f} GB, "
              f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
