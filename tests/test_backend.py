"""flux_1.backend: the BLAS that MLX's CPU backend uses, and the quiet transformers import.

Loading a BLAS changes the whole process and cannot be undone, so every case runs in a fresh
interpreter that imports flux_1 (whose __init__ calls select_blas before mlx is imported).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flux_1 import backend

SRC = Path(__file__).resolve().parent.parent / "src"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS switch is Linux-only")

# Prints what the fresh interpreter ended up with, as JSON, after one float32 matmul through MLX.
REPORT = """
import json, warnings
import numpy as np
import flux_1
from flux_1 import backend
import mlx.core as mx
a = np.arange(16 * 32, dtype=np.float32).reshape(16, 32) / 100
b = np.arange(32 * 24, dtype=np.float32).reshape(32, 24) / 100
out = np.array(mx.matmul(mx.array(a), mx.array(b)))
print(json.dumps({"info": backend.blas_info(), "provider": backend.symbol_provider(),
                  "selection": backend.select_blas().__dict__,
                  "max_err": float(np.abs(out - a @ b).max()), "all_42": bool((out == 42).all())}))
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: no FLUX1_BLAS or LD_PRELOAD from outside unless given, src/ importable."""
    clean = {k: v for k, v in os.environ.items() if k not in ("FLUX1_BLAS", "LD_PRELOAD")}
    clean["PYTHONPATH"] = str(SRC)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**clean, **env},
                          capture_output=True, text=True, timeout=600)


def report(**env: str) -> tuple[dict, str]:
    proc = run_python(REPORT, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@linux_only
def test_off_keeps_mlx_bundled_blas():
    result, stderr = report(FLUX1_BLAS="off")
    assert result["provider"] is None  # nothing global defines cblas_sgemm: libmlx uses its own BLAS
    assert result["info"] == "MLX's bundled reference BLAS, slow for float32 matrix products: FLUX1_BLAS=off"
    assert result["max_err"] < 1e-3
    assert "Warning" not in stderr


@pytest.fixture(scope="module")
def fake_blas(tmp_path_factory) -> Path:
    """A library whose cblas_sgemm writes 42 everywhere: if MLX's matmul returns 42s, MLX called it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in BLAS")
    folder = tmp_path_factory.mktemp("fakeblas")
    (folder / "fake.c").write_text(textwrap.dedent("""
        void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc) {
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                    c[order == 101 ? i * ldc + j : j * ldc + i] = 42.0f;  /* 101: CblasRowMajor */
        }
    """))
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / "libfakeblas.so"), str(folder / "fake.c")],
                   check=True)
    return folder / "libfakeblas.so"


@linux_only
def test_chosen_library_takes_over_mlx_matmul(fake_blas):
    result, stderr = report(FLUX1_BLAS=str(fake_blas))
    assert result["all_42"], "MLX's float32 matmul did not go through the library FLUX1_BLAS names"
    assert result["provider"] == str(fake_blas)
    assert result["selection"]["source"] == "FLUX1_BLAS"
    assert result["info"] == f"cblas_sgemm from libfakeblas.so (FLUX1_BLAS, {fake_blas})"
    assert "Warning" not in stderr


@linux_only
def test_a_preloaded_blas_is_reported_not_replaced(fake_blas):
    result, stderr = report(LD_PRELOAD=str(fake_blas), FLUX1_BLAS="libm.so.6")
    assert result["all_42"] and result["provider"] == str(fake_blas)
    assert result["selection"]["source"] == "preloaded"
    assert f"FLUX1_BLAS=libm.so.6 is ignored: {fake_blas} already provides cblas_sgemm" in stderr


@linux_only
def test_bad_path_warns_and_keeps_bundled_blas(tmp_path):
    missing = tmp_path / "libnothere.so"
    result, stderr = report(FLUX1_BLAS=str(missing))
    assert "RuntimeWarning" in stderr and f"FLUX1_BLAS={missing} cannot be used" in stderr
    assert "Traceback" not in stderr
    assert result["provider"] is None and result["max_err"] < 1e-3
    assert result["info"].startswith("MLX's bundled reference BLAS")
    assert f"FLUX1_BLAS={missing} could not be used" in result["info"]


@linux_only
def test_library_without_sgemm_warns():
    result, stderr = report(FLUX1_BLAS="libm.so.6")
    assert "FLUX1_BLAS=libm.so.6 cannot be used (it does not define cblas_sgemm)" in stderr
    assert result["provider"] is None and result["max_err"] < 1e-3


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


@linux_only
@pytest.mark.skipif(not _installed("ngsolve-openblas"), reason="the cpu extra's OpenBLAS wheel is not installed")
def test_auto_picks_the_openblas_wheel():
    wheel = next(lib for source, lib in backend.candidates() if source == "ngsolve-openblas wheel")
    result, stderr = report()
    if _loadable("libgfortran.so.5"):
        assert result["provider"] == wheel
        assert result["info"].startswith("OpenBLAS 0.3.")
        assert result["info"].endswith(f"(ngsolve-openblas wheel, {wheel})")
        assert result["max_err"] < 1e-3
    else:  # the wheel cannot load: blas_info says why, and nothing crashes
        assert result["provider"] is None and result["max_err"] < 1e-3
        assert "ngsolve-openblas wheel: needs libgfortran.so.5" in result["info"]
    assert "Warning" not in stderr


@linux_only
def test_mlx_imported_first_is_reported():
    proc = run_python("""
        import mlx.core
        from flux_1 import backend
        print(backend.blas_info())
    """, FLUX1_BLAS="auto")
    assert proc.returncode == 0, proc.stderr
    assert "mlx was imported before flux_1" in proc.stdout


def test_candidates_try_wheels_before_the_system():
    found = backend.candidates()
    sources = [source for source, _ in found]
    assert found[-len(backend.SYSTEM_LIBRARIES):] == [("system", name) for name in backend.SYSTEM_LIBRARIES]
    if _installed("ngsolve-openblas") and platform.machine() == "x86_64":
        assert sources[0] == "ngsolve-openblas wheel" and Path(found[0][1]).is_file()


def test_quiet_transformers_restores_the_variable(monkeypatch):
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    monkeypatch.delenv(key, raising=False)
    with backend.quiet_transformers():
        assert os.environ[key] == "1"
    assert key not in os.environ
    monkeypatch.setenv(key, "")
    with backend.quiet_transformers():
        assert os.environ[key] == "1"
    assert os.environ[key] == ""


def test_quiet_transformers_hides_the_pytorch_advice():
    quiet = run_python("""
        from flux_1.backend import quiet_transformers
        with quiet_transformers():
            from transformers import CLIPTokenizer, T5TokenizerFast
    """)
    assert quiet.returncode == 0, quiet.stderr
    assert "PyTorch was not found" not in quiet.stderr
    if not _installed("torch"):  # the advice exists: plain imports print it
        loud = run_python("from transformers import CLIPTokenizer")
        assert "PyTorch was not found" in loud.stderr


@linux_only
@pytest.mark.skipif(not _installed("ngsolve-openblas") or not _loadable("libgfortran.so.5"),
                    reason="needs the cpu extra's OpenBLAS wheel")
def test_a_forced_openblas_core_type_is_reported():
    """OPENBLAS_CORETYPE overrides OpenBLAS's CPU detection (some machine images set it): blas_info
    names it, and says when it holds an AVX-512 CPU on AVX2 kernels."""
    forced, _ = report(OPENBLAS_CORETYPE="Haswell")
    assert "Haswell kernels (OPENBLAS_CORETYPE=Haswell" in forced["info"]
    assert ("this CPU has AVX-512" in forced["info"]) == ("avx512f" in backend._cpu_flags())
    assert forced["max_err"] < 1e-3
    detected, _ = report(OPENBLAS_CORETYPE="")
    assert "OPENBLAS_CORETYPE" not in detected["info"]


MALLOC_REPORT = """
import ctypes, json, resource
import flux_1
from flux_1 import backend

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_second_buffer(size):
    def touched():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p

    libc.free(touched())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(touched())  # the second buffer: new pages, or the first one's again
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults = faults_of_a_second_buffer(64 * 2**20)
large = faults_of_a_second_buffer(1100 * 2**20)  # above glibc's largest M_MMAP_THRESHOLD (1 GiB)
libc.free(libc.malloc(64 * 2**20))
flux_1.release_memory()  # the heap's free memory back to the OS: the next buffer is new pages again
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(64 * 2**20)
ctypes.memset(p, 1, 64 * 2**20)
released = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": backend.tune_malloc(), "faults": faults, "large": large, "released": released,
                  "info": backend.malloc_info()}))
"""


@linux_only
def test_tuned_malloc_reuses_freed_memory_and_can_be_switched_off():
    """With glibc, a freed 64 MiB (or 1.1 GiB) buffer stays in the heap: the next one needs no new pages
    (16k faults without the tuning, as glibc unmaps it), until `release_memory` gives the heap back."""
    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    runs = {}
    for setting in ("", "off"):
        proc = run_python(MALLOC_REPORT, FLUX1_MALLOC=setting)
        assert proc.returncode == 0, proc.stderr
        runs[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[""]["tuned"] is True and runs["off"]["tuned"] is False
    assert runs[""]["info"].startswith("glibc, freed memory kept") and "FLUX1_MALLOC=off" in runs["off"]["info"]
    assert runs[""]["faults"] < 1000 < 8000 < runs["off"]["faults"]
    assert runs[""]["large"] < 1000 < 100_000 < runs["off"]["large"]
    assert runs[""]["released"] > 8000
