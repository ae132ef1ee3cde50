"""The compiled CPU path (normkernels.compiled on the numba kernels of normkernels.cpu_kernels).

* Its math equals a float64 reference for every kind, layout and branch the
  kernels have (short lines, long lines split into segments, few lines, row
  and column reductions), input dtype and thread count.
* NaN and Inf propagate (the non-finite checks rely on it); fastmath keeps IEEE.
* Eight threads calling parallel kernels at once get the answers one thread gets.
* After warm_up nothing compiles, whatever arrays come in (read-only, unaligned,
  strided, float16); the cache lives in NORMKERNELS_CACHE_DIR, never beside the
  sources, and a second process starts from it without compiling.
* The server warms up before it serves; the images cache kernels as their user.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import core_float64, randomize, stored_values
from serverproc import patience
from test_deploy import IMAGES, image_environment
from test_fused import CASES

import normkernels as nk
from normkernels import compiled, core, cpu_kernels, fused

# Shapes that reach the branches CASES (test_fused) does not: lines longer than a segment, one huge
# line, tall and wide column reductions, short lines whose map period is too long to spread.
EXTRA = [
    ("batch_norm", {"num_features": 6}, (1, 6, 40)),  # one period of the map: a line at a time, not spread
    ("layer_norm", {"normalized_shape": [5000]}, (3, 5000)),
    ("rms_norm", {"normalized_shape": [4500]}, (5, 4500)),
    ("instance_norm", {"num_features": 1, "affine": True}, (1, 1, 70000)),
    ("group_norm", {"num_groups": 2, "num_channels": 4}, (1, 4, 3000)),
    ("batch_norm", {"num_features": 8}, (4096, 8)),
    ("batch_norm", {"num_features": 3000}, (6, 3000, 2)),
    ("batch_norm", {"num_features": 40000, "affine": False}, (2, 40000, 2)),
    ("batch_norm", {"num_features": 16}, (8, 16, 3000)),
]
# Statistics over the channels at each pixel (cpu_kernels.forward_pixels): odd sizes, samples of
# several tiles with a short last one, more channels than a segment, one sample, 3-D spatial.
PIXELS = [
    ("layer_norm_2d", {"num_features": 7}, (3, 7, 5, 9)),
    ("layer_norm_2d", {"num_features": 96}, (2, 96, 37, 41)),
    ("layer_norm_2d", {"num_features": 2100, "bias": False}, (2, 2100, 3, 5)),
    ("layer_norm_2d", {"num_features": 5, "elementwise_affine": False}, (4, 5, 1, 33)),
    ("layer_norm_2d", {"num_features": 3}, (1, 3, 2, 3, 2)),
]
STORAGE = {  # input dtype, layer dtype, tolerance
    "float32": (np.float32, np.float32, 2e-5),
    "float64": (np.float64, np.float64, 1e-11),
    "float16": (np.float16, np.float32, 1e-2),
    "float32-in-float64": (np.float32, np.float64, 1e-6),
}


@pytest.fixture
def threads():
    """Set the kernels' threads per call for one test (restored afterwards)."""
    yield compiled.set_threads
    compiled.set_threads(None)


def _close(got, want, tol: float, scale: float = 1.0) -> None:
    np.testing.assert_allclose(stored_values(np.asarray(got)), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("thread_count", [1, 2, 3])
@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize(("kind", "config", "shape"), CASES + EXTRA + PIXELS)
def test_compiled_math_matches_float64(kind, config, shape, storage, thread_count, threads, monkeypatch, rng) -> None:
    threads(thread_count)
    monkeypatch.setattr(compiled, "PARALLEL_MIN_BYTES", 0)  # every size splits its work among the threads
    x_dtype, layer_dtype, tol = STORAGE[storage]
    layer = nk.make_layer(kind, **config, dtype=layer_dtype)
    randomize(layer, rng)
    plan = layer._plan(shape)
    acc = np.dtype(np.float64 if np.float64 in (x_dtype, layer_dtype) else np.float32)
    x = rng.normal(1.5, 2.0, shape).astype(x_dtype)
    dy = rng.normal(size=shape).astype(x_dtype)
    weight, bias = layer._params(plan, acc)
    eps = layer._eps_for(acc)
    xv, dyv = x.reshape(plan.view), dy.reshape(plan.view)
    count = math.prod(shape) / math.prod(plan.param_shape)
    for training in (True, False) if layer.track_running_stats else (True,):
        y_ref, stats_ref, (dx_ref, dw_ref, db_ref) = core_float64(layer, plan, x, dy, training)
        if training:
            y, stats = compiled.forward_train(xv, plan, weight, bias, eps, acc)
            for got, want in zip(stats, stats_ref, strict=True):
                assert (got is None) == (want is None)
                if got is not None:
                    assert got.shape == plan.stat_shape
                    assert got.dtype == acc
                    _close(got, want, tol)
            moments = compiled.moments(xv, plan, acc)
            _close(moments.var, stats_ref.var, tol)
            grads = compiled.backward(xv, dyv, plan, weight, eps, acc)
        else:
            running = layer._running_moments(plan)
            y = compiled.forward_eval(xv, plan, running, weight, bias, eps, acc)
            grads = compiled.backward(xv, dyv, plan, weight, eps, acc, running)
        _close(y, y_ref, tol)
        _close(grads[0], dx_ref, tol, np.abs(dx_ref).max())
        for got, want in zip(grads[1:], (dw_ref, db_ref), strict=True):
            assert got.shape == plan.param_shape
            _close(got, want, tol, count)


@pytest.mark.parametrize(("kind", "config", "shape"), CASES[:4] + EXTRA[-3:])
def test_synchronized_passes_match_the_core(kind, config, shape, rng) -> None:
    """grad_sums + grad_input (what synchronized batch norm runs per worker) equal the core's."""
    layer = nk.make_layer(kind, **config)
    randomize(layer, rng)
    plan = layer._plan(shape)
    f32 = np.dtype(np.float32)
    xv = rng.normal(3.0, 2.0, plan.view).astype(np.float32)
    dyv = rng.normal(size=plan.view).astype(np.float32)
    weight, _ = layer._params(plan, f32)
    for stats in (None, layer._running_moments(plan)):
        want_centered, want = core.grad_sums(xv, dyv, plan, f32, stats)
        got_centered, got = compiled.grad_sums(xv, dyv, plan, f32, stats)
        assert got.count == want.count
        pairs = [(got.moments.mean, want.moments.mean), (got.moments.var, want.moments.var)]
        pairs += [(got.sum_dy, want.sum_dy), (got.sum_dy_xmu, want.sum_dy_xmu)]
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-3)
        dx, dw, db = compiled.grad_input(got_centered, dyv, plan, weight, 1e-5, f32, got, training=True)
        dx_want, dw_want, db_want = core.grad_input(want_centered, dyv, plan, weight, 1e-5, f32, want, True)
        np.testing.assert_allclose(dx, dx_want, rtol=2e-4, atol=2e-4 * np.abs(dx_want).max())
        np.testing.assert_allclose(dw, dw_want, rtol=2e-4, atol=1e-2)
        np.testing.assert_allclose(db, db_want, rtol=2e-4, atol=1e-2)
        assert got_centered.d is xv  # x itself, never written


@pytest.mark.parametrize(("kind", "config", "shape"), CASES + EXTRA + PIXELS)
def test_nan_and_inf_reach_the_statistics_and_outputs(kind, config, shape, rng) -> None:
    """fastmath without nnan/ninf: a NaN or Inf input shows in its group's statistics, as in the core."""
    layer = nk.make_layer(kind, **config)
    plan = layer._plan(shape)
    f32 = np.dtype(np.float32)
    weight, bias = layer._params(plan, f32)
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.normal(size=plan.view).astype(np.float32)
        x.reshape(-1)[rng.integers(x.size)] = bad
        y, stats = compiled.forward_train(x, plan, weight, bias, 1e-5, f32)
        with np.errstate(all="ignore"):  # NumPy warns where the kernels stay silent
            y_want, stats_want = core.forward_train(x, plan, weight, bias, 1e-5, f32)
        np.testing.assert_array_equal(np.isfinite(stats.var), np.isfinite(stats_want.var))
        np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y_want))
        with pytest.raises(nk.NonFiniteError):
            layer.forward(x.reshape(shape))


def test_channels_first_plans_and_only_they_run_the_pixel_kernels() -> None:
    for kind, config, shape in CASES + EXTRA + PIXELS:
        plan = nk.make_layer(kind, **config)._plan(shape)
        geo = fused.geometry(plan, 2)
        px = compiled._pixels(plan, 4)
        assert (px is not None) == (kind == "layer_norm_2d") == (geo is None)
        if px is not None:
            assert px[:3] == (shape[0], shape[1], math.prod(shape[2:]))
            assert px.P == px.S or (
                px.P % compiled._PIXEL_ALIGN == 0 and px.P * px.C * 4 <= 2 * compiled._PIXEL_TILE_BYTES
            )
    px = compiled._pixels(nk.make_layer("layer_norm_2d", num_features=96)._plan((2, 96, 37, 41)), 4)
    assert px.tiles == 6  # 512 + 512 + 493 pixels a sample


@pytest.mark.parametrize("thread_count", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_first_kernels_without_centering_match_float64(dtype, thread_count, threads, monkeypatch, rng) -> None:
    """The pixel kernels' RMS branch (no kind uses it yet): a plan like LayerNorm2d's, center=False."""
    threads(thread_count)
    monkeypatch.setattr(compiled, "PARALLEL_MIN_BYTES", 0)
    plan = core.Plan(view=(3, 2100, 21), stat_shape=(3, 1, 21), param_shape=(1, 2100, 1), center=False)
    acc, tol = np.dtype(dtype), 2e-5 if dtype == np.float32 else 1e-11
    x = rng.normal(1.5, 2.0, plan.view).astype(dtype)
    dy = rng.normal(size=plan.view).astype(dtype)
    weight, bias = (rng.normal(0.3, 0.8, plan.param_shape).astype(dtype) for _ in range(2))
    f64 = np.dtype(np.float64)
    y_ref, stats_ref = core.forward_train(x.astype(f64), plan, weight.astype(f64), bias.astype(f64), 1e-6, f64)
    dx_ref, dw_ref, db_ref = core.backward(x.astype(f64), dy.astype(f64), plan, weight.astype(f64), 1e-6, f64)
    y, stats = compiled.forward_train(x, plan, weight, bias, 1e-6, acc)
    assert stats.mean is None
    assert isinstance(stats, compiled.CheckedMoments)
    _close(stats.var, stats_ref.var, tol)
    _close(y, y_ref, tol)
    dx, dw, db = compiled.backward(x, dy, plan, weight, 1e-6, acc)
    _close(dx, dx_ref, tol, np.abs(dx_ref).max())
    _close(dw, dw_ref, tol, 63)
    _close(db, db_ref, tol, 63)


def test_eval_gradient_ignores_non_finite_x_as_the_core_does(rng) -> None:
    layer = nk.BatchNorm(4)
    randomize(layer, rng)
    x = rng.normal(size=(8, 4, 30)).astype(np.float32)
    x[0, 0, 0] = np.inf
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, _ = layer.backward(x, dy, training=False)
    assert np.isfinite(dx).all()


def test_eight_threads_calling_parallel_kernels_at_once_get_one_threads_answers(rng) -> None:
    """The server calls kernels from several threads: the threading layer must be thread-safe (not workqueue)."""
    import numba

    cases = [
        ("batch_norm", {"num_features": 32}, (16, 32, 24, 24)),
        ("layer_norm", {"normalized_shape": 768}, (512, 768)),
        ("group_norm", {"num_groups": 8, "num_channels": 32}, (8, 32, 32, 32)),
    ]
    work = []
    for kind, config, shape in cases:
        layer = nk.make_layer(kind, **config)
        x, dy = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
        assert x.nbytes > compiled.PARALLEL_MIN_BYTES  # every call runs on several threads
        work.append((layer, x, dy, (layer.forward(x, training=False), *layer.backward(x, dy)[:1])))
    failures: list[str] = []

    def run(i: int) -> None:
        layer, x, dy, want = work[i % len(work)]
        for _ in range(15):
            got = (layer.forward(x, training=False), layer.backward(x, dy)[0])
            if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
                failures.append(f"thread {i}: {layer.kind} differs")

    pool = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures
    assert numba.threading_layer() in ("tbb", "omp")
    if os.uname().machine == "x86_64":
        assert numba.threading_layer() == "tbb"  # pinned: the pip-installed TBB


def _signatures() -> dict[str, int]:
    return {name: len(kernel.signatures) for name, kernel in cpu_kernels.KERNELS.items()}


def test_nothing_compiles_after_warm_up(rng) -> None:
    """Whatever arrays come in, the calls match the signatures warm_up prepared (compiling is off)."""
    assert compiled.warm_up() is not None
    before = _signatures()
    assert before == {name: 2 for name in cpu_kernels.KERNELS}  # float32 and float64
    assert not any(kernel._can_compile for kernel in cpu_kernels.KERNELS.values())
    base = rng.normal(size=(6, 4, 40))
    read_only = base.astype(np.float32)
    read_only.flags.writeable = False
    unaligned = np.frombuffer(b"\0" + base.astype(np.float32).tobytes(), np.float32, offset=1).reshape(base.shape)
    inputs = [read_only, unaligned, base.astype(np.float32)[:, :, ::2], base.astype(np.float16), base]
    for x in inputs:
        for layer in (nk.BatchNorm(4), nk.InstanceNorm(4, affine=True, track_running_stats=True), nk.GroupNorm(2, 4)):
            layer.forward(x)
            layer.forward(x, training=False)
            layer.backward(x, x)
            layer.backward(x, x, training=False)
            layer.train_with_report(x)
        for layer in (nk.LayerNorm(x.shape[-1]), nk.RMSNorm(x.shape[-1], dtype="float64")):
            layer.forward(x)
            layer.backward(x, x)
    assert _signatures() == before


def test_the_cache_is_the_configured_folder_never_the_sources(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NORMKERNELS_CACHE_DIR", str(tmp_path / "kernels"))
    assert compiled.cache_dir() == tmp_path / "kernels"
    assert (tmp_path / "kernels").is_dir()
    # Not writable (a folder under a file): a per-user folder in the temp dir instead.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NORMKERNELS_CACHE_DIR", str(tmp_path / "file" / "kernels"))
    assert compiled.cache_dir().parent == Path(tempfile.gettempdir())
    monkeypatch.delenv("NORMKERNELS_CACHE_DIR")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiled.cache_dir() == tmp_path / "xdg" / "normkernels"
    # warm_up's kernels went to the session's cache folder, nothing beside the installed sources.
    package = Path(cpu_kernels.__file__).parent
    assert not list(package.rglob("*.nbi"))
    assert not list(package.rglob("*.nbc"))


def test_a_second_process_starts_from_the_cache_without_compiling(tmp_path) -> None:
    warm = compiled.warm_up()
    cache = tmp_path / "cache"
    shutil.copytree(warm.cache_dir, cache)
    code = (
        "from normkernels import compiled; w = compiled.warm_up(); "
        "print(w.compiled, w.processes, w.signatures, w.cache_dir)"
    )
    env = {**os.environ, "NORMKERNELS_CACHE_DIR": str(cache), "HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=patience(30))
    assert done.returncode == 0, done.stderr
    compiled_now, processes, signatures, where = done.stdout.split()
    assert (int(compiled_now), int(processes), int(signatures), where) == (0, 0, warm.signatures, str(cache))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (no working folder on sys.path) is 3.11's")
def test_compile_helpers_import_the_starting_process_s_kernels_not_the_working_folder_s(tmp_path) -> None:
    """`python -c` puts its working folder first on sys.path: helpers started there imported a package of
    the same name from wherever the server was started (a folder others may write to)."""
    warm = compiled.warm_up()
    cache = tmp_path / "cache"
    shutil.copytree(warm.cache_dir, cache)
    for name in ("track_running", "reduce_rows"):  # two quick kernels missing: two helpers compile them
        assert [path.unlink() for path in cache.glob(f"*/cpu_kernels.{name}-*")]
    planted, marker = tmp_path / "cwd" / "normkernels", tmp_path / "planted-code-ran"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    code = "from normkernels import compiled; w = compiled.warm_up(); print(w.compiled, w.processes)"
    env = {**os.environ, "NORMKERNELS_CACHE_DIR": str(cache), "NORMKERNELS_COMPILE_PROCESSES": "2"}
    done = subprocess.run(  # -P: the starting process itself, like the normserve script, skips its folder
        [sys.executable, "-P", "-c", code],
        cwd=planted.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=patience(30),
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "a compile helper imported the package planted in the working folder"
    assert done.stdout.split() == ["4", "2"], done.stdout  # both kernels (2 signatures each), by two helpers


def test_numpy_switch_and_thread_settings(monkeypatch, threads, rng) -> None:
    monkeypatch.setenv("NORMKERNELS_CPU", "numpy")
    assert nk.LayerNorm(8)._math is core
    monkeypatch.setenv("NORMKERNELS_CPU", "numba")
    layer = nk.LayerNorm(8)
    assert layer._math is compiled
    x = rng.normal(size=(4096, 8)).astype(np.float32)
    many = layer.forward(x)
    threads(1)
    np.testing.assert_allclose(layer.forward(x), many, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        compiled.set_threads(0)
    monkeypatch.setenv("NORMKERNELS_THREADS", "many")
    with pytest.raises(ValueError, match="NORMKERNELS_THREADS"):
        compiled.threads()
    monkeypatch.setenv("NORMKERNELS_THREADS", "1000")
    import numba

    assert compiled.threads() == numba.config.NUMBA_NUM_THREADS  # never more than numba's pool


def test_the_server_compiles_its_kernels_before_it_serves(server) -> None:
    log = server.log()
    assert "CPU kernels ready" in log
    assert log.index("listening on") < log.index("CPU kernels ready") < log.index("ready: SERVING on")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_cache_kernels_where_their_user_writes(name) -> None:
    image = IMAGES[{"Dockerfile": "normserve", "Dockerfile.gpu": "normserve-gpu"}[name]]
    folder = image_environment(image)["NORMKERNELS_CACHE_DIR"]
    assert any(f"chown normserve:normserve /var/lib/normserve {folder}" in line for line in image["RUN"])
    text = (Path(__file__).resolve().parents[1] / name).read_text()
    assert text.index("USER normserve") < text.index("compiled.warm_up()")  # built as the serving user
