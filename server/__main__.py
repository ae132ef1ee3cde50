"""``python -m normserve.server`` is ``normserve``, kept for scripts that start the server this way.

Only run as a program, never imported: the server package itself still imports
nothing of :mod:`normserve.tools`.
"""

import sys

from normserve.tools.__main__ import run

sys.exit(run())
