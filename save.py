"""`python save.py --model schnell --path OUT -q 4`: see flux_1.cli.save (also the `flux1-save` script)."""

import sys
from pathlib import Path

try:
    from flux_1.cli.save import main
except ModuleNotFoundError:  # a plain checkout, not installed: use src/
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from flux_1.cli.save import main

if __name__ == "__main__":
    main()
