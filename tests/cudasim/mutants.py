"""Remove each ``__syncthreads`` of the kernels in turn and show which thread orders catch it.

``make cuda-sim-mutants`` runs this: for every barrier of ``normkernels/cuda``,
a scratch copy of the source without it (the line kept, so line numbers
stay) runs the ``tests/test_fused.py`` case matrix (float32; 1 and 3
multiprocessors; grid.y as is and capped at 2) in each order. It exits 1 when
some barrier's removal passes every order: either that barrier is not
needed (remove it) or no test reaches what it protects (add one).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's helpers, test_fused

import numpy as np
import pytest
import test_fused

import cudasim
from normkernels import cuda, fused


def failures(source: str, order: str) -> list[str]:
    """The cases of the matrix that fail on ``source`` in ``order``."""
    failed = []
    for capped in (False, True):
        for case in test_fused.CASES:
            for sm_count in (1, 3):
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(fused, "poison_outputs", True)
                    if capped:
                        patch.setattr(fused, "_GRID_Y_MAX", 2)
                    fused.geometry.cache_clear()
                    try:
                        test_fused.check_fused_math(
                            *case,
                            "float32",
                            lambda: cudasim.sim_launcher(sm_count, order, seed=5, source=source),  # noqa: B023
                            np.random.default_rng(1),
                        )
                    except (AssertionError, cudasim.LaunchError) as error:
                        failed.append(f"{case[0]}{case[2]} sm_count={sm_count}{' grid.y<=2' * capped}: {error!r:.60}")
                    finally:
                        fused.geometry.cache_clear()
    return failed


def main() -> int:
    lines = cuda.source().split("\n")
    uncaught = []
    for number, line in enumerate(lines, 1):
        if "__syncthreads();" not in line:
            continue
        mutant = "\n".join(
            text.replace("__syncthreads();", ";") if i == number else text for i, text in enumerate(lines, 1)
        )
        started = time.monotonic()
        caught = {order: failures(mutant, order) for order in cudasim.ORDERS}
        print(f"line {number}: {line.strip()}  ({time.monotonic() - started:.0f} s)")
        for order, failed in caught.items():
            print(f"  {order:>6}: {len(failed)} cases fail" + (f", e.g. {failed[0]}" if failed else ""))
        if not any(caught.values()):
            uncaught.append(number)
    if uncaught:
        print(f"no order catches the removal of the barrier on line(s) {uncaught}")
    return 1 if uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
