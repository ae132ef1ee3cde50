"""``normserve`` (the console script) and ``python -m normserve.tools``."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Mapping, Sequence

_TRUE = ("1", "true", "yes", "on")  # as the CLI reads a flag's variable (tools.cli)


def debug_asked(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Does this command line (or its variables) ask for the libraries' debug output: --log-level debug
    (NORMSERVE_LOG_LEVEL) with --debug-libraries (NORMSERVE_DEBUG_LIBRARIES)?"""
    given = [value for flag, value in itertools.pairwise([*argv, ""]) if flag == "--log-level"]
    given += [flag.partition("=")[2] for flag in argv if flag.startswith("--log-level=")]
    debug = (given[-1] if given else environ.get("NORMSERVE_LOG_LEVEL", "")).lower() == "debug"
    libraries = "--debug-libraries" in argv or environ.get("NORMSERVE_DEBUG_LIBRARIES", "").lower() in _TRUE
    return debug and libraries


def run() -> int:
    """The command, with gRPC's C core quiet unless the libraries' debug output is asked for.

    The core logs to stderr by itself (a failed TLS handshake, a busy port), in
    its own words, where our messages say the same for a person. It reads
    GRPC_VERBOSITY when grpc is first imported, so this is set before the
    command (and grpc) is imported, and only for the command's own process.
    """
    if not debug_asked(sys.argv[1:], os.environ):
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from normserve.tools.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
