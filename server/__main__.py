"""``python -m normserve.server`` is ``normserve``."""

import sys

from normserve.server.cli import main

sys.exit(main())
