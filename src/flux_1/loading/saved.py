"""Folders written by save.py: our names, MLX layout, self-describing quantization. See docs/QUANTIZATION.md.

Layout (format version 1):
```
OUT/manifest.json                  model alias, source, LoRAs baked (and scales), package and format
                                   version, precision, quantization (or null), per-component files
OUT/transformer/                   model.safetensors, or model-0000i-of-0000n.safetensors (each at most
OUT/text_encoder/   (CLIP)           2 GB) + model.safetensors.index.json
OUT/text_encoder_2/ (T5)
OUT/vae/
OUT/tokenizer/  OUT/tokenizer_2/   copied from the source
```
Tensors carry our parameter names (`tree_flatten(model.parameters())`), so loading needs no name table;
a quantized layer stores `weight` (uint32 codes), `scales` and (affine) `biases`. Every shard's
safetensors metadata says the format and version, the component, precision, bits, group size, mode and
the exact layer plan (`layers`: JSON `{module: {group_size, bits, mode}}`). Loading reads the plan, not
the policy: a later change of policy cannot break an old folder (mflux issue #149). The plan quantizes the
skeleton before the codes are loaded (`folder.build(..., plan=...)`).

Saving is atomic: everything is written into a hidden folder next to OUT, which is renamed to OUT only
when complete; an error or Ctrl-C leaves OUT as it was and no partial folder; after a kill the next
save of OUT cleans up (see Writing).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import quantization as q
from ..components import COMPONENTS, TOKENIZERS, require_tokenizers
from ..safetensors_check import HeaderError, check_header
from .weights import WeightLoadError, component_files, read_lazy

MANIFEST = "manifest.json"
FORMAT = "flux_1.saved"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_SHARD_BYTES = 2 * 10**9  # at most 2 GB per file (as mflux / mlx-examples shard)
INDEX = "model.safetensors.index.json"


class SavedFormatError(WeightLoadError):
    """A saved folder this version cannot read (unknown format version, inconsistent metadata)."""


class SaveError(ValueError):
    """A save that must not start (existing output, output inside the source...)."""


def is_saved_folder(root: Path) -> bool:
    return (Path(root) / MANIFEST).exists()


def read_manifest(root: Path) -> dict:
    """The manifest of a saved folder, checked: a folder of another format version is refused."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SavedFormatError(f"{root} is not a saved model folder (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise SavedFormatError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedFormatError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})"
                               if isinstance(manifest, dict) else f"{path}: not a {FORMAT} manifest")
    _check_version(manifest.get("format_version"), str(path))
    return manifest


def _check_version(version, where: str) -> None:
    if version not in SUPPORTED_VERSIONS and str(version) not in map(str, SUPPORTED_VERSIONS):
        raise SavedFormatError(
            f"{where}: saved-model format version {version!r} is not supported by this flux_1 "
            f"(it reads version {', '.join(map(str, SUPPORTED_VERSIONS))}); re-save the model with this "
            f"version's save.py, or use the flux_1 version that wrote it"
        )


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, {tensor: {dtype, shape, data_offsets}}) of a safetensors file, from its JSON header,
    checked to describe the file's data exactly (safetensors_check)."""
    try:
        header = dict(check_header(path))
    except OSError as e:
        raise WeightLoadError(f"{path}: unreadable safetensors file ({e})") from e
    except HeaderError as e:
        raise WeightLoadError(str(e)) from e
    return header.pop("__metadata__", {}) or {}, header


# ------------------------------------------------------------------------------------------------
# Loading


_warned: set[tuple] = set()


def component_metadata(root: Path, component: str) -> tuple[list[Path], dict[str, str]]:
    """The files of a saved component and their (identical) metadata, checked."""
    folder = Path(root) / COMPONENTS[component].folder
    files = component_files(folder, COMPONENTS[component].folder)
    first = None
    for f in files:
        meta, _ = read_header(f)
        if meta.get("format") != FORMAT:
            raise SavedFormatError(f"{f}: not written by save.py (no '{FORMAT}' metadata)")
        _check_version(meta.get("format_version"), str(f))
        if meta.get("component") != component:
            raise SavedFormatError(f"{f}: holds component {meta.get('component')!r}, expected {component!r}")
        if first is None:
            first = meta
        elif {k: meta.get(k) for k in ("layers", "bits", "mode", "precision")} != {
                k: first.get(k) for k in ("layers", "bits", "mode", "precision")}:
            raise SavedFormatError(f"{f}: its quantization metadata differs from {files[0].name}'s")
    return files, first


def check_folder(root: Path) -> dict:
    """Everything about a saved folder that can be checked without loading it (manifest, format version,
    each component's files and metadata, the tokenizers); returns the manifest."""
    manifest = read_manifest(root)
    for component in COMPONENTS:
        component_metadata(root, component)
    require_tokenizers(root)
    return manifest


def logical_shapes(root: Path, component: str) -> dict[str, tuple[int, ...]]:
    """A saved component's weight shapes from its headers, quantized weights unpacked to (rows, inputs)."""
    files, meta = component_metadata(root, component)
    try:
        plan = json.loads(meta.get("layers", "{}"))
    except ValueError as e:
        raise SavedFormatError(f"{files[0]}: unreadable quantization metadata ({e})") from None
    shapes = {}
    for f in files:
        for key, info in read_header(f)[1].items():
            module, _, param = key.rpartition(".")
            how = plan.get(module) if param == "weight" else None
            shape = tuple(info["shape"])
            shapes[key] = q.logical_shape(shape, int(how["bits"])) if how else shape
    return shapes


def load_saved_component(root: Path, component: str, dtype: mx.Dtype, spec: q.QuantSpec | None = None
                         ) -> nn.Module:
    """Build one component from a saved folder; its quantization comes from the folder.

    A folder saved quantized keeps its own quantization: a `spec` that disagrees is a warning and the
    saved bits win. A folder saved in full precision is like any other source: `spec` quantizes it
    while loading.
    """
    from .folder import Source, build

    root = Path(root)
    manifest = read_manifest(root)
    files, meta = component_metadata(root, component)
    try:
        plan = json.loads(meta.get("layers", "{}"))
        for how in plan.values():
            q.QuantSpec(bits=int(how["bits"]), group_size=int(how["group_size"]), mode=how["mode"])
        saved = manifest.get("quantization")
        mixed = bool(saved) and saved.get("mode") == "mixed"  # a per-layer plan (GGUF source)
        saved_spec = q.QuantSpec.from_dict(saved) if saved and not mixed else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SavedFormatError(f"{files[0]}: unreadable quantization metadata ({e!r})") from e
    disagrees = saved_spec is not None and spec is not None and (spec.bits, spec.mode) != (
        saved_spec.bits, saved_spec.mode)
    if mixed and spec is not None:
        key = (str(root.resolve()), spec, "mixed")
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{root} is saved with per-layer quantization (from a GGUF): ignoring -q {spec.label}",
                          stacklevel=2)
    if disagrees:
        key = (str(root.resolve()), spec, saved_spec)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{root} is saved quantized ({saved_spec.description}): ignoring -q {spec.label}, "
                          f"the saved quantization is used", stacklevel=2)
    tensors, _ = read_lazy(files)
    label = str(root / COMPONENTS[component].folder)
    shapes = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".")
        how = plan.get(module) if param == "weight" else None
        if how is not None and value.dtype != mx.uint32:
            raise SavedFormatError(f"{label}: the layer plan quantizes '{module}' but its weight is "
                                   f"{value.dtype}, not packed codes (mismatched metadata)")
        shapes[key] = q.logical_shape(tuple(value.shape), how["bits"]) if how else tuple(value.shape)
    source = Source(tensors, label, shapes)
    del tensors
    try:
        if plan or saved_spec is not None or mixed:  # the saved plan decides (an empty plan: kept full precision)
            return build(component, source, dtype, None, plan=plan)
        return build(component, source, dtype, spec)  # a full-precision folder: like any other source
    except KeyError as e:
        raise WeightLoadError(f"{label}: missing key {e} (incomplete or foreign saved folder?)") from e
    except ValueError as e:  # a plan naming layers this model does not have
        raise WeightLoadError(f"{label}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Writing
#
# A save fills `.NAME.partial-TAG` next to OUT and renames it to OUT when complete. TAG names the
# writer (host, boot, PID and the process's start time, against PID reuse), so a later save can tell a
# folder left by a killed writer (removed) from one still being written (left alone). `--overwrite`
# swaps the new folder with OUT in one atomic exchange where the OS has one (Linux renameat2
# RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP); elsewhere OUT is first renamed to `.NAME.old-TAG`,
# which the next save renames back if the writer died before the new folder took OUT's place.



def shard_keys(arrays: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Split keys into files of at most `max_bytes` each, keeping a module's tensors together
    (a single module larger than the limit gets a file of its own)."""
    modules: dict[str, list[str]] = {}
    for key in arrays:
        modules.setdefault(key.rpartition(".")[0], []).append(key)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in modules.values():
        n = sum(arrays[k].nbytes for k in keys)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += n
    return shards


def component_file_metadata(component: str, plan: dict[str, dict], precision: str) -> dict[str, str]:
    """A shard's metadata. A mixed plan (layers differing in bits or mode: a GGUF source) says "mixed" in
    bits/group_size/mode; `layers` is always the exact per-layer plan, which is what loading reads."""
    mixed = q.is_mixed(plan)
    spec = None if mixed else q.plan_spec(plan)
    from .. import __version__

    def field(value) -> str:
        return "mixed" if mixed else str(value) if spec else "none"

    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "component": component,
        "precision": precision,
        "bits": field(spec and spec.bits),
        "group_size": field(spec and spec.group_size),
        "mode": field(spec and spec.mode),
        "layers": json.dumps(plan, sort_keys=True, separators=(",", ":")),
        "flux_1_version": __version__,
    }


LOW_SPACE = 64 * 2**20  # a write failing with less than this free on its filesystem: most likely a full disk
_TAG = re.compile(r"h(?P<host>[0-9a-f]{6})-b(?P<boot>[0-9a-f]{6}|0)-p(?P<pid>\d+)-s(?P<start>\d+)-[0-9a-f]{6}")


class SaveWriteError(OSError):
    """Writing a saved folder failed (disk full, I/O error...); names the file. An OSError, so the CLI
    prints it as `error: ...`."""

    def __init__(self, path: Path | str, reason: str, code: int | None = None, hint: str = ""):
        super().__init__(f"cannot write {path}: {reason}{hint}")
        self.errno, self.filename, self.reason, self.hint = code, str(path), reason, hint

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.reason}{self.hint}"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except FileNotFoundError:
            continue
        except (OSError, AttributeError):  # no statvfs (Windows)
            return None
        return st.f_bavail * st.f_frsize
    return None


def _write_error(path: Path, reason: str, code: int | None) -> SaveWriteError:
    reason = str(reason).strip().rstrip(".")
    free = _free_bytes(path)
    full = (code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or "no space left" in reason.lower()
            or (free is not None and free < LOW_SPACE))
    if full:
        hint = " (disk full?" + (f" {free / 1e6:.0f} MB free on that filesystem)" if free is not None else ")")
    elif "unable to write" in reason.lower():  # MLX says no more than this (no errno)
        hint = " (disk full or an I/O error?)"
    else:
        hint = ""
    return SaveWriteError(path, reason, errno.ENOSPC if full and code is None else code, hint)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure to write `path` into a SaveWriteError naming it: an OSError, shutil.copytree's list
    of them, or the RuntimeError MLX raises (`[write] Unable to write N bytes to file.` on a full disk)."""
    try:
        yield
    except SaveWriteError:
        raise
    except shutil.Error as e:  # copytree: [(src, dst, why), ...]
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else (None, path, str(e))
        raise _write_error(Path(first[1]), first[2], None) from e
    except OSError as e:
        raise _write_error(path, e.strerror or str(e), e.errno) from e
    except RuntimeError as e:
        raise _write_error(path, str(e), None) from e


def write_component(folder: Path, component: str, model: nn.Module, precision: str,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write one loaded (possibly quantized) model into `folder`; returns its manifest entry."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    plan = q.describe(model)
    arrays = dict(tree_flatten(model.parameters()))
    meta = component_file_metadata(component, plan, precision)
    shards = shard_keys(arrays, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, keys in zip(names, shards, strict=True):
        shard = {k: arrays[k] for k in keys}
        mx.eval(list(shard.values()))  # compute first, so that an error below is the write's
        with writing(folder / name):
            mx.save_safetensors(str(folder / name), shard, metadata=meta)
        del shard
    total = sum(a.nbytes for a in arrays.values())
    if len(shards) > 1:
        index = {"metadata": {**meta, "total_size": str(total)},
                 "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys}}
        with writing(folder / INDEX):
            (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return {"folder": folder.name, "files": names, "tensor_bytes": total, "quantized_layers": len(plan)}


def copy_folder(src: Path, dst: Path) -> None:
    """Copy a folder (the tokenizers) into a save; a failure is a SaveWriteError naming the file."""
    with writing(Path(dst)):
        shutil.copytree(src, dst)


# -- who wrote a hidden folder, and is it still running


@functools.cache
def _host() -> str:
    """This host and PID namespace: a container sharing the folder and the host name has other PIDs."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()} {namespace}".encode()).hexdigest()[:6]


@functools.cache
def _boot() -> str:
    """This boot of this machine ("0": unknown): every process of an earlier boot is dead."""
    try:
        raw = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "0"
    return hashlib.sha1(raw.encode()).hexdigest()[:6]


def _proc(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_tag() -> str:
    """The tag of this process's hidden folders: host, boot, PID, start time, and a random part."""
    pid = os.getpid()
    me = _proc(pid)
    return f"h{_host()}-b{_boot()}-p{pid}-s{me[1] if me else 0}-{uuid.uuid4().hex[:6]}"


def writer_is_dead(tag: str) -> bool:
    """True only when the process that made `tag` certainly no longer runs. Unknown tags (an older
    flux_1's, another machine's on a shared folder) count as alive: they are never removed."""
    m = _TAG.fullmatch(tag)
    if m is None or m["host"] != _host():
        return False
    if "0" not in (m["boot"], _boot()) and m["boot"] != _boot():
        return True  # written before the last reboot
    pid, start = int(m["pid"]), int(m["start"])
    if pid <= 0 or os.name == "nt":  # (on Windows os.kill would terminate the process)
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists (another user's)
    except OSError:
        return False
    now = _proc(pid)
    if now is None:
        return False  # no /proc (macOS): the PID exists, so assume it is the writer
    state, started = now
    return state in ("Z", "X") or (start != 0 and started != start)  # a zombie, or a reused PID


def _hidden(out: Path) -> list[tuple[str, Path, str]]:
    """(kind, path, tag) of each `.NAME.partial-TAG` / `.NAME.old-TAG` folder next to `out`."""
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        for kind in ("partial", "old"):
            prefix = f".{out.name}.{kind}-"
            if p.name.startswith(prefix):
                found.append((kind, p, p.name[len(prefix):]))
    return found


def _has_content(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def recover_interrupted(out: Path, log: Callable[[str], None] | None = None) -> None:
    """Clean up after saves of `out` that were killed: an `--overwrite` killed between its two renames
    (OUT missing, the previous folder at `.NAME.old-TAG`) is undone; partial folders and replaced
    folders whose writer is dead are removed. Folders of live writers are left alone."""
    log = log or (lambda _msg: None)
    out = Path(out)
    stale = [(kind, p, tag) for kind, p, tag in _hidden(out) if writer_is_dead(tag)]
    for kind, p, _tag in stale:
        if kind == "old" and not _has_content(out):
            if out.is_dir():
                out.rmdir()  # an empty folder in its place
            os.rename(p, out)
            log(f"restored {out} from {p.name}: a save replacing it was killed before the new folder "
                f"took its place")
    for kind, p, tag in stale:
        if not p.exists() or (kind == "old" and not out.is_dir()):
            continue  # restored; or OUT is now a file: keep the previous folder
        shutil.rmtree(p, ignore_errors=True)
        pid = _TAG.fullmatch(tag)["pid"]
        what = "a partial save" if kind == "partial" else "the folder an --overwrite save replaced"
        log(f"{'could not remove' if p.exists() else 'removed'} {p}: {what}, left by process {pid} "
            f"which no longer runs")


# -- atomic replacement

RENAME_EXCHANGE = 2  # linux/fs.h
RENAME_SWAP = 2  # macOS stdio.h
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}  # kernel or filesystem lacks it


@functools.cache
def _exchange_function() -> Callable[[bytes, bytes], int] | None:
    """The OS's atomic exchange of two paths, as f(a, b) -> 0 or an errno; None where there is none."""
    try:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            f = libc.renameat2  # glibc >= 2.28 (AttributeError before)
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            call = lambda a, b: f(-100, a, -100, b, RENAME_EXCHANGE)  # AT_FDCWD: paths as given
        elif sys.platform == "darwin":
            libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
            f = libc.renamex_np  # macOS 10.12+
            f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            call = lambda a, b: f(a, b, RENAME_SWAP)
        else:
            return None
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int

    def exchange(a: bytes, b: bytes) -> int:
        return 0 if call(a, b) == 0 else ctypes.get_errno()

    return exchange


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False (nothing done) where the OS or filesystem cannot."""
    f = _exchange_function()
    if f is None:
        return False
    code = f(os.fsencode(a), os.fsencode(b))
    if code in _NO_EXCHANGE:
        return False
    if code:
        raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")
    return True


def _move_into_place(tmp: Path, out: Path, tag: str) -> Path | None:
    """Rename the complete `tmp` to `out`; returns where the folder it replaced now is (to remove)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return None
    if exchange(tmp, out):
        return tmp  # now holding the previous folder
    # No exchange: two renames. The old name says whose it is, so if this process dies between them
    # the next save (recover_interrupted) renames it back.
    old = out.parent / f".{out.name}.old-{tag}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def check_output(out: Path, overwrite: bool, source: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
    """Refuse an output that exists and is not an empty folder (unless `overwrite`), or that would
    replace the source being read. First cleans up after killed saves of `out` (recover_interrupted)."""
    out = Path(out)
    recover_interrupted(out, log)
    if out.exists() and not out.is_dir():
        raise SaveError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SaveError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    if source is not None:
        o, s = out.resolve(), Path(source).resolve()
        if o == s or o in s.parents or s in o.parents:
            raise SaveError(f"output {out} would overwrite or nest inside the source {source}")


def write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None],
                     log: Callable[[str], None] | None = None) -> Path:
    """Run `fill(tmp)` on a fresh hidden folder next to `out`, then move it into place.

    On any exception (or Ctrl-C) the partial folder is removed and `out` is untouched; after a kill,
    the next save removes it (check_output). With `overwrite`, an existing `out` is swapped out only
    after the new folder is complete, atomically where the OS can.
    """
    out = Path(out)
    check_output(out, overwrite, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = writer_tag()
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        fill(tmp)
        replaced = _move_into_place(tmp, out, tag)
    except SaveWriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if Path(e.filename).is_relative_to(tmp):  # name the file as the user knows it
            e.filename = str(out / Path(e.filename).relative_to(tmp))
        e.hint += f"; nothing was saved{f', {out} is unchanged' if out.exists() else ''}"
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)  # killed here: the next save removes the rest
    return out


def mixed_quantization(plans: dict[str, dict[str, dict]], gguf_types: dict | None = None) -> dict | None:
    """The manifest's `quantization` for per-layer plans that differ in bits or mode (a GGUF source):
    {"mode": "mixed", "bits": null, "group_size": null, "layers": {component: {setting: count}}, ...}.
    None when the plans are empty."""
    plans = {c: p for c, p in plans.items() if p}
    if not plans:
        return None
    out = {"mode": "mixed", "bits": None, "group_size": None,
           "layers": {c: q.plan_summary(p) for c, p in plans.items()}}
    if gguf_types:
        out["gguf_types"] = gguf_types
    return out


def write_manifest(folder: Path, alias: str, source: str, precision: str, spec: q.QuantSpec | None,
                   lora_paths: list[str], scales: list[float], components: dict,
                   quantization: dict | None = None) -> None:
    """`quantization` (a `mixed_quantization` dict) replaces `spec` for per-layer plans."""
    from .. import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": alias,
        "source": source,
        "flux_1_version": __version__,
        "mlx_version": mx.__version__,
        "precision": precision,
        "quantization": quantization if quantization is not None else spec.as_dict() if spec else None,
        "loras": [{"path": str(Path(p).resolve()), "name": Path(p).name, "scale": s}
                  for p, s in zip(lora_paths, scales, strict=True)],
        "components": components,
        "tokenizers": list(TOKENIZERS),
    }
    with writing(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
