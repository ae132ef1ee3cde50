"""Every backward against central finite differences in float64 (batch sizes > 1)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import clone, input_shape, randomize

import normkernels as nk

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")

CONFIGS = [
    ("batch_norm", {"num_features": 3}, (2,)),
    ("batch_norm", {"num_features": 4}, ()),
    ("batch_norm", {"num_features": 2, "affine": False, "track_running_stats": False}, (3, 2)),
    ("batch_norm", {"num_features": 3, "momentum": None}, (2, 2, 2)),
    ("instance_norm", {"num_features": 3}, (4,)),
    ("instance_norm", {"num_features": 2, "affine": True, "track_running_stats": True}, (2, 3)),
    ("group_norm", {"num_groups": 2, "num_channels": 4}, (3,)),
    ("group_norm", {"num_groups": 3, "num_channels": 3, "affine": False}, (2, 2)),
    ("group_norm", {"num_groups": 1, "num_channels": 2}, ()),
    ("layer_norm", {"normalized_shape": [4]}, ()),
    ("layer_norm", {"normalized_shape": [2, 3], "bias": False}, ()),
    ("layer_norm", {"normalized_shape": [5], "elementwise_affine": False}, ()),
    ("rms_norm", {"normalized_shape": [4]}, ()),
    ("rms_norm", {"normalized_shape": [2, 2], "eps": 1e-3, "elementwise_affine": False}, ()),
    ("layer_norm_2d", {"num_features": 3}, (2, 2)),
    ("layer_norm_2d", {"num_features": 4, "bias": False}, ()),
    ("layer_norm_2d", {"num_features": 2, "elementwise_affine": False}, (3,)),
]


def _loss(layer: nk.NormLayer, x: np.ndarray, dy: np.ndarray, training: bool, state=None) -> float:
    """sum(y * dy) on a throwaway copy, so training forwards leave ``layer`` alone."""
    twin = clone(layer)
    if state:
        twin.load_state_dict({**twin.state_dict(), **state})
    return float(np.sum(twin.forward(x, training=training) * dy))


def _numeric_grad(f, value: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        plus, minus = value.copy(), value.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (f(plus) - f(minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("kind", "config", "spatial"), CONFIGS)
def test_backward_matches_finite_differences(kind, config, spatial, training, rng) -> None:
    layer = nk.make_layer(kind, **config, dtype="float64")
    randomize(layer, rng)
    shape = input_shape(layer, batch=3, spatial=spatial, lead=(3,))
    x = rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), shape)
    dy = rng.normal(size=shape)
    before = layer.state_dict()

    dx, grads = layer.backward(x, dy, training=training)

    np.testing.assert_allclose(dx, _numeric_grad(lambda v: _loss(layer, v, dy, training), x), rtol=1e-6, atol=1e-7)
    for name in ("weight", "bias"):
        param = getattr(layer, name)
        if param is None:
            assert grads[name] is None
            continue
        numeric = _numeric_grad(lambda v, n=name: _loss(layer, x, dy, training, {n: v}), param)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    after = layer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before), "backward changed the state"


def test_a_simplified_dx_formula_dividing_by_sqrt_m_is_wrong(rng) -> None:
    """A simplified dx formula that divides by sigma*sqrt(m) is wrong: finite differences say sigma*m."""
    m = 6
    x, dy = rng.normal(size=(m, 1)), rng.normal(size=(m, 1))
    layer = nk.BatchNorm(1, affine=False, track_running_stats=False, dtype="float64")
    dx, _ = layer.backward(x, dy)
    sigma = np.sqrt(x.var() + layer.eps)
    xhat = (x - x.mean()) / sigma
    dgamma, dbeta = np.sum(dy * xhat), np.sum(dy)
    correct = (m * dy - dbeta - xhat * dgamma) / (sigma * m)
    simplified = (np.sqrt(m) * dy - dbeta - xhat * dgamma) / (sigma * np.sqrt(m))
    np.testing.assert_allclose(dx, correct, rtol=1e-10)
    assert not np.allclose(dx, simplified, rtol=1e-3)
