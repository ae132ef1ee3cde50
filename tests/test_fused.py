"""The fused CUDA path without a GPU: the sources compile, and the host side is right.

* ``nvcc`` compiles every ``normkernels/cuda/*.cu`` for sm_80 and sm_90 and the
  result holds every kernel the launcher asks for.
* The geometry's index maps give every element its statistic and parameter,
  as NumPy broadcasting does, for every kind and many shapes.
* ``normkernels.fused`` run on a NumPy emulation of the kernels
  (tests/kernel_emulator.py) equals a float64 reference: splits, column
  layouts, merges, and the per-statistic math of forward and backward.
* The same case matrix runs on the real kernel source, compiled for the CPU
  (tests/cudasim: each CUDA thread a fiber, true barriers and warp
  shuffles) and launched through ``fused.CudaLauncher``'s own marshalling,
  with the threads of each block in several orders between barriers.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import cudasim
import numpy as np
import pytest
from conftest import core_float64, randomize, stored, stored_values
from kernel_emulator import NumpyLauncher

import normkernels as nk
from normkernels import core, cuda, fused

NVCC = shutil.which("nvcc")

# kind, config, input shape: chosen so that every layout and branch runs somewhere.
CASES = [
    ("batch_norm", {"num_features": 6}, (40, 6, 50)),  # row layout, several splits
    ("batch_norm", {"num_features": 48}, (300, 48)),  # (N, C): column layout
    ("batch_norm", {"num_features": 5}, (64, 5, 3)),  # short lines: columns with K sub-columns
    ("batch_norm", {"num_features": 1, "affine": False}, (7, 1, 4, 5)),  # size-1 axes
    ("instance_norm", {"num_features": 4, "affine": True, "track_running_stats": True}, (3, 4, 300)),
    ("instance_norm", {"num_features": 2}, (1, 2, 9000)),  # few long lines: split statistics
    ("group_norm", {"num_groups": 3, "num_channels": 12}, (5, 12, 7, 3)),
    ("group_norm", {"num_groups": 1, "num_channels": 4}, (2, 4, 40)),
    ("layer_norm", {"normalized_shape": [24]}, (9, 24)),
    ("layer_norm", {"normalized_shape": [5, 60]}, (3, 2, 5, 60)),
    ("layer_norm", {"normalized_shape": [64], "bias": False}, (1, 64)),
    ("rms_norm", {"normalized_shape": [300]}, (40, 300)),
    ("rms_norm", {"normalized_shape": [8], "elementwise_affine": False}, (33, 8)),
]
SM_COUNTS = (1, 3, 132)
#: What runs the kernels: the NumPy emulation, or the .cu itself on the CPU with the threads in an order.
LAUNCHERS = ["emulator", *(f"cpu-{order}" for order in cudasim.ORDERS)]
HAVE_CXX = cudasim.compiler() is not None


def make_launcher(name: str, sm_count: int, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch):
    """A launcher for ``name`` (see LAUNCHERS); the CPU-CUDA ones poison every output and scratch buffer."""
    if name == "emulator":
        return NumpyLauncher(sm_count)
    if not HAVE_CXX:
        pytest.skip(f"the CUDA kernels on the CPU need a C++20 compiler: {cudasim.INSTALL_HINT}")
    monkeypatch.setattr(fused, "poison_outputs", True)
    return cudasim.sim_launcher(sm_count, order=name.removeprefix("cpu-"), seed=int(rng.integers(2**32)))


def launched(launcher) -> list[str]:
    """The kernels a launcher ran, by their names in the .cu (``nk_`` and the dtype suffixes dropped)."""
    if isinstance(launcher, NumpyLauncher):
        return launcher.launches
    return [name.removeprefix("nk_") for name in launcher._module.launched]


def _plan(kind: str, config: dict, shape: tuple[int, ...]) -> core.Plan:
    return nk.make_layer(kind, **config)._plan(shape)


# --------------------------------------------------------------------------- compilation
def kernel_names() -> set[str]:
    """Every kernel fused.CudaLauncher may launch."""
    combos = [("f16", "f32"), ("bf16", "f32"), ("f32", "f32"), ("f16", "f64"), ("bf16", "f64")]
    combos += [("f32", "f64"), ("f64", "f64")]
    merges = {op.removesuffix("_weighted") for op in fused.FIELDS}
    names = {f"nk_merge_{m}_{a}" for m in merges for a in ("f32", "f64")}
    for ts, acc in combos:
        names |= {f"nk_{k}_{ts}_{acc}" for k in ("normalize", "grad_input", "forward_lines")}
        names |= {f"nk_reduce_{lay}_{op}_{ts}_{acc}" for lay in ("rows", "cols") for op in fused.FIELDS}
    return names


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CI has it)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_for_ampere_and_hopper(arch, tmp_path) -> None:
    assert cuda.sources(), "no .cu files found beside normkernels/cuda/__init__.py"
    entries: set[str] = set()
    for number, source in enumerate(cuda.sources()):
        # The cubin runs ptxas too (register allocation); warnings are errors. --keep leaves the PTX that
        # build made, so one nvcc run per source gives both (front ends take most of nvcc's time).
        keep = tmp_path / f"keep-{number}"
        keep.mkdir()
        cmd = [NVCC, f"-arch={arch}", "-cubin", *cuda.OPTIONS, "-Werror", "all-warnings", "--keep", "--keep-dir"]
        done = subprocess.run(
            [*cmd, str(keep), "-o", str(tmp_path / "k.cubin"), str(source)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        ptx = [path.read_text() for path in keep.glob("*.ptx")]
        assert ptx, f"nvcc --keep left no PTX in {sorted(p.name for p in keep.iterdir())}"
        entries |= {entry for text in ptx for entry in re.findall(r"\.entry\s+(\w+)", text)}
    assert kernel_names() <= entries, sorted(kernel_names() - entries)


def test_the_module_source_is_every_cu_file() -> None:
    text = cuda.source()
    for path in cuda.sources():
        assert path.read_text() in text
    assert "#include" not in text  # NVRTC gets no system headers: conversions are PTX instructions


# --------------------------------------------------------------------------- index maps
@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize(("kind", "config", "shape"), CASES)
def test_index_maps_match_broadcasting(kind, config, shape, sm_count) -> None:
    plan = _plan(kind, config, shape)
    geo = fused.geometry(plan, sm_count)
    assert geo is not None, f"{kind} {shape} does not fit the kernels"

    def owner(shape_: tuple[int, ...]) -> np.ndarray:
        """Each element's flat index into ``shape_`` (a keepdims shape), by broadcasting."""
        return np.broadcast_to(np.arange(math.prod(shape_)).reshape(shape_), plan.view).reshape(-1)

    stat, param = owner(plan.stat_shape), owner(plan.param_shape)
    ew = geo.elementwise
    assert ew.lines * ew.K == math.prod(plan.view)
    line, k = np.divmod(np.arange(math.prod(plan.view)), ew.K)
    np.testing.assert_array_equal(geo.train_map.stat(line), stat)
    np.testing.assert_array_equal(geo.train_map.param(line, k), param)
    if geo.eval_map is not None:  # running statistics are per parameter (kinds without them may have no map)
        np.testing.assert_array_equal(geo.eval_map.stat(line), param)
    else:
        assert kind not in ("batch_norm", "instance_norm")  # the kinds with running statistics
    for reduction, groups in ((geo.stats, plan.stat_shape), (geo.cells, plan.joint_shape), (geo.params, param)):
        groups = owner(groups) if isinstance(groups, tuple) else groups
        r_line, r_k = np.divmod(np.arange(math.prod(plan.view)), reduction.K)
        np.testing.assert_array_equal(r_line % reduction.B, groups)  # group b of line a * B + b
        np.testing.assert_array_equal(reduction.map.stat(r_line), stat)
        np.testing.assert_array_equal(reduction.map.param(r_line, r_k), param)
        assert 1 <= reduction.splits <= max(1, reduction.A * reduction.K)
        assert reduction.grid[1] <= 65535


def test_geometry_picks_the_layout_a_shape_needs() -> None:
    bn1d = fused.geometry(_plan("batch_norm", {"num_features": 48}, (300, 48)), 132)
    assert bn1d.stats.columns
    assert bn1d.elementwise.flat
    bn2d = fused.geometry(_plan("batch_norm", {"num_features": 8}, (64, 8, 32, 32)), 132)
    assert not bn2d.stats.columns
    assert bn2d.stats.splits > 1
    assert not bn2d.per_line_forward
    ln = fused.geometry(_plan("layer_norm", {"normalized_shape": [1024]}, (4096, 1024)), 132)
    assert ln.per_line_forward
    assert not ln.elementwise.flat
    assert ln.params.columns
    few_long = fused.geometry(_plan("instance_norm", {"num_features": 2}, (1, 2, 1 << 20)), 132)
    assert not few_long.per_line_forward
    assert few_long.stats.splits > 1


# --------------------------------------------------------------------------- math on emulated kernels
STORAGE = {
    "float32": (np.float32, np.float32, 2e-5),
    "float64": (np.float64, np.float64, 1e-11),
    "float16": (np.float16, np.float32, 1e-2),
    "bfloat16": (np.uint16, np.float32, 1e-2),
    "float32-in-float64": (np.float32, np.float64, 1e-6),
}


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize(("kind", "config", "shape"), CASES)
def test_fused_math_on_kernels_matches_float64(
    kind, config, shape, storage, sm_count, launcher_name, rng, monkeypatch
) -> None:
    check_fused_math(
        kind, config, shape, storage, lambda: make_launcher(launcher_name, sm_count, rng, monkeypatch), rng
    )


def check_fused_math(kind, config, shape, storage, new_launcher, rng) -> None:
    """fused's training and eval passes on ``new_launcher()``'s kernels equal core's float64 math."""
    _, acc, tol = STORAGE[storage]
    acc = np.dtype(acc)
    layer = nk.make_layer(kind, **config, dtype=acc)
    randomize(layer, rng)
    plan = layer._plan(shape)
    x = stored(rng.normal(1.5, 2.0, shape), storage)
    dy = stored(rng.normal(size=shape), storage)
    weight, bias = layer._params(plan, acc)
    eps = layer._eps_for(acc)
    xv, dyv = x.reshape(plan.view), dy.reshape(plan.view)
    for training in (True, False) if layer.track_running_stats else (True,):
        launcher = new_launcher()
        y_ref, stats_ref, (dx_ref, dw_ref, db_ref) = core_float64(layer, plan, x, dy, training)
        if training:
            y, stats = fused.forward_train(xv, plan, weight, bias, eps, acc, launcher=launcher)
            for got, want in zip(stats, stats_ref, strict=True):
                assert (got is None) == (want is None)
                if got is not None:
                    assert got.shape == plan.stat_shape
                    assert got.dtype == acc
                    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
            grads = fused.backward(xv, dyv, plan, weight, eps, acc, launcher=launcher)
        else:
            running = layer._running_moments(plan)
            y = fused.forward_eval(xv, plan, running, weight, bias, eps, acc, launcher=launcher)
            grads = fused.backward(xv, dyv, plan, weight, eps, acc, running, launcher=launcher)
        assert y.dtype == x.dtype
        assert grads[0].dtype == x.dtype
        np.testing.assert_allclose(stored_values(y), y_ref, rtol=tol, atol=tol)
        dx, dw, db = grads
        scale = np.abs(dx_ref).max()
        np.testing.assert_allclose(stored_values(dx), dx_ref, rtol=tol, atol=tol * scale)
        count = math.prod(shape) / math.prod(plan.param_shape)
        for got, want in ((dw, dw_ref), (db, db_ref)):
            assert got.shape == plan.param_shape
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * count)
        # Both passes ran on the kernels, not on core's fallback.
        names = " ".join(launched(launcher))
        assert "grad_input" in names
        assert "normalize" in names or "forward_lines" in names


def test_backward_is_one_reduction_and_one_elementwise_pass_for_folding_kinds(rng) -> None:
    plan = _plan("batch_norm", {"num_features": 6}, (40, 6, 50))
    x, dy = rng.normal(size=plan.view).astype(np.float32), rng.normal(size=plan.view).astype(np.float32)
    launcher = NumpyLauncher(132)
    fused.backward(x, dy, plan, None, 1e-5, np.dtype(np.float32), launcher=launcher)
    assert launcher.launches == ["reduce_rows_comoments", "grad_input"]
    launcher.launches.clear()
    fused.forward_train(x, plan, None, None, 1e-5, np.dtype(np.float32), launcher=launcher)
    assert launcher.launches == ["reduce_rows_moments", "normalize"]
    ln = _plan("layer_norm", {"normalized_shape": [256]}, (512, 256))
    launcher.launches.clear()
    xl = rng.normal(size=ln.view).astype(np.float32)
    fused.forward_train(xl, ln, None, None, 1e-5, np.dtype(np.float32), launcher=launcher)
    assert launcher.launches == ["forward_lines"]


def test_statistics_survive_a_large_mean(rng) -> None:
    """Welford/Chan: a float32 batch with mean 3000 and std 0.1 keeps its variance."""
    plan = _plan("batch_norm", {"num_features": 3}, (64, 3, 100))
    x = rng.normal(3000.0, 0.1, plan.view).astype(np.float32)
    _, stats = fused.forward_train(x, plan, None, None, 1e-5, np.dtype(np.float32), launcher=NumpyLauncher(7))
    want = x.astype(np.float64).var(axis=(0, 2))
    np.testing.assert_allclose(stats.var.reshape(-1), want, rtol=1e-3)


# --------------------------------------------------------------------------- the kernels on the CPU
# Shapes at the edges of the launch geometry, in the half-precision storages.
EDGE_CASES = [
    ("layer_norm", {"normalized_shape": [257]}, (3, 257)),  # lines one past a multiple of the block
    ("layer_norm", {"normalized_shape": [3]}, (70, 3)),  # lines shorter than a warp; blocks walk several lines
    ("rms_norm", {"normalized_shape": [4097]}, (2, 4097)),  # few long lines: split reductions, line-mode passes
    ("batch_norm", {"num_features": 33}, (31, 33)),  # columns with a partial last warp
    ("batch_norm", {"num_features": 3}, (1, 3, 1000)),  # one sample
    ("group_norm", {"num_groups": 5, "num_channels": 5}, (7, 5, 33)),
    ("instance_norm", {"num_features": 3}, (2, 3, 2)),  # lines of two
]


@pytest.mark.parametrize("order", cudasim.ORDERS)
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize(("kind", "config", "shape"), EDGE_CASES)
def test_half_precision_edge_shapes_on_the_kernels(kind, config, shape, storage, order, rng, monkeypatch) -> None:
    check_fused_math(kind, config, shape, storage, lambda: make_launcher(f"cpu-{order}", 1, rng, monkeypatch), rng)


@pytest.mark.parametrize("order", cudasim.ORDERS)
@pytest.mark.parametrize(("kind", "config", "shape"), [CASES[0], CASES[4], CASES[8], CASES[11]])
def test_blocks_that_walk_more_groups_than_grid_y(kind, config, shape, order, rng, monkeypatch) -> None:
    """Past 65,535 groups a block reduces several in turn (block_reduce's trailing barrier keeps them apart),
    and elementwise blocks walk several lines: the same loops, reached here with grid.y capped at 2."""
    monkeypatch.setattr(fused, "_GRID_Y_MAX", 2)
    fused.geometry.cache_clear()
    try:
        geo = fused.geometry(_plan(kind, config, shape), 3)
        assert max(r.B for r in (geo.stats, geo.cells, geo.params) if not r.columns) > 2
        check_fused_math(
            kind, config, shape, "float32", lambda: make_launcher(f"cpu-{order}", 3, rng, monkeypatch), rng
        )
    finally:
        fused.geometry.cache_clear()


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_the_fallback_to_core_reads_half_precision_values(storage, rng) -> None:
    """Shapes no geometry fits run on core: on bfloat16's values, not its uint16 bit patterns; outputs as stored."""
    layer = nk.make_layer("layer_norm", normalized_shape=[1], dtype=np.float32)
    randomize(layer, rng)
    plan = layer._plan((5, 1))
    assert fused.geometry(plan, 3) is None
    x, dy = stored(rng.normal(-1.3, 2.0, (5, 1)), storage), stored(rng.normal(size=(5, 1)), storage)
    weight, bias = layer._params(plan, np.dtype(np.float32))
    launcher = NumpyLauncher(3)
    y, stats = fused.forward_train(x, plan, weight, bias, 1e-5, np.dtype(np.float32), launcher=launcher)
    dx, dw, db = fused.backward(x, dy, plan, weight, 1e-5, np.dtype(np.float32), launcher=launcher)
    assert launcher.launches == []
    y_ref, stats_ref, (dx_ref, dw_ref, db_ref) = core_float64(layer, plan, x, dy, True)
    np.testing.assert_allclose(stats.mean, stats_ref.mean, rtol=1e-6)
    np.testing.assert_allclose(stats.mean.reshape(-1), stored_values(x).reshape(-1), rtol=1e-6)  # one element each
    assert y.dtype == x.dtype
    assert dx.dtype == x.dtype
    np.testing.assert_allclose(stored_values(y), y_ref, atol=1e-2)
    np.testing.assert_allclose(stored_values(dx), dx_ref, atol=1e-2)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-4)
    np.testing.assert_allclose(db, db_ref, atol=1e-4)
