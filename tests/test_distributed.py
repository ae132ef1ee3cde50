"""Synchronized batch norm math (normkernels.distributed + the layers' synced methods) vs one batch norm
over the concatenated batch: PyTorch's BatchNorm, and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkernels as nk
from normkernels import distributed

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")

SPLITS = [(3, 5, 1), (1, 1), (2,), (7, 2, 4, 1)]


def _synced_step(layers: list[nk.BatchNorm], parts: list[np.ndarray], dys: list[np.ndarray]):
    """What the server does for one synchronized Train and Gradient of every part."""
    forward_parts = [layer.synced_part(x) for layer, x in zip(layers, parts, strict=True)]
    total = distributed.combine(forward_parts)
    ys = [layer.forward_synced(x, total) for layer, x in zip(layers, parts, strict=True)]
    layers[0].track_synced(total)
    pending = [layer.synced_grad_part(x, dy) for layer, x, dy in zip(layers, parts, dys, strict=True)]
    grad_total = distributed.combine([p for p, _ in pending])
    grads = [layer.backward_synced(rest, p, grad_total) for layer, (p, rest) in zip(layers, pending, strict=True)]
    return ys, grads


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("spatial", [(), (3,), (2, 3)])
def test_synced_parts_equal_one_batch_norm_over_the_whole_batch(rng, sizes, spatial):
    channels = 4
    parts = [rng.normal(2.0, 1.5, (n, channels, *spatial)).astype(np.float32) for n in sizes]
    dys = [rng.normal(0.0, 1.0, p.shape).astype(np.float32) for p in parts]
    weight, bias = rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels)
    layer = nk.BatchNorm(channels, momentum=0.2)
    layer.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    ys, grads = _synced_step([layer] + [layer.copy() for _ in parts[1:]], parts, dys)

    twin = (torch.nn.BatchNorm1d if len(spatial) < 2 else torch.nn.BatchNorm2d)(channels, momentum=0.2)
    twin.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias)}, strict=False)
    x = torch.tensor(np.concatenate(parts), requires_grad=True)
    y = twin(x)
    y.backward(torch.tensor(np.concatenate(dys)))

    np.testing.assert_allclose(np.concatenate(ys), y.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([dx for dx, _ in grads]), x.grad.numpy(), rtol=1e-5, atol=1e-5)
    for key in ("weight", "bias"):
        own = sum(g[key] for _, g in grads)
        np.testing.assert_allclose(own, getattr(twin, key).grad.numpy(), rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(layer, key), getattr(twin, key).numpy(), rtol=1e-5, atol=1e-6)
    assert layer.num_batches_tracked == 1


def test_float64_parts_with_a_large_mean_match_the_float64_formulas(rng):
    """Chan's merge keeps the variance of parts whose mean dwarfs their spread (no E[x^2] - E[x]^2)."""
    parts = [rng.normal(3000.0, 0.1, (n, 3, 5)) for n in (4, 1, 9)]
    dys = [rng.normal(0.0, 1.0, p.shape) for p in parts]
    layer = nk.BatchNorm(3, dtype=np.float64)
    ys, grads = _synced_step([layer, layer.copy(), layer.copy()], parts, dys)
    x, dy = np.concatenate(parts), np.concatenate(dys)
    mean, var = x.mean(axis=(0, 2), keepdims=True), x.var(axis=(0, 2), keepdims=True)
    xhat = (x - mean) / np.sqrt(var + layer.eps)
    dx = (dy - dy.mean(axis=(0, 2), keepdims=True) - xhat * (dy * xhat).mean(axis=(0, 2), keepdims=True)) / np.sqrt(
        var + layer.eps
    )
    np.testing.assert_allclose(np.concatenate(ys), xhat, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([g[0] for g in grads]), dx, rtol=1e-7, atol=1e-9)
    unbiased = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * unbiased, rtol=1e-9)


def test_only_batch_norm_synchronizes():
    for layer in (nk.LayerNorm(4), nk.InstanceNorm(4), nk.GroupNorm(2, 4), nk.RMSNorm(4)):
        with pytest.raises(nk.ConfigError, match="only batch norm"):
            nk.synced(layer)
    batch_norm = nk.BatchNorm(4)
    assert nk.synced(batch_norm) is batch_norm


def test_a_step_of_one_value_per_channel_is_refused_and_changes_nothing(rng):
    layer = nk.BatchNorm(3)
    before = layer.state_dict()
    total = distributed.combine([layer.synced_part(rng.normal(size=(1, 3)).astype(np.float32))])
    with pytest.raises(nk.ShapeError, match="all workers of the step together sent 1"):
        layer.track_synced(total)
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)


def test_a_non_finite_part_is_refused_by_its_own_worker(rng):
    x = rng.normal(size=(4, 3)).astype(np.float32)
    x[2, 1] = np.nan
    with pytest.raises(nk.NonFiniteError):
        nk.BatchNorm(3).synced_part(x)
    with pytest.raises(nk.NonFiniteError):
        nk.BatchNorm(3).synced_grad_part(x, np.ones_like(x))
