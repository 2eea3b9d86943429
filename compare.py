"""`python compare.py --model dev --prompt P --lora-paths X --strengths 0 0.5 1`: see flux_1.cli.compare
(also the `flux1-compare` script)."""

import sys
from pathlib import Path

try:
    from flux_1.cli.compare import main
except ModuleNotFoundError:  # a plain checkout, not installed: use src/
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from flux_1.cli.compare import main

if __name__ == "__main__":
    main()
