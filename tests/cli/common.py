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
