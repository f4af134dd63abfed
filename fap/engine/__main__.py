"""``python -m fap.engine --section.key=value ...`` (see `fap.engine.main`)."""
import sys

from fap.engine import main

sys.exit(main())
