"""Bad training input: each is a one-line message (the CLI: `error: ...`, exit status 1), found before the model
loads where it can be, and nothing already saved is lost (a full disk while writing a checkpoint)."""

from __future__ import annotations

import errno
import json

import mlx.core as mx
import numpy as np
import pytest

from flux_1.cli.train import main
from flux_1.pipeline import flux1
from flux_1.training.data import DataError
from flux_1.training.trainer import TrainConfig, train
from tests.cli.common import run_main
from tests.training.tiny_runs import write_images


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(flux1.Flux1, "__init__", refuse)


def refused(argv, capsys) -> str:
    code, _, err = run_main(main, argv, capsys)
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "data folder {d} does not exist"),
    (lambda d: d.mkdir(), "data folder {d} holds no image"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"broken"), (d / "a.txt").write_text("c")),
     "no readable image left in {d}"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "data folder {d} holds no image"),
])
def test_data_errors(tmp_path, capsys, no_model_load, setup, message):
    data = tmp_path / "data"
    setup(data)
    line = refused(["--data", str(data), "--output", str(tmp_path / "out"), "--model", "schnell"], capsys)
    assert line.startswith("error: " + message.format(d=data))
    assert not (tmp_path / "out").exists()


def test_unreadable_image_and_orphan_caption_warn(tmp_path):
    data = write_images(tmp_path / "data", sizes=((64, 64), (64, 64)))
    (data / "img1.png").write_bytes(b"\x89PNG truncated")
    (data / "lonely.txt").write_text("no image")
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(AssertionError, match="stop here"):  # the data is read before the model
            flux1_init = flux1.Flux1.__init__
            try:
                flux1.Flux1.__init__ = lambda *a, **k: (_ for _ in ()).throw(AssertionError("stop here"))
                train(TrainConfig(data=data, output=tmp_path / "out", model="schnell", path=tmp_path))
            finally:
                flux1.Flux1.__init__ = flux1_init
    messages = [str(w.message) for w in caught]
    assert any(f"image {data / 'img1.png'} is not readable" in m and m.endswith("skipped") for m in messages)
    assert any(f"caption file {data / 'lonely.txt'} has no image beside it" in m for m in messages)


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "error: rank must be at least 1, got 0"),
    (["--lr=-1e-4"], "error: learning rate must be greater than 0, got -0.0001"),
    (["--steps", "0"], "error: steps must be at least 1, got 0"),
    (["--resolution", "500"], "error: resolution must be a multiple of 64, got 500"),
    (["--alpha", "nan"], "error: alpha must be a finite number, got nan"),
])
def test_bad_numbers(tmp_path, capsys, no_model_load, flags, message):
    data = write_images(tmp_path / "data")
    assert refused(["--data", str(data), "--output", str(tmp_path / "out"), *flags], capsys) == message


def test_missing_caption_is_an_error(tmp_path, no_model_load):
    data = write_images(tmp_path / "data", captions=False)
    with pytest.raises(DataError, match=r"no caption for img0.png, img1.png, img2.png in .*give --caption"):
        train(TrainConfig(data=data, output=tmp_path / "out"))


def test_full_disk_while_saving_a_checkpoint(tiny_schnell, tmp_path, capsys, monkeypatch):
    """The checkpoint of step 4 meets a full disk: one line naming it, exit 1, step 2 intact and resumable."""
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    out = tmp_path / "out"
    save = mx.save_safetensors

    def full(path, arrays, *args, **kwargs):
        if ".step_4.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(path, arrays, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full)
    flags = ["--data", str(data), "--output", str(out), "--path", str(tiny_schnell), "--model", "schnell",
             "--steps", "4", "--save-every", "2", "--resolution", "64", "--grad-accum", "1", "--quiet"]
    line = refused(flags, capsys)
    assert line.startswith(f"error: cannot write {out / 'checkpoints' / 'step_4'}: No space left on device")
    assert line.endswith(f"the previous checkpoint {out / 'checkpoints' / 'step_2'} is intact")
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]  # the temporary folder is gone
    adapters = mx.load(str(checkpoints / "step_2" / "adapter.safetensors"))
    assert adapters and all(np.isfinite(np.array(v)).all() for v in adapters.values())
    assert json.loads((checkpoints / "step_2" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(mx, "save_safetensors", save)  # space again: the run resumes from step 2
    code, stdout, _ = run_main(main, ["--resume", str(out), "--quiet"], capsys)
    assert code == 0 and stdout.strip() == f"Saved {out / 'lora.safetensors'}"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4"]


@pytest.mark.parametrize("targets, message", [("nothing_here", "match no linear module"),
                                              ("to_q(", "is not a valid regex")])
def test_targets_are_resolved_before_encoding(tiny_schnell, tmp_path, capsys, targets, message):
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    out = tmp_path / "out"
    line = refused(["--data", str(data), "--output", str(out), "--path", str(tiny_schnell), "--model", "schnell",
                    "--resolution", "64", "--targets", targets, "--quiet"], capsys)
    assert message in line
    assert not (out / "cache").exists()
