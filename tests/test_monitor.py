"""Covariate-shift and entropy numbers (normkernels.monitor) against float64 NumPy written from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randomize, reference_report, snapshot

import normkernels as nk
from normkernels.monitor import HALF_LOG_2PI_E

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")

CASES = [
    ("batch_norm", {"num_features": 4}, (6, 4, 5)),
    ("batch_norm", {"num_features": 3, "biased_running_var": True, "momentum": None}, (5, 3, 2, 3)),
    ("batch_norm", {"num_features": 3, "dtype": "float64"}, (7, 3)),
    ("instance_norm", {"num_features": 3, "track_running_stats": True, "affine": True}, (4, 3, 6)),
    ("instance_norm", {"num_features": 2}, (3, 2, 5)),
    ("group_norm", {"num_groups": 2, "num_channels": 6}, (3, 6, 4)),
    ("layer_norm", {"normalized_shape": (3, 4)}, (5, 3, 4)),
    ("rms_norm", {"normalized_shape": 8, "eps": 1e-6}, (2, 3, 8)),
]


@pytest.mark.parametrize(("kind", "config", "shape"), CASES)
def test_report_matches_definitions(kind, config, shape, rng):
    layer = nk.make_layer(kind, **config)
    randomize(layer, rng)
    reference = layer.copy()
    prior = {k: np.asarray(v, dtype=np.float64) for k, v in layer.state_dict().items()}
    x = (rng.normal(1.5, 2.5, shape) * rng.uniform(0.5, 3.0, (1, shape[1], *([1] * (len(shape) - 2))))).astype(
        layer.dtype
    )

    y, report = layer.train_with_report(x)

    # The same training step as forward(): identical output and state.
    np.testing.assert_array_equal(y, reference.forward(x, training=True))
    assert snapshot(layer) == snapshot(reference)

    rtol = 1e-5 if layer.dtype == np.float32 else 1e-10
    expected = reference_report(layer, x, y, prior)
    assert report.input_entropy == pytest.approx(expected["input_entropy"], rel=rtol)
    assert report.output_entropy == pytest.approx(expected["output_entropy"], rel=rtol, abs=1e-6)
    if not layer.track_running_stats:
        assert report.mean_shift is None
        assert report.log_var_shift is None
        return
    assert report.mean_shift == pytest.approx(expected["mean_shift"], rel=rtol)
    assert report.log_var_shift == pytest.approx(expected["log_var_shift"], rel=rtol)


def test_normalized_output_has_unit_gaussian_entropy(rng):
    """Standardized entropy: weight 1, bias 0 outputs sit at 0.5*log(2*pi*e) ~ 1.419 nats whatever the input scale."""
    for scale in (0.1, 1.0, 300.0):  # well above sqrt(eps): eps would lower the output variance
        layer = nk.BatchNorm(8)
        _, report = layer.train_with_report(rng.normal(5.0, scale, (64, 8, 3)).astype(np.float32))
        assert report.output_entropy == pytest.approx(HALF_LOG_2PI_E, abs=1e-3)
        assert report.input_entropy == pytest.approx(HALF_LOG_2PI_E + math.log(scale), abs=0.05)


def test_shift_is_zero_for_a_batch_that_matches_the_running_statistics(rng):
    layer = nk.BatchNorm(5, biased_running_var=True, eps=1e-12, dtype=np.float64)
    x = rng.normal(size=(32, 5))
    mean, var = x.mean(axis=0), x.var(axis=0)
    layer.load_state_dict({"running_mean": mean, "running_var": var}, strict=False)
    _, report = layer.train_with_report(x)
    assert report.mean_shift == pytest.approx(0.0, abs=1e-9)
    assert report.log_var_shift == pytest.approx(0.0, abs=1e-9)
    _, shifted = layer.train_with_report(x * 2.0 + 3.0 * np.sqrt(layer.running_var))
    assert shifted.mean_shift > 2.0
    assert shifted.log_var_shift > 1.0
