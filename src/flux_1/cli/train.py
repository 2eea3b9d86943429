"""`flux1-train` / `python train.py`: LoRA (and QLoRA, with -q) fine-tuning of FLUX.1 on a folder of images.

Settings come from, in order of precedence: the flags, a `--config` file (TOML or JSON, keys as the flags
without dashes or as TrainConfig's fields), the checkpoint being resumed (`--resume OUT`), TrainConfig's
defaults. Ctrl+C writes a checkpoint of the last completed step and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..components import PRECISIONS
from ..pipeline.variants import VARIANTS
from .errors import EXIT_INTERRUPTED, CLIError, user_errors
from .main import parse_quantize

# Config-file spellings that are not TrainConfig's field names.
ALIASES = {"lr": "learning_rate", "validation_prompt": "validation_prompts", "resume_from": "resume"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune FLUX.1 with LoRA adapters (QLoRA with -q 4 / -q 8) on a folder of images.",
        argument_default=argparse.SUPPRESS,
        epilog="DIR holds images with same-name .txt captions, or a metadata.jsonl (file_name, text). OUT gets "
        "lora.safetensors, checkpoints/, validation/, log.jsonl, loss.png and cache/. Defaults follow diffusers' "
        "train_dreambooth_lora_flux.py where the issue sets none.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="a TOML or JSON file of settings (flags override it)")
    trainable = [name for name, v in VARIANTS.items() if v.conditioning == "none"]  # no image conditioning
    p.add_argument("--model", "-m", choices=trainable, help="the model alias (default dev)")
    p.add_argument("--data", type=Path, metavar="DIR", help="the training images and captions")
    p.add_argument("--output", "-o", type=Path, metavar="OUT", help="the output folder")
    p.add_argument("--path", type=Path, metavar="MODEL",
                   help="a local model folder (diffusers layout, BFL files, or saved by flux1-save)")
    p.add_argument("-q", "--quantize", type=parse_quantize, metavar="BITS",
                   help="quantize the frozen base while loading (QLoRA): 4, 8, ...")
    p.add_argument("--precision", choices=list(PRECISIONS), help="compute dtype (default float32 on CPU, bf16 on GPU)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    p.add_argument("--targets", help="attention (default: to_q/k/v/out), all (every linear in the blocks), or a "
                   "regex over diffusers module names")
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--lr", dest="learning_rate", type=float, help="learning rate (default 1e-4)")
    p.add_argument("--lr-scheduler", choices=["constant", "cosine"], help="after the warm-up (default constant)")
    p.add_argument("--lr-warmup-steps", type=int, help="linear warm-up from 0 (default 0)")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch per process (default 1)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 4)")
    p.add_argument("--resolution", type=int, help="bucket area is about resolution^2, multiple of 64 (default 512)")
    p.add_argument("--seed", type=int, help="seeds the adapters, the data order, sigmas and noise (default 0)")
    p.add_argument("--caption", help="the instance prompt of images without a caption of their own")
    p.add_argument("--trigger", metavar="WORD", help="prepended to every caption")
    p.add_argument("--flip", action="store_true", help="also train on the mirrored images")
    p.add_argument("--weighting-scheme", choices=["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"],
                   help="timestep sampling / loss weighting as diffusers (default logit_normal)")
    p.add_argument("--logit-mean", type=float, help="logit_normal mean (default 0)")
    p.add_argument("--logit-std", type=float, help="logit_normal std (default 1)")
    p.add_argument("--mode-scale", type=float, help="mode scheme scale (default 1.29)")
    p.add_argument("--guidance-scale", type=float, help="the guidance dev is told while training (default 3.5)")
    p.add_argument("--adam-beta1", type=float, help="(default 0.9)")
    p.add_argument("--adam-beta2", type=float, help="(default 0.999)")
    p.add_argument("--adam-epsilon", type=float, help="(default 1e-8)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--max-grad-norm", type=float, help="gradient norm clipping, 0 for none (default 1.0)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--validation-prompt", dest="validation_prompts", nargs="+", metavar="P",
                   help="prompts drawn at fixed seeds every --validate-every steps and at the end")
    p.add_argument("--validation-seeds", type=int, nargs="+", metavar="S", help="(default 0)")
    p.add_argument("--validation-steps", type=int, help="denoising steps of validation images (default: the model's)")
    p.add_argument("--validate-every", type=int, metavar="N", help="(default: as --save-every)")
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default 500)")
    p.add_argument("--keep-checkpoints", type=int, metavar="N", help="keep only the last N checkpoints (default all)")
    p.add_argument("--save-format", choices=["peft", "kohya"],
                   help="peft (diffusers layout, default) or kohya (lora_unet_*: ComfyUI, Forge, A1111)")
    p.add_argument("--resume", type=Path, metavar="OUT", help="continue the run in OUT from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def read_config_file(path: Path) -> dict:
    """Settings from a TOML (Python 3.11+) or JSON file, keyed by TrainConfig's field names."""
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    text = path.read_bytes()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise CLIError(f"{path}: TOML config files need Python 3.11 or later (tomllib); use a JSON file") from None
        try:
            values = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise CLIError(f"config file {path} is not valid TOML ({e})") from None
    else:
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CLIError(f"config file {path} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise CLIError(f"config file {path} must hold a table (object) of settings")
    return {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}


def settings(args: argparse.Namespace) -> dict:
    """The TrainConfig keyword arguments: checkpoint, then config file, then flags."""
    from ..training.trainer import TrainConfig, read_checkpoint

    flags = vars(args).copy()
    config_file = flags.pop("config", None)
    quiet = flags.pop("quiet", False)
    resume = flags.pop("resume", None)
    values: dict = {}
    if resume is not None:
        if "output" in flags and Path(flags["output"]).resolve() != resume.resolve():
            raise CLIError(f"--resume {resume} and --output {flags['output']} differ: the run continues in {resume}")
        values.update(read_checkpoint(resume)["config"])
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(flags)
    if resume is not None:
        values.update(output=resume, resume=True)
    values["progress"] = not quiet
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CLIError(f"unknown setting {unknown[0]!r} in {config_file}")
    for name in ("data", "output"):
        if name not in values:
            raise CLIError(f"--{name} is required (or give it in --config)")
    return values


def main(argv: list[str] | None = None) -> None:
    from ..training.trainer import TrainConfig, TrainingInterrupted, train

    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors():
        values = settings(args)
        try:
            path = train(TrainConfig(**values))
        except TrainingInterrupted as e:
            where = (f"checkpoint {e.checkpoint}; continue with flux1-train --resume {values['output']}"
                     if e.checkpoint else "no step was completed, nothing saved")
            print(f"interrupted at step {e.step}: {where}", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
    print(f"Saved {path}")


if __name__ == "__main__":
    main()
