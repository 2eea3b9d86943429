"""`flux1-train` / `python train.py`: flags, config files (TOML, JSON) and their precedence, --resume, Ctrl+C,
and one real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux_1.cli.train import main
from flux_1.training import trainer
from flux_1.training.trainer import TrainConfig, TrainingInterrupted
from tests.cli.common import run_main
from tests.training.tiny_runs import write_images

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def captured(monkeypatch):
    """The TrainConfig main() would train with (nothing is trained)."""
    configs = []

    def fake_train(config):
        configs.append(config)
        return Path(config.output) / "lora.safetensors"

    monkeypatch.setattr(trainer, "train", fake_train)
    return configs


def test_help_from_the_repo_root():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: train.py")
    for flag in ("--data", "--rank", "--grad-accum", "--resume", "--validation-prompt", "--save-format"):
        assert flag in proc.stdout


def test_flags_become_the_config(tmp_path, capsys, captured):
    code, out, _ = run_main(main, ["--model", "schnell", "--data", "d", "--output", str(tmp_path / "o"), "-q", "4",
                                   "--rank", "4", "--lr", "3e-4", "--targets", "all", "--validation-prompt", "a", "b",
                                   "--flip", "--save-format", "kohya", "--quiet"], capsys)
    assert code == 0 and out.strip() == f"Saved {tmp_path / 'o' / 'lora.safetensors'}"
    config = captured[0]
    assert (config.model, config.quantize, config.rank, config.learning_rate, config.targets) == (
        "schnell", 4, 4, 3e-4, "all")
    assert config.validation_prompts == ("a", "b") and config.flip and config.save_format == "kohya"
    assert not config.progress and not config.resume
    assert (config.steps, config.grad_accum, config.alpha) == (1000, 4, 16.0)  # defaults


def test_config_file_and_flags_override_it(tmp_path, capsys, captured):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\noutput = "o"\nrank = 8\nlr = 5e-5\nvalidation-prompt = ["x"]\nsteps = 50\n')
    code, _, _ = run_main(main, ["--config", str(toml), "--steps", "70"], capsys)
    assert code == 0
    assert (captured[0].rank, captured[0].learning_rate, captured[0].steps) == (8, 5e-5, 70)
    assert captured[0].validation_prompts == ("x",)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"data": "d", "output": "o", "grad_accum": 2}))
    assert run_main(main, ["--config", str(js)], capsys)[0] == 0 and captured[1].grad_accum == 2


@pytest.mark.parametrize("content, message", [
    ('data = "d"\nranks = 3\n', "error: unknown setting 'ranks' in "),
    ('data = "d"\n', "error: --output is required (or give it in --config)"),
    ("data = ", "is not valid TOML"),
])
def test_bad_config_files(tmp_path, capsys, captured, content, message):
    path = tmp_path / "run.toml"
    path.write_text(content)
    code, _, err = run_main(main, ["--config", str(path)], capsys)
    assert code == 1 and message in err and "Traceback" not in err and not captured


def test_missing_config_file_and_data(tmp_path, capsys, captured):
    code, _, err = run_main(main, ["--config", str(tmp_path / "none.toml")], capsys)
    assert code == 1 and f"error: config file {tmp_path / 'none.toml'} does not exist" in err
    code, _, err = run_main(main, ["--output", "o"], capsys)
    assert code == 1 and "error: --data is required" in err


def fake_checkpoint(out: Path, **settings) -> None:
    """A checkpoint folder holding only its state.json (enough for the checks made before loading)."""
    config = TrainConfig(data="d", output=out, **settings)
    folder = out / "checkpoints" / "step_3"
    folder.mkdir(parents=True)
    state = {"version": trainer.STATE_VERSION, "step": 3, "config": config.as_json(), "world_size": 1,
             "data_fingerprint": "x"}
    (folder / "state.json").write_text(json.dumps(state))


def test_resume_takes_the_checkpoint_settings(tmp_path, capsys, captured):
    out = tmp_path / "out"
    fake_checkpoint(out, rank=4, steps=10)
    code, _, _ = run_main(main, ["--resume", str(out), "--steps", "20"], capsys)
    assert code == 0
    config = captured[0]
    assert config.resume and Path(config.output) == out.resolve()
    assert (config.rank, config.steps) == (4, 20)


def test_resume_refuses_a_conflicting_flag(tmp_path, capsys):
    out = tmp_path / "out"
    fake_checkpoint(out, rank=4)
    code, _, err = run_main(main, ["--resume", str(out), "--rank", "8"], capsys)
    assert code == 1 and "rank is 8 but the checkpoint was trained with 4" in err and "Traceback" not in err
    code, _, err = run_main(main, ["--resume", str(out), "--output", str(tmp_path / "elsewhere")], capsys)
    assert code == 1 and "differ: the run continues in" in err


def test_ctrl_c_exits_130_naming_the_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise TrainingInterrupted(7, Path(config.output) / "checkpoints" / "step_7")

    monkeypatch.setattr(trainer, "train", interrupted)
    code, _, err = run_main(main, ["--data", "d", "--output", str(tmp_path / "o")], capsys)
    assert code == 130
    assert err.strip() == (f"interrupted at step 7: checkpoint {tmp_path / 'o' / 'checkpoints' / 'step_7'}; "
                           f"continue with flux1-train --resume {tmp_path / 'o'}")


def test_a_real_run(tiny_schnell, tmp_path, capsys):
    data = write_images(tmp_path / "data", sizes=((64, 64),))
    out = tmp_path / "out"
    code, stdout, stderr = run_main(main, ["--model", "schnell", "--path", str(tiny_schnell), "--data", str(data),
                                           "--output", str(out), "--steps", "2", "--grad-accum", "1",
                                           "--resolution", "64", "--trigger", "TOK"], capsys)
    assert code == 0, stderr
    assert stdout.strip() == f"Saved {out / 'lora.safetensors'}"
    assert "training" in stderr and "Traceback" not in stderr  # the progress bar
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
