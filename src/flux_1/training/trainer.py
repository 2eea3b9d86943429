"""LoRA / QLoRA fine-tuning of the FLUX.1 transformer: `train(TrainConfig(...))`.

One run, in order: read and check the data (data.py); load the model (`Flux1.from_alias`: every layout and
`quantize`); encode what the cache lacks (latents, prompt embeddings, the validation prompts); free the text
encoders and the VAE; load the transformer, attach the adapters (adapters.py); then optimizer steps, each
`grad_accum` micro-batches of `batch_size` samples from one bucket, the loss of objective.py, AdamW with torch's
semantics (bias correction), the gradient norm clipped as diffusers does. Every `save_every` steps a checkpoint,
every `validate_every` steps validation images; at the end `OUT/lora.safetensors`.

Output folder:
    cache/                      latents and prompt embeddings (data.py)
    checkpoints/step_N/         adapter.safetensors, optimizer.safetensors, lora.safetensors, state.json
    validation/step_N_P_seedS.png   prompt P (0-based) at seed S, the live adapters at step N
    log.jsonl                   {"step", "loss", "lr"} per optimizer step
    loss.png                    the loss curve
    lora.safetensors            the result (PEFT layout, or kohya with save_format="kohya")

Exact resume: every random draw of optimizer step s, micro-batch a, is made from a key derived from
(seed, s * grad_accum + a) alone, and the data order is a pure function of (seed, micro-batch) (data.py); a
checkpoint holds the adapters, the whole optimizer state (moments, step, learning rate) and the config. A
resumed run therefore repeats the uninterrupted run's arithmetic exactly, and its loss curve is bitwise the same.

Data parallel (under `mlx.launch`): every rank computes the same global batch (batch_size x world size
samples), sigmas and noise, and takes its own slice of them; the gradients are averaged over the ranks (one
`all_sum` of one flat buffer per optimizer step) before clipping and the update, so every rank holds the same
adapters. Rank 0 alone writes checkpoints, logs, validation images and the output (on several hosts, put OUT on
shared storage, or copy the checkpoint to every host before resuming). A resume must have the same number of
ranks (another is refused, naming both). If a rank dies, mlx.launch terminates the others at once (SIGTERM): the
step in flight is lost, the last checkpoint is intact. A single process never initialises mx.distributed.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from ..parallel import world
from . import data as data_mod
from .adapters import AdapterConfig, adapter_state, attach, load_adapter_state, target_modules
from .objective import SAMPLING_SCHEMES, loss_and_grad, sample_sigmas

LR_SCHEDULERS = ("constant", "cosine")
SAVE_FORMATS = ("peft", "kohya")
STATE_VERSION = 1
# Settings a resumed run may change; every other one must equal the checkpoint's.
RESUMABLE = frozenset({"data", "output", "steps", "save_every", "validate_every", "validation_prompts",
                       "validation_seeds", "validation_steps", "keep_checkpoints", "save_format", "resume",
                       "progress"})


class TrainingError(ValueError):
    """A training request that cannot run, or a checkpoint that cannot be resumed: one line, named."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl+C (SIGINT) during training: a checkpoint of the last completed step was written first."""

    def __init__(self, step: int, checkpoint: Path | None):
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step was completed)"
        super().__init__(f"interrupted at step {step}: {where}")
        self.step, self.checkpoint = step, checkpoint


def _int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TrainingError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise TrainingError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _float(value, name: str, positive: bool = False, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TrainingError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise TrainingError(f"{name} must be greater than 0, got {value}")
    if low is not None and value < low:
        raise TrainingError(f"{name} must be at least {low}, got {value}")
    return float(value)


def _choice(value, name: str, choices) -> str:
    if value not in choices:
        raise TrainingError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults: the issue's (rank 16, alpha 16, 1000 steps, lr 1e-4, batch 1,
    gradient accumulation 4, 512 pixels, seed 0), else diffusers' train_dreambooth_lora_flux.py (guidance
    3.5, constant schedule without warm-up, AdamW betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, gradient
    norm clipped at 1.0, a checkpoint every 500 steps, logit-normal mean 0 std 1, mode scale 1.29)."""

    data: str | Path
    output: str | Path
    model: str = "dev"
    path: str | Path | None = None  # a local model folder (any layout Flux1 reads); None: the Hub cache
    quantize: int | str | None = None  # the frozen base quantized while loading (QLoRA): 4, 8, ...
    precision: str | None = None  # compute dtype; None: float32 on the CPU, bfloat16 on a GPU
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"  # "attention", "all" or a regex over diffusers module names
    steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # after the warm-up: constant, or cosine decay to 0 at `steps`
    lr_warmup_steps: int = 0
    batch_size: int = 1  # samples per micro-batch per process
    grad_accum: int = 4  # micro-batches per optimizer step
    resolution: int = 512
    seed: int = 0
    caption: str | None = None  # the instance prompt of images without their own caption
    trigger: str | None = None  # prepended to every caption
    flip: bool = False  # also train on the mirrored images
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5  # what a guidance-distilled (dev) transformer is told while training
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0  # 0: no clipping
    gradient_checkpointing: bool = False
    validation_prompts: tuple[str, ...] = ()
    validation_seeds: tuple[int, ...] = (0,)
    validation_steps: int | None = None  # denoising steps; None: the model's default
    validate_every: int | None = None  # None: as save_every
    save_every: int = 500
    keep_checkpoints: int | None = None  # None: keep every checkpoint
    save_format: str = "peft"
    resume: bool = False  # continue from the latest checkpoint in `output`
    progress: bool = True

    def __post_init__(self):
        from ..pipeline.variants import variant

        for name in ("data", "output"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise TrainingError(f"{name} must be a folder path, got {value!r}")
        try:
            facts = variant(self.model)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if facts.conditioning != "none":
            raise TrainingError(f"training {self.model!r} is not supported: its image conditioning has no training "
                                "objective here; train schnell or dev")
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise TrainingError(f"path must be a folder path, got {self.path!r}")
        if self.quantize is not None:
            from .. import quantization

            try:
                quantization.parse(self.quantize)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.rank = _int(self.rank, "rank", 1)
        self.alpha = _float(self.alpha, "alpha", positive=True)
        if not isinstance(self.targets, str) or not self.targets:
            raise TrainingError(f"targets must be 'attention', 'all' or a regex, got {self.targets!r}")
        self.steps = _int(self.steps, "steps", 1)
        self.learning_rate = _float(self.learning_rate, "learning rate", positive=True)
        _choice(self.lr_scheduler, "lr_scheduler", LR_SCHEDULERS)
        self.lr_warmup_steps = _int(self.lr_warmup_steps, "lr_warmup_steps", 0)
        self.batch_size = _int(self.batch_size, "batch size", 1)
        self.grad_accum = _int(self.grad_accum, "grad_accum", 1)
        self.resolution = _int(self.resolution, "resolution", data_mod.BUCKET_STEP)
        if self.resolution % data_mod.BUCKET_STEP:
            raise TrainingError(f"resolution must be a multiple of {data_mod.BUCKET_STEP}, got {self.resolution}")
        self.seed = _int(self.seed, "seed", 0)
        for name in ("caption", "trigger"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TrainingError(f"{name} must be a non-empty string, got {value!r}")
        _choice(self.weighting_scheme, "weighting_scheme", SAMPLING_SCHEMES)
        self.logit_mean = _float(self.logit_mean, "logit_mean")
        self.logit_std = _float(self.logit_std, "logit_std", positive=True)
        self.mode_scale = _float(self.mode_scale, "mode_scale")
        self.guidance_scale = _float(self.guidance_scale, "guidance_scale")
        for name in ("adam_beta1", "adam_beta2"):
            value = _float(getattr(self, name), name, low=0.0)
            if value >= 1:
                raise TrainingError(f"{name} must be in [0, 1), got {value}")
            setattr(self, name, value)
        self.adam_epsilon = _float(self.adam_epsilon, "adam_epsilon", positive=True)
        self.weight_decay = _float(self.weight_decay, "weight_decay", low=0.0)
        self.max_grad_norm = _float(self.max_grad_norm, "max_grad_norm", low=0.0)
        if isinstance(self.validation_prompts, str):
            self.validation_prompts = (self.validation_prompts,)
        self.validation_prompts = tuple(self.validation_prompts)
        for prompt in self.validation_prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise TrainingError(f"validation prompts must be non-empty strings, got {prompt!r}")
        self.validation_seeds = tuple(_int(s, "validation seed", 0) for s in self.validation_seeds)
        if self.validation_prompts and not self.validation_seeds:
            raise TrainingError("validation prompts need at least one validation seed")
        if self.validation_steps is not None:
            self.validation_steps = _int(self.validation_steps, "validation_steps", 1)
        self.save_every = _int(self.save_every, "save_every", 1)
        if self.validate_every is not None:
            self.validate_every = _int(self.validate_every, "validate_every", 1)
        if self.keep_checkpoints is not None:
            self.keep_checkpoints = _int(self.keep_checkpoints, "keep_checkpoints", 1)
        _choice(self.save_format, "save_format", SAVE_FORMATS)
        for name in ("flip", "gradient_checkpointing", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TrainingError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def as_json(self) -> dict:
        """The settings as JSON values (paths as absolute strings, tuples as lists)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("data", "output", "path") and value is not None:
                value = str(Path(value).expanduser().resolve())
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"unknown training setting {unknown[0]!r}")
        values = dict(values)
        for name in ("validation_prompts", "validation_seeds"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)


# -- distributed -----------------------------------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place in a data-parallel run: rank 0 of 1 unless launched by mlx.launch."""

    rank: int = 0
    size: int = 1
    group: object | None = None

    @classmethod
    def from_environment(cls) -> Ranks:
        # The group only when a launcher (mlx.launch, mpirun) started this process and it has company: a
        # plain process never touches mx.distributed (flux_1.parallel.world).
        group = world()
        return cls() if group is None else cls(group.rank(), group.size(), group)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average(self, grads: dict) -> dict:
        """The gradient tree averaged over the ranks: one all_sum of one flat buffer."""
        if self.size == 1:
            return grads
        flat = tree_flatten(grads)
        buffer = mx.concatenate([g.reshape(-1) for _, g in flat])
        buffer = mx.distributed.all_sum(buffer, group=self.group) / self.size
        out, offset = [], 0
        for name, g in flat:
            out.append((name, buffer[offset:offset + g.size].reshape(g.shape)))
            offset += g.size
        return _unflatten_like(grads, dict(out))

    def mean(self, value: mx.array) -> mx.array:
        return value if self.size == 1 else mx.distributed.all_sum(value, group=self.group) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))


def _unflatten_like(tree, flat: dict, prefix: str = ""):
    """`tree` with each leaf replaced by flat[its dotted name] (lists and dicts kept as they are)."""
    if isinstance(tree, dict):
        return {k: _unflatten_like(v, flat, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unflatten_like(v, flat, f"{prefix}{i}.") for i, v in enumerate(tree))
    return flat[prefix[:-1]]


# -- randomness and the learning rate ------------------------------------------------------------------------


def micro_key(seed: int, micro_step: int) -> mx.array:
    """The key of one micro-batch's draws (sigmas, noise): a function of (seed, micro-batch) only."""
    state = np.random.SeedSequence([seed, micro_step]).generate_state(2, dtype=np.uint32)
    return mx.random.key(int(state[0]) << 32 | int(state[1]))


def lr_schedule(config: TrainConfig):
    """Linear warm-up from 0, then constant or cosine decay to 0 at the last step (diffusers' schedulers:
    the first step runs at the schedule's value for step 0)."""
    lr = config.learning_rate
    after = config.steps - config.lr_warmup_steps
    if config.lr_scheduler == "cosine":
        main = optim.cosine_decay(lr, max(after, 1))
    else:
        def main(step):
            return mx.array(lr, dtype=mx.float32)
    if config.lr_warmup_steps == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, config.lr_warmup_steps), main],
                                [config.lr_warmup_steps])


def make_optimizer(config: TrainConfig) -> optim.AdamW:
    return optim.AdamW(learning_rate=lr_schedule(config), betas=[config.adam_beta1, config.adam_beta2],
                       eps=config.adam_epsilon, weight_decay=config.weight_decay, bias_correction=True)


# -- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_dirs(output: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in output/checkpoints, by step (temporary folders are not listed)."""
    folder = Path(output) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / "state.json").is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def read_checkpoint(output: Path) -> dict:
    """The latest checkpoint's state.json (with "folder"), or a TrainingError saying there is none."""
    found = checkpoint_dirs(output)
    if not found:
        raise TrainingError(f"no checkpoint to resume in {Path(output) / 'checkpoints'}")
    folder = found[-1][1]
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"checkpoint {folder} is unreadable ({e})") from None
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"checkpoint {folder} has format version {state.get('version')!r}, not {STATE_VERSION}")
    state["folder"] = str(folder)
    return state


def check_resume(state: dict, config: TrainConfig, world_size: int, fingerprint: str | None = None) -> None:
    """Refuse to continue a checkpoint under other settings, naming the first that differs."""
    old = state["config"]
    new = config.as_json()
    for name, value in new.items():
        if name not in RESUMABLE and old.get(name) != value:
            raise TrainingError(f"cannot resume {state['folder']}: {name} is {value!r} but the checkpoint was "
                                f"trained with {old.get(name)!r}")
    if state["world_size"] != world_size:
        raise TrainingError(f"cannot resume {state['folder']}: it was trained by {state['world_size']} "
                            f"process(es), this run has {world_size}; launch the same number")
    if config.steps < state["step"]:
        raise TrainingError(f"cannot resume {state['folder']}: steps is {config.steps}, fewer than the "
                            f"{state['step']} already trained")
    if fingerprint is not None and state["data_fingerprint"] != fingerprint:
        raise TrainingError(f"cannot resume {state['folder']}: data differs from the checkpoint's (images, "
                            "captions, resolution or flip changed)")


def _set_leaves(tree, flat: dict[str, mx.array], what: str):
    """Replace the leaves of `tree` by `flat` (same dotted names, same shapes); strict."""
    own = dict(tree_flatten(tree))
    missing, unexpected = sorted(set(own) - set(flat)), sorted(set(flat) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise TrainingError(f"{what}: {'missing' if missing else 'unexpected'} key {key!r}")
    for key, value in flat.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise TrainingError(f"{what}: {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    return _unflatten_like(tree, flat)


def write_checkpoint(output: Path, step: int, transformer, optimizer, state: dict, adapter_config: AdapterConfig,
                     save_format: str) -> Path:
    """Write checkpoints/step_N atomically: into .step_N.tmp, then renamed; the previous ones are untouched.
    A failure (a full disk...) removes the temporary folder and raises an OSError naming what failed."""
    from ..loading.saved import SaveWriteError, writing
    from .export import save_lora

    root = Path(output) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    if final.exists():
        return final
    try:
        with writing(tmp):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            mx.save_safetensors(str(tmp / "adapter.safetensors"), adapter_state(transformer))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
            save_lora(transformer, tmp / "lora.safetensors", adapter_config, format=save_format)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            os.replace(tmp, final)
    except SaveWriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(output)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        raise SaveWriteError(final, f"{e.reason}{e.hint}; {kept}", e.errno) from None
    return final


def prune_checkpoints(output: Path, keep: int | None) -> None:
    if keep is None:
        return
    for _, folder in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


# -- logs, plot, validation -----------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict]:
    """The log's entries; a line cut short by a killed process is dropped."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_loss(entries: list[dict], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """The loss per step as a line (and its running mean over 5% of the steps) on a white PNG, with pillow."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 15, 15, height - 30
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    points = [(e["step"], e["loss"]) for e in entries if math.isfinite(e.get("loss", math.nan))]
    if points:
        steps = np.array([p[0] for p in points], dtype=np.float64)
        losses = np.array([p[1] for p in points], dtype=np.float64)
        lo, hi = float(losses.min()), float(losses.max())
        hi = hi if hi > lo else lo + 1.0
        first, last = float(steps.min()), float(max(steps.max(), steps.min() + 1))

        def xy(s, v):
            return (left + (s - first) / (last - first) * (right - left),
                    bottom - (v - lo) / (hi - lo) * (bottom - top))

        draw.line([xy(s, v) for s, v in zip(steps, losses, strict=True)], fill=(150, 180, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        if len(smooth) > 1:
            draw.line([xy(s, v) for s, v in zip(steps[window - 1:], smooth, strict=True)], fill=(20, 60, 160), width=2)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {int(first)}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {int(last)}", fill="black")
    draw.text((left + 8, top + 4), "loss", fill="black")
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


# -- the run ---------------------------------------------------------------------------------------------------


def model_key(flux, config: TrainConfig) -> str:
    """What the cached latents and embeddings depend on: the model's files (names, sizes, times), precision
    and quantization of the encoders."""
    files = []
    for p in sorted(Path(flux.root).rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".model", ".gguf", ".txt"):
            st = p.stat()
            files.append((str(p.relative_to(flux.root)), st.st_size, st.st_mtime_ns))
    return data_mod.digest(config.model, str(Path(flux.root).resolve()), flux.precision, str(config.quantize), files)


@contextmanager
def _sigint_as_keyboard_interrupt():
    """Ctrl+C raises KeyboardInterrupt in the main thread even if a caller changed the handler."""
    try:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """One training run (see the module docstring); `run()` returns the output LoRA's path."""

    def __init__(self, config: TrainConfig, ranks: Ranks | None = None):
        self.config = config
        self.ranks = ranks or Ranks.from_environment()
        self.output = Path(config.output)
        self.log_path = self.output / "log.jsonl"

    def say(self, message: str) -> None:
        if self.config.progress and self.ranks.main:
            print(message, file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the first step: checks, data, model, cache, adapters, optimizer, resume."""
        from ..pipeline.flux1 import Flux1

        config = self.config
        self.resume_state = None
        if config.resume:
            self.resume_state = read_checkpoint(self.output)
            check_resume(self.resume_state, config, self.ranks.size)
        elif checkpoint_dirs(self.output):
            raise TrainingError(f"{self.output} already holds checkpoints of a run: resume it (--resume "
                                f"{self.output}) or choose another output folder")
        self.examples = data_mod.discover(config.data, config.caption, config.trigger)
        fingerprint = data_mod.data_fingerprint(self.examples, config.resolution, config.flip)
        if self.resume_state is not None:
            check_resume(self.resume_state, config, self.ranks.size, fingerprint)
        self.fingerprint = fingerprint

        self.flux = flux = Flux1.from_alias(config.model, path=config.path, quantize=config.quantize,
                                            precision=config.precision, progress=config.progress and self.ranks.main)
        self._check_targets()
        key = model_key(flux, config)
        self.samples = data_mod.make_samples(self.examples, config.resolution, config.flip, key)
        self.cache = data_mod.Cache(self.output / "cache")
        self.validation_keys = [data_mod.prompt_key(p, key) for p in config.validation_prompts]
        self._fill_cache()
        # Training holds the transformer, the adapters, the optimizer and one batch: the encoders and the VAE go.
        flux.t5 = flux.clip = flux.vae = None
        flux._prompt_cache.clear()
        mx.clear_cache()

        self.transformer = flux.transformer
        self.adapter_config = AdapterConfig(config.rank, config.alpha, config.targets)
        self.modules = attach(self.transformer, self.adapter_config, seed=config.seed)
        # Per block (models/transformer.py): activations recomputed in the backward pass, not kept.
        self.transformer.grad_checkpoint = config.gradient_checkpointing
        self.optimizer = make_optimizer(config)
        self.optimizer.init(self.transformer.trainable_parameters())
        self.step = 0
        if self.resume_state is not None:
            self._load_checkpoint(Path(self.resume_state["folder"]))
        self.order = data_mod.DataOrder(self.samples, config.batch_size * self.ranks.size, config.seed)
        self.loss_and_grad = loss_and_grad(self.transformer)
        self.guidance = config.guidance_scale if flux.is_guidance_distilled else None

    def _check_targets(self) -> None:
        """Resolve the targets on a lazy skeleton of the transformer (nothing loaded): a regex that matches
        no module is refused before any encoding."""
        from ..loading import component_shapes
        from ..pipeline.flux1 import skeleton

        shapes = component_shapes(self.flux.root, "transformer", self.flux.gguf_files)
        try:
            target_modules(skeleton("transformer", shapes, self.flux.dtype), self.config.targets)
        except ValueError as e:
            raise TrainingError(str(e)) from None

    def _fill_cache(self) -> None:
        config, flux = self.config, self.flux
        prompts = {k: p for k, p in zip(self.validation_keys, config.validation_prompts, strict=True)
                   if not self.cache.prompt_file(k).is_file()}

        def fill():
            latents, captions = self.cache.missing(self.samples)
            total = len(latents) + len(captions) + len(prompts)
            if not total:
                return
            flux.low_memory = False  # keep the encoders for every caption (the transformer is not loaded yet)
            flux.progress = False
            with tqdm(total=total, desc="caching latents and prompts", unit="entry",
                      disable=not (config.progress and self.ranks.main)) as bar:
                self.cache.fill(self.samples, lambda x: flux.vae.encode_latents(x.astype(flux.dtype)),
                                flux.encode_prompt, progress=bar.update)
                for key, prompt in prompts.items():
                    self.cache.store_prompt(key, *flux.encode_prompt(prompt))
                    bar.update()
            flux.low_memory, flux.progress = True, config.progress and self.ranks.main

        # Rank 0 fills the cache first; the others then find it (one host) or fill their own (several hosts).
        if self.ranks.main:
            fill()
        self.ranks.barrier()
        if not self.ranks.main:
            fill()

    def _load_checkpoint(self, folder: Path) -> None:
        try:
            adapters = mx.load(str(folder / "adapter.safetensors"))
            moments = mx.load(str(folder / "optimizer.safetensors"))
        except (OSError, RuntimeError, ValueError) as e:
            raise TrainingError(f"checkpoint {folder} is unreadable ({e})") from None
        try:
            load_adapter_state(self.transformer, adapters)
        except ValueError as e:
            raise TrainingError(f"checkpoint {folder}: {e}") from None
        self.optimizer.state = _set_leaves(self.optimizer.state, moments, f"checkpoint {folder} optimizer state")
        mx.eval(self.optimizer.state)
        self.step = int(self.resume_state["step"])

    # -- steps -------------------------------------------------------------------------------------------

    def micro_batch(self, micro_step: int):
        """This rank's share of global micro-batch `micro_step`: latents, txt, pooled, sigmas, noise."""
        config, ranks = self.config, self.ranks
        indices = self.order.batch(micro_step)
        mine = indices[ranks.rank * config.batch_size:(ranks.rank + 1) * config.batch_size]
        latents, txt, pooled = self.cache.load_batch([self.samples[i] for i in mine])
        sigma_key, noise_key = mx.random.split(micro_key(config.seed, micro_step))
        global_batch = len(indices)
        # Drawn for the whole global batch, then sliced: the same numbers whatever the number of ranks.
        sigmas = sample_sigmas(sigma_key, global_batch, config.weighting_scheme, config.logit_mean,
                               config.logit_std, config.mode_scale)
        noise = mx.random.normal((global_batch, *latents.shape[1:]), key=noise_key)
        rows = slice(ranks.rank * config.batch_size, (ranks.rank + 1) * config.batch_size)
        return latents, txt, pooled, sigmas[rows], noise[rows]

    def optimizer_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss over all ranks, lr used)."""
        config = self.config
        total_loss, total_grads = None, None
        for a in range(config.grad_accum):
            latents, txt, pooled, sigmas, noise = self.micro_batch(self.step * config.grad_accum + a)
            loss, grads = self.loss_and_grad(latents, txt, pooled, sigmas, noise, self.guidance,
                                             config.weighting_scheme)
            total_loss = loss if total_loss is None else total_loss + loss
            total_grads = grads if total_grads is None else tree_map(mx.add, total_grads, grads)
            if a + 1 < config.grad_accum:
                # Evaluated per micro-batch: the graphs of several micro-batches are never held at once.
                mx.eval(total_loss, total_grads)
        grads = self.ranks.average(tree_map(lambda g: g / config.grad_accum, total_grads))
        loss = self.ranks.mean(total_loss / config.grad_accum)
        if config.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        self.optimizer.update(self.transformer, grads)
        mx.eval(loss, self.transformer.trainable_parameters(), self.optimizer.state)
        return loss.item(), self.optimizer.learning_rate.item()

    # -- outputs (rank 0) -----------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "config": self.config.as_json(),
                "world_size": self.ranks.size, "data_fingerprint": self.fingerprint,
                "modules": self.modules, "seed": self.config.seed,
                "data_order": self.order.position(self.step * self.config.grad_accum),
                "rng": "keys derived from (seed, micro-batch): nothing else to restore"}

    def save_checkpoint(self) -> Path | None:
        if not self.ranks.main:
            return None
        folder = write_checkpoint(self.output, self.step, self.transformer, self.optimizer, self.state(),
                                  self.adapter_config, self.config.save_format)
        prune_checkpoints(self.output, self.config.keep_checkpoints)
        plot_loss(read_log(self.log_path), self.output / "loss.png")
        return folder

    def validate(self) -> list[Path]:
        """Images of the validation prompts at their seeds, denoised by the pipeline with the live adapters."""
        if not self.ranks.main or not self.config.validation_prompts:
            return []
        from ..loading import load_component
        from ..pipeline import conditioning, sampler

        flux, config = self.flux, self.config
        size = config.resolution
        steps = config.validation_steps or flux.variant.default_steps
        rows, cols = sampler.latent_grid(size, size)
        sigmas = sampler.schedule(steps, rows * cols, shift=flux.is_guidance_distilled)
        guidance = mx.array([config.guidance_scale], dtype=mx.float32) if flux.is_guidance_distilled else None
        flux.vae = load_component(flux.root, "vae", flux.dtype, flux.quant_spec, flux.gguf_files)
        folder = self.output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            for p, key in enumerate(self.validation_keys):
                prompt = mx.load(str(self.cache.prompt_file(key)))
                txt, pooled = prompt["txt"][None].astype(flux.dtype), prompt["pooled"][None].astype(flux.dtype)
                for seed in config.validation_seeds:
                    noise = sampler.initial_noise(seed, size, size, flux.dtype)
                    x = flux.denoise(noise, txt, pooled, sigmas, guidance, conditioning.Conditioning(),
                                     sampler.image_ids(size, size), progress=False)
                    pixels = flux.decode(x, size, size)
                    path = folder / f"step_{self.step}_{p}_seed{seed}.png"
                    from PIL import Image

                    tmp = path.with_name(f".{path.name}.tmp.png")
                    Image.fromarray(pixels).save(tmp)
                    os.replace(tmp, path)
                    written.append(path)
        finally:
            flux.vae = None
            mx.clear_cache()
        return written

    def log(self, loss: float, lr: float) -> None:
        if self.ranks.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "lr": lr}) + "\n")

    def export(self) -> Path:
        from .export import save_lora

        path = self.output / "lora.safetensors"
        if self.ranks.main:
            tmp = self.output / ".lora.tmp.safetensors"
            try:
                save_lora(self.transformer, tmp, self.adapter_config, format=self.config.save_format,
                          metadata={"flux_1_training": json.dumps({"steps": self.step, "model": self.config.model})})
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    # -- the loop ------------------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict, dict]:
        """References to the current adapters and optimizer state (arrays are immutable: nothing is copied
        but the containers, which the optimizer updates in place)."""
        return adapter_state(self.transformer), tree_map(lambda x: x, self.optimizer.state)

    def run(self) -> Path:
        config = self.config
        with _sigint_as_keyboard_interrupt():
            self.prepare()
            if self.ranks.main:
                self.output.mkdir(parents=True, exist_ok=True)
                # A resumed run continues the log from its checkpoint: later lines (an interrupted run's) go.
                kept = [e for e in read_log(self.log_path) if e["step"] <= self.step]
                _atomic_text(self.log_path, "".join(json.dumps(e) + "\n" for e in kept))
            validate_every = config.validate_every or config.save_every
            committed = self._snapshot()
            bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step",
                       disable=not (config.progress and self.ranks.main))
            try:
                while self.step < config.steps:
                    loss, lr = self.optimizer_step()
                    self.step += 1
                    committed = self._snapshot()
                    if not math.isfinite(loss):
                        raise TrainingError(f"the loss became {loss} at step {self.step}: lower the learning "
                                            "rate (or use float32); the last checkpoint is intact")
                    self.log(loss, lr)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update()
                    if self.step % config.save_every == 0 or self.step == config.steps:
                        self.save_checkpoint()
                    if self.step % validate_every == 0 or self.step == config.steps:
                        self.validate()
            except KeyboardInterrupt:
                bar.close()
                # Put back the state of the last completed step (an interrupted update may be half-applied).
                load_adapter_state(self.transformer, committed[0])
                self.optimizer.state = committed[1]
                folder = self.save_checkpoint() if self.step > 0 else None
                raise TrainingInterrupted(self.step, folder) from None
            finally:
                bar.close()
            path = self.export()
            if self.ranks.main:
                plot_loss(read_log(self.log_path), self.output / "loss.png")
            self.ranks.barrier()
            self.say(f"saved {path}")
            return path


def train(config: TrainConfig) -> Path:
    """Train a LoRA as `config` says; returns the path of OUT/lora.safetensors (see the module docstring)."""
    return Trainer(config).run()
