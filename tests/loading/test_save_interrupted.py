"""Saves that are killed, fail to write, or replace a folder: nothing lost, no junk left.

Killed writers are real subprocesses (SIGKILL); the next save removes their hidden folders (or renames a
replaced folder back) only when the writer no longer runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest

from flux_1.cli.save import main as save_cli
from flux_1.loading import saved
from flux_1.pipeline.save_model import save_model

SRC = Path(saved.__file__).resolve().parents[2]
MLX_FULL = "[write] Unable to write 334556 bytes to file."  # what MLX 0.32 raises on a full tmpfs


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def fill_with(text: str):
    def fill(tmp: Path) -> None:
        (tmp / "model.txt").write_text(text)

    return fill


# A writer in its own process: `blocking` fills its partial folder, says so and sleeps (to be killed);
# `die_between_renames` replaces OUT without an atomic exchange and SIGKILLs itself after the first rename.
WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from flux_1.loading import saved

    out, mode = Path(sys.argv[1]), sys.argv[2]

    def blocking(tmp):
        (tmp / "model.txt").write_text("half written")
        print("filling", flush=True)
        time.sleep(120)

    def new(tmp):
        (tmp / "model.txt").write_text("new")

    if mode == "die_between_renames":
        saved._exchange_function = lambda: None
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if ".old-" in Path(dst).name:
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        saved.write_atomically(out, True, new)
    else:
        saved.write_atomically(out, False, blocking)
""")


def start_writer(out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_filling(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line == "filling\n", (line, proc.stderr.read() if proc.poll() is not None else "")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: no zombie keeps the PID alive


# -- killed writers ------------------------------------------------------------------------------------


def test_killed_save_is_removed_by_the_next_one_but_a_live_writer_is_left_alone(tmp_path):
    out = tmp_path / "out"
    killed, live = start_writer(out, "blocking"), start_writer(out, "blocking")
    try:
        wait_filling(killed)
        wait_filling(live)
        kill(killed)
        assert killed.returncode == -signal.SIGKILL
        partial = {p: [n for n in hidden(tmp_path) if f"-p{p.pid}-" in n] for p in (killed, live)}
        assert len(partial[killed]) == len(partial[live]) == 1
        assert (tmp_path / partial[killed][0] / "model.txt").exists()

        logs: list[str] = []
        saved.write_atomically(out, False, fill_with("mine"), log=logs.append)
        assert (out / "model.txt").read_text() == "mine"
        assert hidden(tmp_path) == partial[live]  # the running writer's folder is untouched
        assert len(logs) == 1 and partial[killed][0] in logs[0] and f"process {killed.pid}" in logs[0]
    finally:
        for p in (killed, live):
            if p.poll() is None:
                kill(p)
    logs.clear()
    saved.check_output(out, True, log=logs.append)  # every save (its first check) cleans up
    assert hidden(tmp_path) == [] and partial[live][0] in logs[0]
    assert (out / "model.txt").read_text() == "mine"


def test_kill_between_the_two_renames_is_undone_by_the_next_save(tmp_path, tiny_schnell):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("previous")
    writer = start_writer(out, "die_between_renames")
    writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL, writer.stderr.read()
    assert not out.exists()  # the name is gone for now; the previous folder is safe beside it
    assert [n.split("-")[0] for n in hidden(tmp_path)] == [".out.old", ".out.partial"]

    logs: list[str] = []
    with pytest.raises(saved.SaveError, match="not empty; pass --overwrite"):  # restored, so refused
        save_model(out, "schnell", source=tiny_schnell, precision="float32", log=logs.append)
    assert (out / "model.txt").read_text() == "previous" and hidden(tmp_path) == []
    assert logs[0].startswith(f"restored {out} from .out.old-") and "removed" in logs[1]


def test_writer_identity():
    me = saved.writer_tag()
    assert not saved.writer_is_dead(me)
    host, boot, pid, start, rand = me.split("-")
    if start != "s0":  # /proc: a PID now running another program (reused) is not the writer
        assert saved.writer_is_dead("-".join([host, boot, pid, f"s{int(start[1:]) + 1}", rand]))
    if boot != "b0":
        assert saved.writer_is_dead("-".join([host, "bffffff" if boot != "bffffff" else "b000000", pid, start,
                                              rand]))  # an earlier boot
    other_host = "h" + ("0" * 6 if host != "h000000" else "1" * 6)
    assert not saved.writer_is_dead("-".join([other_host, "b0", "p999999999", "s0", rand]))  # cannot tell
    assert not saved.writer_is_dead("1a2b3c4d")  # an older flux_1's random tag: never removed
    assert not saved.writer_is_dead("-".join([host, boot, "p0", start, rand]))


# -- --overwrite ----------------------------------------------------------------------------------------


def _renames(monkeypatch) -> list[tuple[str, str]]:
    calls, real = [], os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append((Path(a).name, Path(b).name)), real(a, b))[1])
    return calls


def test_overwrite_is_one_atomic_exchange(tmp_path, monkeypatch):
    out = tmp_path / "out"
    saved.write_atomically(out, False, fill_with("first"))
    tmp = tmp_path / ".probe"
    tmp.mkdir()
    if not saved.exchange(tmp, out):
        pytest.skip("no atomic exchange on this OS or filesystem")
    saved.exchange(tmp, out)  # swap back
    shutil.rmtree(tmp)
    calls = _renames(monkeypatch)
    saved.write_atomically(out, True, fill_with("second"))
    assert (out / "model.txt").read_text() == "second" and hidden(tmp_path) == []
    assert calls == []  # no moment without `out`


@pytest.mark.parametrize("unavailable", ["no function", "EINVAL"])
def test_overwrite_without_exchange_uses_two_renames(tmp_path, monkeypatch, unavailable):
    monkeypatch.setattr(saved, "_exchange_function",
                        (lambda: None) if unavailable == "no function" else (lambda: lambda a, b: errno.EINVAL))
    out = tmp_path / "out"
    saved.write_atomically(out, False, fill_with("first"))
    calls = _renames(monkeypatch)
    saved.write_atomically(out, True, fill_with("second"))
    assert (out / "model.txt").read_text() == "second" and hidden(tmp_path) == []
    assert [b.split("-")[0] for _, b in calls] == [".out.old", "out"]


def test_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(saved, "_exchange_function", lambda: None)
    out = tmp_path / "out"
    saved.write_atomically(out, False, fill_with("first"))
    real = os.rename

    def rename(a, b):
        if ".partial-" in Path(a).name:
            raise OSError(errno.EIO, "Input/output error")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        saved.write_atomically(out, True, fill_with("second"))
    assert (out / "model.txt").read_text() == "first" and hidden(tmp_path) == []


# -- write errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("free", [None, 0])
def test_mlx_write_failure_is_a_clean_error(tiny_schnell, tmp_path, monkeypatch, capsys, free):
    def full(path, *args, **kwargs):
        raise RuntimeError(MLX_FULL)

    monkeypatch.setattr(mx, "save_safetensors", full)
    if free is not None:
        monkeypatch.setattr(saved, "_free_bytes", lambda _path: free)
    out = tmp_path / "out"
    with pytest.raises(saved.SaveWriteError) as caught:
        save_model(out, "schnell", source=tiny_schnell, precision="float32")
    message = str(caught.value)
    assert message.startswith(f"cannot write {out / 'transformer' / 'model.safetensors'}: [write] Unable")
    assert ("(disk full? 0 MB free" if free == 0 else "(disk full or an I/O error?)") in message
    assert message.endswith("; nothing was saved") and isinstance(caught.value, OSError)
    assert not out.exists() and hidden(tmp_path) == []
    with pytest.raises(SystemExit) as exit_:  # the CLI: one line, exit status 1
        save_cli(["--model", "schnell", "--source", str(tiny_schnell), "--path", str(out)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot write ")


def test_os_write_errors_name_the_file(tmp_path):
    target = tmp_path / "x" / "manifest.json"
    with pytest.raises(saved.SaveWriteError, match=r"cannot write .*manifest.json: No space left on device "
                                                   r"\(disk full\?"):
        with saved.writing(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(saved.SaveWriteError, match=r"cannot write .*vocab.json: \[Errno 28\] No space"):
        with saved.writing(tmp_path / "tokenizer"):
            raise shutil.Error([("a/vocab.json", str(tmp_path / "tokenizer" / "vocab.json"),
                                 "[Errno 28] No space left on device")])


def test_tokenizer_copy_failure(tiny_schnell, tmp_path, monkeypatch):
    def copytree(src, dst, *args, **kwargs):
        raise shutil.Error([(str(src), str(Path(dst) / "spiece.model"), "[Errno 28] No space left on device")])

    monkeypatch.setattr(shutil, "copytree", copytree)
    out = tmp_path / "out"
    with pytest.raises(saved.SaveWriteError, match=r"cannot write .*out/tokenizer/spiece.model: .*disk full\?"):
        save_model(out, "schnell", source=tiny_schnell, precision="float32")
    assert not out.exists() and hidden(tmp_path) == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MB tmpfs (the full-precision tiny model is about 9 MB); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs Linux and root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def test_real_full_disk(tiny_schnell, small_filesystem):
    out = small_filesystem / "out"
    with pytest.raises(saved.SaveWriteError, match=r"cannot write .*/out/.*: \[write\] Unable to write \d+ bytes"
                                                   r" to file \(disk full\? 0 MB free on that filesystem\)"):
        save_model(out, "schnell", source=tiny_schnell, precision="float32")
    assert list(small_filesystem.iterdir()) == []  # the partial folder is gone, its space given back
