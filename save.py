"""`python save.py --model schnell --path OUT -q 4`: see flux_1.cli.save (also the `flux1-save` script)."""

import sys
from pathlib import Path

# This checkout's src/ first: the script runs the code beside it, installed or not, with no PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from flux_1.cli.save import main  # noqa: E402

if __name__ == "__main__":
    main()
