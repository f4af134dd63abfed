"""``python -m fap ...`` is the ``fap`` command."""
import sys

from fap.cli import main

sys.exit(main())
