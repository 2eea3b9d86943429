"""Helpers shared by the CLI tests."""

import numpy as np
from PIL import Image


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """Run a console-script `main(argv)` in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_refused(result: tuple[int, str, str], expected: list[str], tmp_path) -> None:
    """A clean refusal: non-zero exit, every expected text in stderr, no traceback, no image written."""
    code, stdout, stderr = result
    assert code not in (0, None)
    for text in expected:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert "Traceback" not in stderr and "Saved" not in stdout
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.png"))
