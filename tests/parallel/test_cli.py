"""flux1-generate --parallel tensor|data under mlx.launch (2 local ranks), and the refusals around it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from flux_1.cli.main import main
from flux_1.parallel import LAUNCHER_VARIABLES
from tests.parallel.launching import launch

ARGS = ["-m", "schnell", "-p", "a red fox", "--steps", "2", "--width", "32", "--height", "32"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_schnell):
    """Seed 3 in one plain process (which must never start the distributed engine)."""
    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as m:
        for name in LAUNCHER_VARIABLES:
            m.delenv(name, raising=False)
        m.setattr(mx.distributed, "init", lambda *a, **k: pytest.fail("a plain run started mx.distributed"))
        main([*ARGS, "--path", str(tiny_schnell), "--seed", "3", "-o", str(out / "single.png")])
    return np.asarray(Image.open(out / "single.png")).astype(int)


def test_tensor_parallel_writes_one_image_on_rank_0(tmp_path, tiny_schnell, single):
    run = launch("-m", "flux_1.cli.main", *ARGS, "--path", str(tiny_schnell), "--seed", "3", "-o",
                 str(tmp_path / "out" / "tp.png"), "--parallel", "tensor")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tp.png"]
    assert run.stdout.count("Saved ") == 1
    image = np.asarray(Image.open(tmp_path / "out" / "tp.png")).astype(int)
    assert np.abs(image - single).max() <= 1


def test_data_parallel_deals_the_seeds(tmp_path, tiny_schnell, single):
    run = launch("-m", "flux_1.cli.main", *ARGS, "--path", str(tiny_schnell), "--seed", "3", "4", "-o",
                 str(tmp_path / "out") + "/", "--parallel", "data")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2: seeds 3" in run.stdout and "rank 1 of 2: seeds 4" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flux_3.png", "flux_4.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "flux_3.png")).astype(int), single)


def test_parallel_without_a_launcher_is_refused(tmp_path, tiny_schnell, monkeypatch, capsys):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "--path", str(tiny_schnell), "-o", str(tmp_path / "x.png"), "--parallel", "tensor"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --parallel tensor needs several processes: start it with mlx.launch")
    assert "\n" not in err and not (tmp_path / "x.png").exists()


def test_bad_timeout_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "-o", str(tmp_path / "x.png"), "--parallel", "data", "--parallel-timeout", "0"])
    assert e.value.code == 2 and "--parallel-timeout must be a positive number" in capsys.readouterr().err


def test_launched_without_parallel_is_refused_on_every_rank(tmp_path, tiny_schnell):
    run = launch("-m", "flux_1.cli.main", *ARGS, "--path", str(tiny_schnell), "-o", str(tmp_path / "x.png"))
    assert run.stderr.count("error: this is one of 2 processes started by a launcher: pass --parallel") == 2
    assert not (tmp_path / "x.png").exists()
