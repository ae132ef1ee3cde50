"""Numerical robustness: large offsets, float16 ranges, non-finite batches, float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import input_shape, randomize, reference_forward, snapshot

import normkernels as nk
from normkernels.backend import dot_to, sum_to

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")

LAYERS = [
    lambda: nk.BatchNorm(4),
    lambda: nk.InstanceNorm(4, affine=True, track_running_stats=True),
    lambda: nk.GroupNorm(2, 4),
    lambda: nk.LayerNorm(64),
    lambda: nk.RMSNorm(64),
]


def _shape(layer) -> tuple[int, ...]:
    return input_shape(layer, batch=16, spatial=(64,), lead=(16, 4))


@pytest.mark.parametrize("make", LAYERS)
def test_float32_large_mean_small_std_matches_float64(make, rng) -> None:
    """Mean 3000, std 0.1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    layer = make()
    x = rng.normal(3000.0, 0.1, _shape(layer)).astype(np.float32)
    expected = reference_forward(layer, x, training=True)  # the same float32 values, in float64
    y = layer.forward(x, training=True)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, atol=1e-2, rtol=0)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx32, _ = layer.backward(x, dy)
    layer64 = nk.make_layer(layer.kind, **{**layer.config, "dtype": "float64"})
    dx64, _ = layer64.backward(x.astype(np.float64), dy.astype(np.float64))
    scale = np.abs(dx64).max()
    np.testing.assert_allclose(dx32, dx64, atol=1e-2 * scale, rtol=0)


def test_running_stats_of_offset_batch_are_accurate(rng) -> None:
    layer = nk.BatchNorm(3, momentum=1.0)
    x = rng.normal(3000.0, 0.1, (64, 3, 100)).astype(np.float32)
    layer.forward(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(layer.running_mean, x64.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, x64.var(axis=(0, 2), ddof=1), rtol=1e-3)


@pytest.mark.parametrize("make", LAYERS)
def test_float16_input_near_400_stays_finite_and_accurate(make, rng) -> None:
    """x**2 ~ 160000 overflows float16 (max 65504): the math must run in float32."""
    layer = make()
    x = (400.0 + rng.normal(0, 20, _shape(layer))).astype(np.float16)
    y = layer.forward(x, training=True)
    assert y.dtype == np.float16
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), reference_forward(layer, x, training=True), atol=2e-2, rtol=1e-2)
    dx, grads = layer.backward(x, rng.normal(size=x.shape).astype(np.float16))
    assert dx.dtype == np.float16
    assert np.isfinite(dx).all()
    assert grads["weight"].dtype == np.float32
    assert np.isfinite(grads["weight"]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("make", LAYERS)
def test_non_finite_training_batch_is_rejected_and_state_kept(make, bad, rng) -> None:
    layer = make()
    randomize(layer, rng)
    layer.forward(rng.normal(size=_shape(layer)).astype(np.float32))
    before = snapshot(layer)
    x = rng.normal(size=_shape(layer)).astype(np.float32)
    x.flat[rng.integers(x.size)] = bad
    with pytest.raises(nk.NonFiniteError, match=r"NaN or Inf.*unchanged"):
        layer.forward(x, training=True)
    assert snapshot(layer) == before


def test_float64_input_computes_in_float64(rng) -> None:
    layer = nk.LayerNorm(32)
    x = rng.normal(1e4, 1e-3, (8, 32))  # float64: a float32 computation would lose ~1e-4 of each value
    y = layer.forward(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, reference_forward(layer, x, training=True), rtol=0, atol=1e-8)


def test_biased_running_var_uses_the_seed_formula(rng) -> None:
    layer = nk.BatchNorm(3, momentum=0.25, biased_running_var=True, dtype="float64")
    x = rng.normal(2, 3, (5, 3, 4))
    layer.forward(x)
    np.testing.assert_allclose(layer.running_var, 0.75 * 1.0 + 0.25 * x.var(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.25 * x.mean(axis=(0, 2)), rtol=1e-12)


def test_cumulative_average_with_momentum_none(rng) -> None:
    layer = nk.BatchNorm(2, momentum=None, dtype="float64")
    batches = [rng.normal(i, 1 + i, (4, 2)) for i in range(5)]
    for b in batches:
        layer.forward(b)
    assert layer.num_batches_tracked == 5
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)


def test_non_contiguous_input_is_handled(rng) -> None:
    layer = nk.BatchNorm(3)
    base = rng.normal(size=(6, 3, 10)).astype(np.float32)
    x = base[::2, :, ::-1]
    assert not x.flags.c_contiguous
    np.testing.assert_allclose(nk.BatchNorm(3).forward(x), layer.forward(np.ascontiguousarray(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "out"),
    [
        ((4, 3, 5), (1, 3, 1)),
        ((4, 3, 5), (4, 3, 1)),
        ((7, 9), (1, 9)),
        ((7, 9), (7, 1)),
        ((2, 3, 4, 5), (2, 3, 1, 1)),
        ((2, 3, 4, 5), (1, 3, 4, 1)),
        ((2, 3, 4, 5), (1, 3, 1, 5)),
        ((3, 4), (3, 4)),
    ],
)
def test_reductions_match_numpy_sum(shape, out, rng) -> None:
    a, b = rng.normal(size=shape), rng.normal(size=shape)
    axes = tuple(i for i, (s, o) in enumerate(zip(shape, out, strict=False)) if o == 1 and s != 1)
    np.testing.assert_allclose(sum_to(a, out), a.sum(axis=axes, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(dot_to(a, b, out), (a * b).sum(axis=axes, keepdims=True), rtol=1e-12)
    w = rng.normal(size=(1,) * (len(shape) - 1) + shape[-1:])
    np.testing.assert_allclose(dot_to(a, w, out), (a * w).sum(axis=axes, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        *LAYERS,
        lambda: nk.BatchNorm(4, affine=False),
        lambda: nk.LayerNorm(64, bias=False),
        lambda: nk.RMSNorm(64, 1e-3),
    ],
)
def test_blocked_execution_matches_whole_array(make, training, rng, monkeypatch) -> None:
    """Large NumPy inputs run in cache-sized blocks on a thread pool; a tiny block size forces it here."""
    whole, blocked = make(), make()
    randomize(whole, rng)
    blocked.load_state_dict(whole.state_dict())
    x = rng.normal(0.5, 2.0, _shape(whole)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    expected_y = whole.forward(x, training=training)
    expected_dx, expected_grads = whole.backward(x, dy, training=training)
    monkeypatch.setattr(nk.core, "_BLOCK_BYTES", 256)
    plan = blocked._plan(x.shape)
    if plan.rows_independent or not training:
        assert nk.core._row_blocks(x.reshape(plan.view), plan, np.dtype(np.float32)) is not None
    y = blocked.forward(x, training=training)
    dx, grads = blocked.backward(x, dy, training=training)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        if grad is None:
            assert expected_grads[name] is None
        else:
            np.testing.assert_allclose(grad, expected_grads[name], rtol=1e-4, atol=1e-4)
    for key, value in blocked.state_dict().items():
        np.testing.assert_allclose(value, whole.state_dict()[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make", LAYERS)
def test_inputs_are_never_written(make, training, rng) -> None:
    layer = make()
    x = rng.normal(size=_shape(layer)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    x_before, dy_before = x.copy(), dy.copy()
    layer.forward(x, training=training)
    layer.backward(x, dy, training=training)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)


def test_copy_is_an_independent_snapshot(rng) -> None:
    """The service's copy-on-write relies on layers never writing their arrays in place."""
    layer = nk.BatchNorm(3, momentum=None)
    randomize(layer, rng)
    before = snapshot(layer)
    twin = layer.copy()
    twin.forward(rng.normal(size=(6, 3, 2)).astype(np.float32), training=True)
    twin.load_state_dict({"weight": np.full(3, 7.0)}, strict=False)
    twin.reset_running_stats()
    assert snapshot(layer) == before
    assert snapshot(twin) != before
