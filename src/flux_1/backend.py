"""A fast BLAS for MLX's CPU backend on Linux, and a quiet transformers import.

The Linux mlx wheel (`mlx-cpu`) links a bundled reference BLAS: float32 matrix products run at a few
GFLOP/s, 10-30x slower than OpenBLAS. libmlx.so calls `cblas_sgemm` through the dynamic linker, which
binds it to the first definition in the process' global scope before looking at libmlx's own
dependencies. So an OpenBLAS loaded with RTLD_GLOBAL before mlx is imported takes over every matrix
product. `select_blas()` does that once; `flux_1/__init__.py` calls it before anything imports mlx.

`FLUX1_BLAS` (environment variable) steers it:

- unset or `auto`: the first OpenBLAS that loads: the `ngsolve-openblas` wheel (the `cpu` extra
  installs it on x86-64 Linux), then the system's (`libopenblasp.so.0`, `libopenblas.so.0`);
- `off` (or `0`, `no`, `none`, `false`): keep MLX's bundled BLAS;
- a path or library name: load that library instead (a warning, not an error, when it cannot be used).

Nothing is loaded on macOS (Metal and Accelerate), with a CUDA mlx build (matrix products run on the
GPU), or when mlx was imported before flux_1 (its symbols are already bound). `blas_info()` says which
BLAS MLX's CPU backend uses, and why when it is the slow one.
"""

from __future__ import annotations

import ctypes
import fnmatch
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENV = "FLUX1_BLAS"
OFF = ("off", "0", "no", "none", "false")
AUTO = ("", "auto", "on")
SYMBOL = "cblas_sgemm"  # the one BLAS entry point libmlx.so imports (float32 GEMM)

# (distribution, file pattern): OpenBLAS wheels whose symbols are not renamed, so they can stand in for
# MLX's. Not cmeel-openblas: it is built for one CPU (SKYLAKEX on x86-64, NEOVERSEN2 on arm64, so it
# dies with SIGILL elsewhere) and capped at 4 threads. Not scipy-openblas32/64: every symbol carries a
# `scipy_` prefix, so they cannot replace `cblas_sgemm`.
WHEELS = (("ngsolve-openblas", "ngsolve_openblas/libopenblas*.so*"),)
# Linked by name, so the dynamic linker's own search (ld.so.cache, default folders) finds them. Fedora's
# threaded build is libopenblasp; Debian and Ubuntu point libopenblas.so.0 at their choice of build.
SYSTEM_LIBRARIES = ("libopenblasp.so.0", "libopenblas.so.0")
CUDA_DISTRIBUTIONS = ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda")
INSTALL_HINT = ("install the `cpu` extra (ngsolve-openblas, x86-64; it needs libgfortran5) or a system "
                "OpenBLAS (apt-get install libopenblas0-pthread)")


@dataclass(frozen=True)
class Selection:
    """What `select_blas` did: the library it loaded and from where, or why it loaded none."""

    library: str | None = None  # path or name given to the dynamic linker
    source: str = ""  # "ngsolve-openblas wheel", "system", "FLUX1_BLAS", "preloaded"
    note: str = ""  # why nothing was loaded (or what failed on the way)
    cpu_backend: bool = True  # False where MLX's matrix products do not run on the CPU BLAS
    hint: bool = True  # whether blas_info suggests installing an OpenBLAS (not when switched off)


_selection: Selection | None = None


# -- the dynamic linker -------------------------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def symbol_provider(name: str = SYMBOL) -> str | None:
    """The file that defines `name` first in the process' global scope, or None when nothing there does.

    This is what libmlx.so binds `name` to when it is loaded: the global scope (the executable, what
    it links, and libraries loaded RTLD_GLOBAL) is searched before libmlx's own bundled BLAS. Checking
    it needs no timing.
    """
    return defining_file(ctypes.CDLL(None), name)


def defining_file(handle: ctypes.CDLL, name: str) -> str | None:
    """The file that defines `name` as `handle` resolves it (dladdr of the bound address), or None."""
    try:
        address = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
    except AttributeError:
        return None
    process = ctypes.CDLL(None)
    try:
        dladdr = process.dladdr
    except AttributeError:  # glibc < 2.34 keeps dladdr in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _load_global(library: str) -> str | None:
    """Load `library` with RTLD_GLOBAL; the dynamic linker's error, shortened, when it cannot."""
    try:
        ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
    except OSError as e:
        message = str(e)
        if "libgfortran.so.5" in message:
            return "needs libgfortran.so.5 (package libgfortran5 on Debian/Ubuntu, libgfortran on Fedora)"
        return message
    return None


# -- choosing ----------------------------------------------------------------------------------------------


def _distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_distribution() -> str | None:
    """The CUDA mlx distribution installed, if any (matrix products and buffers are the GPU's then)."""
    return next((name for name in CUDA_DISTRIBUTIONS if _distribution(name) is not None), None)


def candidates() -> list[tuple[str, str]]:
    """(source, library) pairs to try, best first: the OpenBLAS wheels installed, then the system's."""
    found = []
    for name, pattern in WHEELS:
        dist = _distribution(name)
        if dist is not None:
            found += [(f"{name} wheel", str(dist.locate_file(f)))
                      for f in dist.files or [] if fnmatch.fnmatch(str(f), pattern)]
    return found + [("system", name) for name in SYSTEM_LIBRARIES]


def _choose(setting: str) -> Selection:
    if setting.lower() in OFF:
        return Selection(note=f"{ENV}={setting}", hint=False)
    explicit = setting.lower() not in AUTO
    if not sys.platform.startswith("linux"):
        if explicit:
            warnings.warn(f"{ENV}={setting} is ignored: only Linux uses it", RuntimeWarning, stacklevel=3)
        return Selection(note="MLX's default for this platform (Metal and Accelerate on macOS)", cpu_backend=False)
    if "mlx.core" in sys.modules:  # libmlx.so is loaded and bound: a library loaded now changes nothing
        if explicit:
            warnings.warn(f"{ENV}={setting} is ignored: mlx was imported before flux_1", RuntimeWarning,
                          stacklevel=3)
        return Selection(note="mlx was imported before flux_1, too late to switch (import flux_1 first)",
                         hint=False)
    preloaded = symbol_provider()
    if preloaded is not None:  # LD_PRELOAD, or a library the program loaded itself: already in charge
        if explicit:
            warnings.warn(f"{ENV}={setting} is ignored: {preloaded} already provides {SYMBOL} (LD_PRELOAD?)",
                          RuntimeWarning, stacklevel=3)
        return Selection(library=preloaded, source="preloaded")
    if explicit:
        return _load_explicit(setting)
    cuda = _cuda_distribution()
    if cuda is not None:
        return Selection(note=f"{cuda} is installed: matrix products run on the GPU", cpu_backend=False)
    failures = []
    for source, library in candidates():
        problem = _load_global(library)
        if problem is None and symbol_provider() is not None:
            return Selection(library=library, source=source)
        if source != "system" or "cannot open shared object file" not in (problem or ""):
            failures.append(f"{Path(library).name if source == 'system' else source}: {problem or f'no {SYMBOL}'}")
    return Selection(note="; ".join(failures) or "no OpenBLAS found")


def _load_explicit(library: str) -> Selection:
    problem = _load_global(library)
    if problem is None and symbol_provider() is None:
        problem = f"it does not define {SYMBOL}"
    if problem is not None:
        warnings.warn(f"{ENV}={library} cannot be used ({problem}); MLX keeps its bundled BLAS",
                      RuntimeWarning, stacklevel=4)
        return Selection(note=f"{ENV}={library} could not be used: {problem}")
    return Selection(library=library, source=ENV)


def select_blas() -> Selection:
    """Load a fast BLAS for MLX's CPU backend (see the module docstring); only the first call acts."""
    global _selection
    if _selection is None:
        _selection = _choose(os.environ.get(ENV, "").strip())
    return _selection


# -- glibc's malloc ----------------------------------------------------------------------------------------

MALLOC_ENV = "FLUX1_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)
MMAP_MAX = 0  # no buffer from a fresh mmap: every one comes from the heap (glibc's M_MMAP_THRESHOLD stops at 1 GiB)
TRIM_THRESHOLD = -1  # as size_t: never; freed memory stays in the heap for the next buffer (`release_memory`)

_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep the memory MLX's CPU backend frees for its next buffers (Linux, glibc); only the first call acts.

    MLX's CPU allocator takes its buffers from malloc and, past its 32 MiB cache, gives them back. glibc
    serves every large request with a fresh mmap and unmaps it on free (and trims the heap's top past its
    threshold), so each large activation of each step or decode is new memory that the kernel zero-fills
    page by page, at 1.5-3.5 us a page on this VM: a 256x256 VAE decode page-faulted 600-700k times, a
    1024x1024 one 7.6 million (63 s; 37.5 s without). With mmap off (`M_MMAP_MAX` 0) and no automatic trim,
    every buffer comes from the heap and freed memory is reused: a process' second and later decodes and
    steps page-fault ~0 times. The heap keeps its peak until the process ends or `release_memory()` (peak
    RSS +0.1-1 GB in our runs). Returns whether the settings took. Not on macOS (Metal), with a CUDA mlx,
    with another C library, or with FLUX1_MALLOC=off."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = _tune_malloc(os.environ.get(MALLOC_ENV, "").strip())
    return _malloc_tuned


def _glibc():
    """glibc as a ctypes library, or None (musl's mallopt does nothing; macOS has none)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    try:
        libc.gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return None
    return libc


def _tune_malloc(setting: str) -> bool:
    if setting.lower() in OFF or _cuda_distribution() is not None:
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, MMAP_MAX) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_memory() -> None:
    """Give the memory a process holds for reuse back to the OS: MLX's buffer cache, and (where
    `tune_malloc` took) the free memory of glibc's heap (`malloc_trim`). The next large step or decode
    page-faults its buffers in again; call it when a process is done generating for a while."""
    import mlx.core as mx

    mx.clear_cache()
    if tune_malloc():
        _glibc().malloc_trim(0)


def malloc_info() -> str:
    """Whether `tune_malloc` took, in one line (`flux1-generate -v` prints it)."""
    if tune_malloc():
        return "glibc, freed memory kept for reuse (FLUX1_MALLOC=off: glibc's defaults)"
    if os.environ.get(MALLOC_ENV, "").strip().lower() in OFF:
        return f"the C library's defaults ({MALLOC_ENV}={os.environ[MALLOC_ENV]})"
    return "the C library's defaults"


# -- reporting ---------------------------------------------------------------------------------------------


def _describe(path: str) -> str:
    """Like "OpenBLAS 0.3.33, Haswell kernels, 16 threads" for an OpenBLAS (it answers these calls)."""
    lib = ctypes.CDLL(path)  # already loaded: this only finds it
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        version = lib.openblas_get_config().decode().split()[:2]
        core = lib.openblas_get_corename().decode()
        threads = lib.openblas_get_num_threads()
    except AttributeError:
        return f"{SYMBOL} from {Path(path).name}"
    return f"{' '.join(version)}, {core} kernels{_forced_core()}, {threads} thread{'s' if threads != 1 else ''}"


def _forced_core() -> str:
    """Say so when OPENBLAS_CORETYPE picks OpenBLAS's kernels instead of its CPU detection: a machine
    image that sets it to Haswell keeps an AVX-512 CPU on AVX2 kernels (measured on a 2-core AMD
    EPYC: float32 GEMM ~255 against ~460 GFLOP/s with the kernels OpenBLAS detects)."""
    forced = os.environ.get("OPENBLAS_CORETYPE", "").strip()
    if not forced:
        return ""
    note = f" (OPENBLAS_CORETYPE={forced}"
    if _cpu_flags() & {"avx512f"} and forced.lower() in AVX2_CORES:
        note += ": this CPU has AVX-512; without the variable OpenBLAS would use its AVX-512 kernels"
    return note + ")"


# OpenBLAS x86-64 core names whose kernels stop at AVX2.
AVX2_CORES = ("haswell", "zen", "sandybridge", "nehalem", "core2", "prescott", "barcelona", "bulldozer",
              "piledriver", "steamroller", "excavator", "atom")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def blas_info() -> str:
    """Which BLAS MLX's CPU backend uses for matrix products, in one line (`flux1-generate -v` prints it)."""
    selection = select_blas()
    if not selection.cpu_backend:
        return selection.note
    provider = symbol_provider() if sys.platform.startswith("linux") else None
    if provider is None:
        text = "MLX's bundled reference BLAS, slow for float32 matrix products"
        text += f": {selection.note}" if selection.note else ""
        return text + (f". Faster: {INSTALL_HINT}" if selection.hint else "")
    return f"{_describe(provider)} ({selection.source or 'loaded'}, {provider})"


# -- transformers ------------------------------------------------------------------------------------------


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Import transformers without its "PyTorch was not found" advice: we only use its tokenizers, which
    need no torch. transformers prints that advice while it is imported, unless
    TRANSFORMERS_NO_ADVISORY_WARNINGS is set; the variable is restored afterwards, so later advice
    (and a user's own setting) is untouched."""
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
