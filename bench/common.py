"""Shared by both sides of the benchmark: inputs, memory probes, environment description."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
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


def timed_runs(fn, n: int) -> tuple[list[float], object]:
    """Call `fn` (which must return only when its work is done) `n` times: (wall seconds of each call,
    the last call's result)."""
    times, result = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


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


# ---------------------------------------------------------------------------------------------
# Which BLAS each side really uses. Nothing here imports flux_1 (the reference process must not: its
# __init__ loads an OpenBLAS with RTLD_GLOBAL, which would then take over torch's `sgemm_` as well).

REFERENCE_ENV = "FLUX1_BENCH_REFERENCE"  # set in the diffusers subprocess: bench/__init__ skips flux_1


def _linker():
    """flux_1/backend.py as a module of its own (it imports only the standard library): its dynamic-linker
    lookups, without running flux_1/__init__, which would load our OpenBLAS into the reference process."""
    import importlib.util

    name = "_flux1_backend_linker"
    if name not in sys.modules:
        package = importlib.util.find_spec("flux_1")  # finds the package without importing it
        spec = importlib.util.spec_from_file_location(
            name, Path(package.submodule_search_locations[0]) / "backend.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def global_symbol_provider(name: str) -> str | None:
    """The file defining `name` first in the process' global scope (LD_PRELOAD, RTLD_GLOBAL libraries):
    the definition every later-loaded library's calls to `name` bind to (flux_1.backend.symbol_provider)."""
    if not sys.platform.startswith("linux"):
        return None
    return _linker().symbol_provider(name)


def binding_of(library: str, name: str) -> str | None:
    """What `library`'s (already loaded) own calls to `name` bind to: the global scope's definition when
    there is one (it wins over the library's own), else the first in the library's own dependency tree."""
    if not sys.platform.startswith("linux"):
        return None
    return global_symbol_provider(name) or _linker().defining_file(ctypes.CDLL(library), name)


def mapped_blas_libraries() -> list[str]:
    """Files mapped into this process whose names say BLAS / MKL / OpenBLAS (Linux), deduplicated."""
    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if len(line.split()) >= 6}
    except OSError:
        return []
    keys = ("blas", "mkl", "lapack")
    return sorted(p for p in paths if any(k in Path(p).name.lower() for k in keys))


def openblas_threads(path: str | None) -> int | None:
    """openblas_get_num_threads() of the loaded library at `path` (None when it is no OpenBLAS)."""
    if not path:
        return None
    try:
        return int(ctypes.CDLL(path).openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


def ours_blas() -> dict:
    """Our side's BLAS: flux_1.backend.blas_info(), the library behind cblas_sgemm and its threads."""
    from flux_1.backend import SYMBOL, blas_info, symbol_provider

    provider = symbol_provider() if sys.platform.startswith("linux") else None
    return {"blas": blas_info(), "blas_provider": {SYMBOL: provider}, "blas_threads": openblas_threads(provider),
            "openblas_num_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


def free_ports(count: int = 2) -> int:
    """The first of `count` consecutive free local ports (the ring backend takes one per rank): concurrent
    launches must not meet on mlx.launch's default port."""
    import random
    import socket

    for _ in range(100):
        first = random.randrange(20_000, 60_000)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free local ports")
