"""CUDA kernels on the CPU: normkernels/cuda/*.cu compiled with g++ against a fiber runtime.

``cuda_shim.h`` (keywords, index variables, intrinsics) and ``fibers.h`` (each CUDA
thread a fiber; true barriers, exact warp shuffles, deadlocks reported) make the
real kernel source a C++20 translation unit; ``rewrite`` adapts the two things no
macro can (inline PTX, ``__shared__``); ``loader`` builds, caches and launches it
as CuPy's RawModule would. See docs/gpu.md for what it proves and what it cannot.
"""

from .loader import INSTALL_HINT, ORDERS, LaunchError, SimModule, compiler, sim_launcher

__all__ = ["INSTALL_HINT", "ORDERS", "LaunchError", "SimModule", "compiler", "sim_launcher"]
