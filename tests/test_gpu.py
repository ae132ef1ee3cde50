"""CuPy layers (device="cuda") against the NumPy ones: same generic code, same numbers.

Marked `gpu`: skipped cleanly where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import input_shape, randomize

import normkernels as nk

pytestmark = pytest.mark.gpu

CONFIGS = [
    ("batch_norm", {"num_features": 8}, (6, 5)),
    ("batch_norm", {"num_features": 8, "momentum": None, "affine": False}, ()),
    ("instance_norm", {"num_features": 8, "affine": True, "track_running_stats": True}, (7, 3)),
    ("group_norm", {"num_groups": 4, "num_channels": 8}, (9,)),
    ("layer_norm", {"normalized_shape": [16, 4]}, ()),
    ("rms_norm", {"normalized_shape": [64]}, ()),
    ("layer_norm_2d", {"num_features": 8}, (5, 3)),  # no fused kernels: the generic CuPy code
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize(("kind", "config", "spatial"), CONFIGS)
def test_cupy_matches_numpy(kind, config, spatial, dtype, rng) -> None:
    import cupy

    param_dtype = "float64" if dtype == "float64" else "float32"
    cpu = nk.make_layer(kind, **config, dtype=param_dtype)
    randomize(cpu, rng)
    gpu = nk.make_layer(kind, **config, dtype=param_dtype, device="cuda:0")
    gpu.load_state_dict(cpu.state_dict())
    tol = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    shape = input_shape(cpu, batch=5, spatial=spatial, lead=(3, 2))
    for _ in range(3):
        x = rng.normal(1.5, 2.0, shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        for training in (True, False):
            y = gpu.forward(cupy.asarray(x), training=training)
            assert isinstance(y, cupy.ndarray)
            assert y.dtype == x.dtype
            np.testing.assert_allclose(y.get(), cpu.forward(x, training=training), rtol=tol, atol=tol)
            dx, grads = gpu.backward(cupy.asarray(x), cupy.asarray(dy), training=training)
            dx_cpu, grads_cpu = cpu.backward(x, dy, training=training)
            np.testing.assert_allclose(dx.get(), dx_cpu, rtol=tol, atol=tol)
            for name, g in grads.items():
                if g is None:
                    assert grads_cpu[name] is None
                else:
                    np.testing.assert_allclose(g.get(), grads_cpu[name], rtol=tol, atol=tol * x.size)
    for key, value in gpu.state_dict().items():
        assert isinstance(value, cupy.ndarray)
        np.testing.assert_allclose(value.get(), cpu.state_dict()[key], rtol=tol, atol=tol)


@pytest.mark.parametrize(("kind", "config", "spatial"), CONFIGS)
def test_cupy_monitoring_report_matches_numpy(kind, config, spatial, rng) -> None:
    import cupy

    cpu = nk.make_layer(kind, **config)
    randomize(cpu, rng)
    gpu = nk.make_layer(kind, **config, device="cuda:0")
    gpu.load_state_dict(cpu.state_dict())
    x = rng.normal(0.5, 3.0, input_shape(cpu, batch=5, spatial=spatial, lead=(3, 2))).astype(np.float32)
    _, on_gpu = gpu.train_with_report(cupy.asarray(x))
    _, on_cpu = cpu.train_with_report(x)
    for field, value in on_cpu._asdict().items():
        assert isinstance(getattr(on_gpu, field), (float, type(None)))
        assert getattr(on_gpu, field) == (None if value is None else pytest.approx(value, rel=1e-5, abs=1e-6))


def test_cuda_layer_refuses_host_arrays_and_cpu_layer_refuses_cupy() -> None:
    import cupy

    with pytest.raises(nk.DeviceError, match=r"must be a CuPy array.*cupy.asarray"):
        nk.BatchNorm(2, device="cuda").forward(np.ones((4, 2), np.float32))
    with pytest.raises(nk.DeviceError, match=r"CuPy array but the layer is on cpu"):
        nk.BatchNorm(2).forward(cupy.ones((4, 2), cupy.float32))


def test_non_finite_batch_rejected_on_gpu(rng) -> None:
    import cupy

    layer = nk.BatchNorm(3, device="cuda")
    x = cupy.asarray(rng.normal(size=(4, 3)).astype(np.float32))
    x[1, 2] = cupy.nan
    before = layer.state_dict()
    with pytest.raises(nk.NonFiniteError):
        layer.forward(x)
    after = layer.state_dict()
    assert all(bool((before[k] == after[k]).all()) for k in before)


def test_service_runs_layers_on_cuda(start_server, rng) -> None:
    """`normserve serve --device auto` places layers on the GPU; a per-layer device overrides it."""
    from normserve.client import NormClient

    proc = start_server("--device", "auto")
    x = rng.normal(1.0, 2.0, (16, 8, 12)).astype(np.float32)
    with NormClient(proc.target) as nc:
        on_gpu = nc.create_layer("gpu.bn", "batch_norm", num_features=8)
        on_cpu = nc.create_layer("cpu.bn", "batch_norm", num_features=8, device="cpu")
        assert on_gpu.info.config.device == "cuda:0"
        assert on_cpu.info.config.device == "cpu"
        local = nk.BatchNorm(8)
        for _ in range(2):
            np.testing.assert_allclose(on_gpu.train(x), local.forward(x), rtol=1e-4, atol=1e-5)
            on_cpu.train(x)
        np.testing.assert_allclose(on_gpu.infer(x), local.forward(x, training=False), rtol=1e-4, atol=1e-5)
        dx, dweight, _ = on_gpu.gradient(x, x)
        ldx, grads = local.backward(x, x)
        np.testing.assert_allclose(dx, ldx, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dweight, grads["weight"], rtol=1e-3, atol=1e-3)
        for key, value in local.state_dict().items():
            np.testing.assert_allclose(on_gpu.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert proc.stop() == 0
    restarted = start_server("--device", "auto")
    with NormClient(restarted.target) as nc:
        assert nc.layer("gpu.bn").info.config.device == "cuda:0"
        assert int(nc.layer("gpu.bn").state_dict()["num_batches_tracked"]) == 2


def test_eight_concurrent_clients_on_a_cuda_server(start_server) -> None:
    """`normserve serve --device cuda` under 8 clients at once (kernel threads, streams, pinned buffers).

    Each client trains its own layer and all share one, streamed and unary,
    with several dtypes: every answer matches a NumPy layer fed the same batches.
    """
    import concurrent.futures

    from normserve.client import NormClient

    proc = start_server("--device", "cuda")
    with NormClient(proc.target) as nc:
        nc.create_layer("shared.ln", "layer_norm", normalized_shape=[256])

    def client(worker: int) -> None:
        rng = np.random.default_rng(worker)
        kind, config, spatial = CONFIGS[worker % len(CONFIGS)]
        local = nk.make_layer(kind, **config)
        shape = input_shape(local, 16, spatial, lead=(12,))
        dtype = ("float32", "float16", "float64")[worker % 3]
        tol = {"float32": 1e-4, "float16": 1e-2, "float64": 1e-9}[dtype]
        with NormClient(proc.target, stream_threshold=0 if worker % 2 else 1 << 30) as nc:  # streamed or unary
            remote = nc.create_layer(f"client{worker}", kind, **config)
            for _ in range(6):
                x = rng.normal(1.0, 2.0, shape).astype(dtype)
                got = remote.train(x)
                np.testing.assert_allclose(got, local.forward(x), rtol=tol, atol=tol)
                dx, _, _ = remote.gradient(x, x, training=False)
                np.testing.assert_allclose(dx, local.backward(x, x, training=False)[0], rtol=10 * tol, atol=10 * tol)
            for key, value in local.state_dict().items():
                np.testing.assert_allclose(remote.state_dict()[key], value, rtol=1e-5, atol=1e-6)
            shared = nc.layer("shared.ln")
            x = rng.normal(size=(64, 256)).astype(np.float32)
            np.testing.assert_allclose(shared.infer(x), nk.LayerNorm(256).forward(x), rtol=1e-4, atol=1e-4)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for done in concurrent.futures.as_completed([pool.submit(client, w) for w in range(8)]):
            done.result()
    assert proc.stop() == 0
