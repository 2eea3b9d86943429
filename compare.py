"""`python compare.py --model dev --prompt P --lora-paths X --strengths 0 0.5 1`: see flux_1.cli.compare
(also the `flux1-compare` script)."""

import sys
from pathlib import Path

# This checkout's src/ first: the script runs the code beside it, installed or not, with no PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from flux_1.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    main()
