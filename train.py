"""`python train.py --model dev --data DIR --output OUT`: see flux_1.cli.train (also the `flux1-train` script)."""

import sys
from pathlib import Path

# This checkout's src/ first: the script runs the code beside it, installed or not, with no PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from flux_1.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
