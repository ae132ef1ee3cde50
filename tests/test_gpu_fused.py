"""The fused CUDA kernels on a GPU: against NumPy float64 and against torch CUDA.

Outputs are poisoned (filled with NaN) before every kernel writes them, so
an element a kernel misses fails the comparison. Errors are normwise:
max |got - want| / max |want|, at most 1e-5 for float32 (and float32
statistics), 1e-2 for float16 and bfloat16. Marked `gpu`: skipped cleanly
without CuPy and a CUDA device.
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
from conftest import core_float64, randomize, stored, stored_values, torch_twin
from test_fused import CASES

import normkernels as nk
from normkernels import fused

pytestmark = pytest.mark.gpu

TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2, "float64": 1e-12}

# Larger shapes than the CPU cases: several splits per group, many lines, long lines.
LARGE_CASES = [
    ("batch_norm", {"num_features": 64}, (32, 64, 56, 56)),
    ("batch_norm", {"num_features": 1024}, (4096, 1024)),
    ("instance_norm", {"num_features": 8}, (2, 8, 256, 256)),
    ("group_norm", {"num_groups": 32, "num_channels": 256}, (8, 256, 32, 32)),
    ("layer_norm", {"normalized_shape": [4096]}, (2048, 4096)),
    ("rms_norm", {"normalized_shape": [8192]}, (512, 8192)),
]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(fused, "poison_outputs", True)


def normwise(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _to_host(a):
    return stored_values(a.get())


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize(("kind", "config", "shape"), CASES + LARGE_CASES)
def test_fused_kernels_match_float64(kind, config, shape, storage, rng) -> None:
    import cupy

    acc = np.dtype(np.float64 if storage == "float64" else np.float32)
    layer = nk.make_layer(kind, **config, dtype=acc)
    randomize(layer, rng)
    plan = layer._plan(shape)
    tol = TOLERANCE[storage]
    for trial in range(2):
        x = stored(rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 4), shape), storage)
        dy = stored(rng.normal(size=shape), storage)
        xd, dyd = cupy.asarray(x).reshape(plan.view), cupy.asarray(dy).reshape(plan.view)
        weight, bias = (None if p is None else cupy.asarray(p) for p in layer._params(plan, acc))
        eps = layer._eps_for(acc)
        for training in (True, False) if layer.track_running_stats else (True,):
            y_ref, stats_ref, (dx_ref, dw_ref, db_ref) = core_float64(layer, plan, x, dy, training)
            if training:
                y, stats = fused.forward_train(xd, plan, weight, bias, eps, acc)
                for got, want in zip(stats, stats_ref, strict=True):
                    if want is not None:
                        assert normwise(got.get(), want) <= max(tol, 1e-5), (trial, "statistics")
                dx, dw, db = fused.backward(xd, dyd, plan, weight, eps, acc)
            else:
                running = nk.Moments(*(cupy.asarray(a) for a in layer._running_moments(plan)))
                y = fused.forward_eval(xd, plan, running, weight, bias, eps, acc)
                dx, dw, db = fused.backward(xd, dyd, plan, weight, eps, acc, running)
            assert normwise(_to_host(y), y_ref) <= tol, (trial, training, "y")
            assert normwise(_to_host(dx), dx_ref) <= tol, (trial, training, "dx")
            assert normwise(dw.get(), dw_ref) <= max(tol, 1e-5), (trial, training, "dweight")
            assert normwise(db.get(), db_ref) <= max(tol, 1e-5), (trial, training, "dbias")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("kind", "config", "shape"), CASES + LARGE_CASES)
def test_fused_layers_match_torch_cuda(kind, config, shape, dtype, rng) -> None:
    """Layer API (float32/float16) or the kernels on bfloat16 bits, against torch's CUDA modules in float32."""
    import cupy
    import torch

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    layer = nk.make_layer(kind, **config, device="cuda:0")
    assert layer._math is fused
    host = nk.make_layer(kind, **config)
    randomize(host, rng)
    layer.load_state_dict(host.state_dict())
    twin = torch_twin(host, len(shape)).cuda()
    twin.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in host.state_dict().items()})
    tol = TOLERANCE[dtype]
    for training in (True, False):
        twin.train(training)
        x = rng.normal(1.0, 2.0, shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        # torch computes in float32 on the same half-rounded values (its half kernels also accumulate in float32).
        xt = torch.tensor(x).to(getattr(torch, dtype)).float().cuda().requires_grad_()
        yt = twin(xt)
        yt.backward(torch.tensor(dy).to(getattr(torch, dtype)).float().cuda())
        want_y = yt.detach().float().cpu().numpy()
        want_dx = xt.grad.float().cpu().numpy()
        if dtype == "bfloat16":  # no bfloat16 CuPy arrays: the kernels take its bits directly
            plan = layer._plan(shape)
            xd = cupy.asarray(stored(x, "bfloat16")).reshape(plan.view)
            dyd = cupy.asarray(stored(dy, "bfloat16")).reshape(plan.view)
            weight, bias = layer._params(plan, np.dtype(np.float32))
            stats = None if training or not layer.track_running_stats else layer._running_moments(plan)
            if stats is None:
                y, batch = fused.forward_train(xd, plan, weight, bias, layer._eps_for(np.float32), np.float32)
                if training:  # as the layer's own forward does: the running statistics move with the twin's
                    layer._after_training_batch(batch, plan.count)
            else:
                y = fused.forward_eval(xd, plan, stats, weight, bias, layer._eps_for(np.float32), np.float32)
            dx, dw, _ = fused.backward(xd, dyd, plan, weight, layer._eps_for(np.float32), np.float32, stats)
            got_y, got_dx = _to_host(y).reshape(shape), _to_host(dx).reshape(shape)
        else:
            xd = cupy.asarray(x.astype(dtype))
            got_y = layer.forward(xd, training=training).get()
            got_dx, grads = layer.backward(xd, cupy.asarray(dy.astype(dtype)), training=training)
            got_dx, dw = got_dx.get(), grads["weight"]
        assert normwise(got_y, want_y) <= tol
        assert normwise(got_dx, want_dx) <= tol
        if dw is not None and twin.weight is not None:
            assert normwise(dw.get().reshape(-1), twin.weight.grad.float().cpu().numpy().reshape(-1)) <= tol
        twin.zero_grad()
    if layer.track_running_stats:  # one training step in each: running statistics agree
        for key in ("running_mean", "running_var"):
            assert normwise(getattr(layer, key).get(), getattr(twin, key).float().cpu().numpy()) <= 1e-5


def test_fused_and_generic_cupy_paths_agree(monkeypatch, rng) -> None:
    """NORMKERNELS_FUSED=0 keeps the generic CuPy code: a second implementation to compare with."""
    import cupy

    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    generic = nk.BatchNorm(16, device="cuda:0")
    monkeypatch.delenv(fused.ENV_SWITCH)
    fast = nk.BatchNorm(16, device="cuda:0")
    assert generic._math is not fused
    assert fast._math is fused
    x = cupy.asarray(rng.normal(2, 3, (64, 16, 9, 9)).astype(np.float32))
    np.testing.assert_allclose(fast.forward(x).get(), generic.forward(x).get(), rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(fast, key).get(), getattr(generic, key).get(), rtol=1e-6)


def test_concurrent_streams_give_the_same_answers(rng) -> None:
    """Kernels launch on the caller's current stream: threads with their own streams overlap safely."""
    import cupy

    layer = nk.LayerNorm(1024, device="cuda:0")
    xs = [rng.normal(size=(256, 1024)).astype(np.float32) for _ in range(8)]
    want = [layer.forward(cupy.asarray(x)).get() for x in xs]

    def run(x):
        with cupy.cuda.Stream(non_blocking=True) as stream:
            y = layer.forward(cupy.asarray(x))
            stream.synchronize()
            return y.get()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, xs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_geometry_for_the_device(rng) -> None:
    launcher = fused.cuda_launcher(0)
    assert launcher.sm_count >= 1
    big = fused.geometry(nk.BatchNorm(64)._plan((32, 64, 56, 56)), launcher.sm_count)
    assert big.stats.splits * min(big.stats.B, 65535) >= launcher.sm_count  # the device is filled
    assert math.prod(big.elementwise.grid) >= launcher.sm_count


def test_service_on_cuda_serves_concurrent_requests_like_the_cpu(start_server, rng) -> None:
    """`normserve serve --device cuda`: pinned copies and a stream per kernel thread; answers equal the CPU's."""
    from normserve.client import NormClient

    proc = start_server("--device", "cuda", "--workers", "4")
    local = nk.LayerNorm(512)
    randomize(local, rng)
    xs = [rng.normal(1.0, 2.0, (64 * (i + 1), 512)).astype(np.float32) for i in range(8)]
    with NormClient(proc.target) as nc:
        remote = nc.create_layer("gpu.ln", "layer_norm", normalized_shape=[512])
        remote.load_state_dict(local.state_dict())

        def call(x):
            return remote.infer(x), remote.gradient(x, x)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, xs))
    for x, (y, (dx, dweight, dbias)) in zip(xs, answers, strict=True):
        np.testing.assert_allclose(y, local.forward(x, training=False), rtol=1e-5, atol=1e-5)
        want_dx, grads = local.backward(x, x)
        assert normwise(dx, want_dx) <= 1e-5
        assert normwise(dweight, grads["weight"]) <= 1e-5
        assert normwise(dbias, grads["bias"]) <= 1e-5
    assert proc.stop() == 0
