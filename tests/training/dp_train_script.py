"""Launched by test_distributed_training.py: `mlx.launch -n 2 --backend ring --python PY dp_train_script.py
MODEL DATA OUT STEPS`. Every rank trains the same run (batch 1 per rank, so the global batch is 2); rank 0
writes OUT. Exits non-zero, with the error, on any failure."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO / "src", REPO):
    sys.path.insert(0, str(path))

from flux_1.training.trainer import TrainConfig, train  # noqa: E402
from tests.training.tiny_runs import tiny_settings  # noqa: E402


def main(model: str, data: str, out: str, steps: str, settings: str = "{}") -> None:
    overrides = {"steps": int(steps), **json.loads(settings)}
    train(TrainConfig(**tiny_settings(Path(data), Path(out), Path(model), **overrides)))


if __name__ == "__main__":
    main(*sys.argv[1:])
