"""Shared by both sides of the benchmark: inputs, memory probes, environment description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

GB = 1e9


def make_inputs(cfg, steps_total: int, seed: int = 0, kontext: bool = False) -> dict[str, np.ndarray]:
    """Token ids, initial noise and sigmas, identical for ours and diffusers.

    `kontext`: also the reference image's packed latents (random, the output's token count: the
    sequence doubles) and pixels at the output size for the reference's VAE encode, both random
    (values do not change the cost). Drawn after the others, so those stay the same."""
    from flux_1.pipeline import sampler  # numpy-only helpers (schedule)

    rng = np.random.default_rng(seed)
    clip_ids = rng.integers(3, cfg.clip.vocab_size - 1, size=(1, cfg.clip_tokens)).astype(np.int32)
    clip_ids[0, -1] = cfg.clip.vocab_size - 1  # an EOS-like largest id (CLIP pools at argmax)
    t5_ids = rng.integers(2, cfg.t5.vocab_size, size=(1, cfg.txt_tokens)).astype(np.int32)
    noise = rng.standard_normal((1, cfg.img_tokens, cfg.transformer.in_channels)).astype(np.float32)
    sigmas = sampler.schedule(steps_total, cfg.img_tokens, shift=True)  # Kontext too: mu from the output's tokens
    out = {"clip_ids": clip_ids, "t5_ids": t5_ids, "noise": noise, "sigmas": sigmas}
    if kontext:
        out["reference"] = rng.standard_normal((1, cfg.img_tokens, cfg.transformer.in_channels)).astype(np.float32)
        out["reference_pixels"] = rng.uniform(-1.0, 1.0, (1, cfg.height, cfg.width, 3)).astype(np.float32)
    return out


def median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# ---------------------------------------------------------------------------------------------
# Process memory (Linux): VmHWM is the resident high-water mark; writing 5 to clear_refs resets it.


def rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_gb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def openblas_preloaded() -> bool:
    """Whether MLX's CPU GEMMs run on an OpenBLAS (flux_1.backend loads one before mlx; numpy's own
    bundled OpenBLAS, also mapped in this process, does not count: MLX does not use it)."""
    from flux_1.backend import blas_info

    return blas_info().startswith("OpenBLAS")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def system_busy_s() -> float | None:
    """CPU seconds all processes of the machine have been busy (from /proc/stat; None elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall time of a block, the CPU time this process spent in it (all threads), and the CPU time
    every other process of the machine spent meanwhile: `with Clock() as c: ...; c.s, c.cpu, c.others`.
    On a shared machine cpu / s is how many cores the block really got, others / s how many cores
    other work took (a contended measurement shows others / s well above 0)."""

    def __enter__(self):
        self.busy0 = system_busy_s()
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        busy = system_busy_s()
        self.others = max(0.0, busy - self.busy0 - self.cpu) if busy is not None and self.busy0 is not None else None
        return False
