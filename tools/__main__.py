"""``python -m normserve.tools`` is ``normserve``."""

import sys

from normserve.tools.cli import main

sys.exit(main())
