"""What each method costs, side by side, on the same model and the same loader batches.

    python benchmarks/step_cost.py                       # small ResNet, demo images, CPU
    python benchmarks/step_cost.py --model resnet50 --image-size 224 --batch 64 --device cuda

The same as ``fap bench``; see `fap.bench` for what is measured and how.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fap.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
