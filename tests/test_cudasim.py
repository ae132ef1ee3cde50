"""The CPU harness for the CUDA kernels (tests/cudasim) does what a GPU does, and reports what a GPU hides.

Its own kernels (tests/cudasim/selftest.cu) check warp shuffles lane by lane,
barriers (a deadlock is an error naming where each thread waits), fresh
garbage in shared memory per block, faults past an argument's end, the PTX
conversions bit for bit against NumPy and ml_dtypes, and the argument checks
against the kernels' C signatures.
"""

from __future__ import annotations

from pathlib import Path

import cudasim
import ml_dtypes
import numpy as np
import pytest
from cudasim.rewrite import RewriteError, rewrite

pytestmark = pytest.mark.skipif(
    cudasim.compiler() is None, reason=f"the CUDA kernels on the CPU need a C++20 compiler: {cudasim.INSTALL_HINT}"
)
SELFTEST = Path(cudasim.__file__).with_name("selftest.cu")


def module(order: str = "fifo", seed: int = 0) -> cudasim.SimModule:
    return cudasim.SimModule(SELFTEST.read_text(), name="tests/cudasim/selftest.cu", order=order, seed=seed)


def expected_shfl_down(values: np.ndarray, delta: int, width: int) -> np.ndarray:
    """CUDA's __shfl_down_sync, warps of 32: lane l reads l + delta in its segment of ``width``, or keeps its own."""
    lane = np.arange(values.size) % 32
    src = lane + delta
    keep = (src // width) != (lane // width)
    return np.where(keep, values, values[np.minimum(np.arange(values.size) + delta, values.size - 1)])


@pytest.mark.parametrize("order", cudasim.ORDERS)
@pytest.mark.parametrize(("delta", "width"), [(1, 32), (16, 32), (5, 32), (31, 32), (0, 32), (3, 8), (1, 2), (7, 16)])
def test_shfl_down_moves_values_as_a_warp_does(delta, width, order) -> None:
    out = np.full(192, np.nan, np.float32)
    module(order).get_function("t_shfl_down_f32")(
        (2,), (96,), (out, np.int32(delta), np.int32(width), np.uint32(0xFFFFFFFF))
    )
    values = 1.5 * np.arange(192, dtype=np.float32)
    np.testing.assert_array_equal(out, expected_shfl_down(values, delta, width))


def test_shfl_down_moves_doubles_whole() -> None:
    out = np.zeros(64, np.float64)
    module().get_function("t_shfl_down_f64")((1,), (64,), (out, np.int32(3)))
    np.testing.assert_array_equal(out, expected_shfl_down(0.25 * np.arange(64) + 1e-300, 3, 32))


def test_shfl_down_respects_the_mask() -> None:
    """Lanes outside the mask do not take part; reading one of them gives garbage (NaN), as a GPU gives undefined."""
    out = np.zeros(32, np.float32)
    module().get_function("t_shfl_down_f32")((1,), (32,), (out, np.int32(4), np.int32(32), np.uint32(0x0000FFFF)))
    values = 1.5 * np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(out[:12], values[4:16])  # sources inside the mask
    assert np.isnan(out[12:16]).all()  # sources 16-19: outside the mask
    np.testing.assert_array_equal(out[16:], -1.0)  # not in the mask: no shuffle


def test_a_shuffle_mask_without_the_callers_lane_is_an_error() -> None:
    with pytest.raises(cudasim.LaunchError, match="leaves out its own lane"):
        module().get_function("t_shfl_every_lane")((1,), (32,), (np.zeros(32, np.float32), np.uint32(0xFFFFFFFE)))


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        ("t_barrier_some_threads", r"deadlock: threads 0-15 wait at __syncthreads at line 22; threads 16-63 exited"),
        (
            "t_barrier_two_sites",
            r"deadlock: threads 0-0 wait at __syncthreads at line 31; threads 1-1 wait at .*line 29",
        ),
        ("t_shfl_half_warp", r"deadlock: threads 0-15 wait at a warp shuffle at line 39; threads 16-63 exited"),
    ],
)
def test_a_deadlock_is_an_error_saying_where_each_thread_waits(kernel, message) -> None:
    with pytest.raises(cudasim.LaunchError, match=message):
        module().get_function(kernel)((1,), (64,), (np.zeros(64, np.float32),))


def test_a_deadlock_of_many_groups_is_reported_in_part() -> None:
    with pytest.raises(cudasim.LaunchError, match=r"deadlock: threads 0-0 wait .*; threads 1-1 wait"):
        module().get_function("t_barrier_two_sites")((1,), (1024,), (np.zeros(1024, np.float32),))


def test_shared_memory_starts_as_garbage_in_every_block() -> None:
    out = np.zeros(3 * 32, np.float32)
    module().get_function("t_shared_starts_as_garbage")((3,), (32,), (out,))
    assert np.isnan(out).all()


@pytest.mark.parametrize("order", cudasim.ORDERS)
def test_some_order_exposes_a_missing_barrier(order) -> None:
    """The same race, with and without its barrier: with it every order is right, without it FIFO reads garbage."""
    x = np.random.default_rng(7).normal(size=256).astype(np.float32)
    fn = module(order, seed=3).get_function("t_neighbour")
    out = np.zeros_like(x)
    fn((1,), (256,), (x, out, np.int32(1)))
    np.testing.assert_array_equal(out, np.roll(x, -1))
    fn((1,), (256,), (x, out, np.int32(0)))
    wrong = np.count_nonzero(out != np.roll(x, -1))
    if order == "fifo":  # each thread runs to its end before the next starts: its neighbour has not written
        assert wrong == 255
    elif order == "lifo":  # the reverse: only the last thread's neighbour (thread 0) comes after it
        assert wrong == 1
    else:
        assert 0 < wrong < 256


def test_indices_cover_a_3d_grid_and_block_once(rng) -> None:
    grid, block = (3, 2, 2), (4, 2, 3)
    out = np.full(12 * 24, -1, np.int32)
    module("random", seed=int(rng.integers(1000))).get_function("t_index")(grid, block, (out,))
    want = (np.arange(12)[:, None] * 10000 + np.arange(24)[None, :]).reshape(-1)
    np.testing.assert_array_equal(out, want)


def test_reading_past_an_argument_is_a_fault_naming_it() -> None:
    x, out = np.ones(100, np.float32), np.zeros(32, np.float32)
    fn = module().get_function("t_read_at")
    fn((1,), (32,), (x, out, np.int64(99)))
    np.testing.assert_array_equal(out, 1.0)
    with pytest.raises(cudasim.LaunchError, match=r"SIGSEGV .*just past the end of argument 'x', 400 bytes"):
        fn((1,), (32,), (x, out, np.int64(100)))
    np.testing.assert_array_equal(out, 1.0)  # a failed launch writes nothing back


def test_ptx_conversions_are_exact_and_round_to_nearest_even(rng) -> None:
    halves = np.arange(1 << 16, dtype=np.uint16)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-26])
    special = np.concatenate([special, -special, [np.inf, -np.inf, 1e-45, 3.4e38]]).astype(np.float32)
    # Random bit patterns (every exponent) and values near ties of both formats.
    floats = np.concatenate([special, rng.integers(0, 2**32, 1 << 16 - 1, dtype=np.uint32).view(np.float32)])
    floats = np.concatenate([floats, (rng.integers(-(2**15), 2**15, floats.size) * 2.0**-13).astype(np.float32)])
    floats = floats[~np.isnan(floats)][: halves.size]
    floats = np.concatenate([floats, rng.normal(size=halves.size - floats.size).astype(np.float32)])
    h_as_f32 = np.zeros(halves.size, np.float32)
    f_as_f16, f_as_bf16 = np.zeros(halves.size, np.uint16), np.zeros(halves.size, np.uint16)
    module().get_function("t_conversions")(
        (64,), (256,), (halves, h_as_f32, floats, f_as_f16, f_as_bf16, np.int64(halves.size))
    )
    want = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(h_as_f32.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(h_as_f32[nan]).all()
    with np.errstate(over="ignore"):  # to infinity, as the kernel rounds
        np.testing.assert_array_equal(f_as_f16, floats.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(f_as_bf16, floats.astype(ml_dtypes.bfloat16).view(np.uint16))


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(32, np.float64), np.int32(1), np.int32(32), np.uint32(1)), r"'out' \(float \*\) must be float32"),
        ((np.zeros(64, np.float32)[::2], np.int32(1), np.int32(32), np.uint32(1)), "not C-contiguous"),
        ((np.zeros(32, np.float32), 1, np.int32(32), np.uint32(1)), r"'delta' \(int\) must be np.int32, not int"),
        ((np.zeros(32, np.float32), np.int64(1), np.int32(32), np.uint32(1)), "must be np.int32, not int64"),
        ((np.zeros(32, np.float32), np.int32(1), np.int32(32)), "takes 4 arguments as a tuple, got 3"),
        ((None, np.int32(1), np.int32(32), np.uint32(1)), "must be an array or np.uint64"),
    ],
)
def test_arguments_are_checked_against_the_kernels_signature(args, message) -> None:
    with pytest.raises(cudasim.LaunchError, match=message):
        module().get_function("t_shfl_down_f32")((1,), (32,), args)


def test_an_output_argument_must_be_writable() -> None:
    out = np.zeros(32, np.float32)
    out.flags.writeable = False
    with pytest.raises(cudasim.LaunchError, match="written by the kernel but the array is read-only"):
        module().get_function("t_index")((1,), (32,), (out.view(np.int32),))


def test_launch_limits_and_unknown_kernels_are_errors() -> None:
    fn = module().get_function("t_index")
    out = np.zeros(2048, np.int32)
    with pytest.raises(cudasim.LaunchError, match="exceeds CUDA's limits"):
        fn((1,), (2048,), (out,))
    with pytest.raises(cudasim.LaunchError, match="exceeds CUDA's limits"):
        fn((1, 65536), (1,), (out,))
    with pytest.raises(cudasim.LaunchError, match="no kernel named 'nk_nothing'"):
        module().get_function("nk_nothing")


def test_rewrites_keep_every_line_and_refuse_what_they_cannot_run() -> None:
    source = SELFTEST.read_text()
    assert rewrite(source).count("\n") == source.count("\n")
    assert "asm" not in rewrite(source)
    with pytest.raises(RewriteError, match="line 2: inline PTX other than"):
        rewrite('int a;\nasm("mov.u32 %0, %%laneid;" : "=r"(a));')
    with pytest.raises(RewriteError, match="line 1: dynamic shared memory"):
        rewrite("extern __shared__ float dynamic[];")
