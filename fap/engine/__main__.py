"""``python -m fap.engine --section.key=value ...``: train from the default config plus overrides.

Recipes (``recipes/*.py``) are the usual entry point; this runs any config without one,
e.g. ``accelerate launch -m fap.engine --data.source=demo --data.path=data/demo``. A
mistake in the config, data or checkpoint is one or two lines and exit status 2
(`fap.cli.train_cli`; ``--debug`` shows the traceback).
"""
import sys
from typing import List, Optional

from fap.cli import train_cli
from fap.config import TrainConfig


def main(argv: Optional[List[str]] = None) -> int:
    """Train `TrainConfig()` with the overrides in ``argv`` (default ``sys.argv[1:]``)."""
    return train_cli(TrainConfig(), argv, prog="python -m fap.engine")


if __name__ == "__main__":
    sys.exit(main())
