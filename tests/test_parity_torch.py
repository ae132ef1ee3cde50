"""Parity with torch 2.13 modules on random configurations, shapes and data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import input_shape, randomize, reference_forward, torch_twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkernels as nk

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")

TOL = {"float32": {"rtol": 2e-4, "atol": 2e-5}, "float64": {"rtol": 1e-9, "atol": 1e-11}}
momenta = st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.01, 0.99))
eps_values = st.sampled_from([1e-5, 1e-3, 0.1])


@st.composite
def cases(draw):
    """(layer, input shape, seed) covering every kind and option combination."""
    kind = draw(st.sampled_from(sorted(nk.KINDS)))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    batch = draw(st.integers(2, 5))
    if kind in ("batch_norm", "instance_norm"):
        spatial = draw(st.lists(st.integers(1, 4), min_size=int(kind == "instance_norm"), max_size=3))
        if kind == "instance_norm" and np.prod(spatial) == 1:
            spatial[0] = 2
        layer = nk.make_layer(
            kind,
            num_features=draw(st.integers(1, 6)),
            eps=draw(eps_values),
            momentum=draw(momenta),
            affine=draw(st.booleans()),
            track_running_stats=draw(st.booleans()),
            dtype=dtype,
        )
    elif kind == "group_norm":
        groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        spatial = draw(st.lists(st.integers(1, 4), max_size=3))
        layer = nk.make_layer(
            kind,
            num_groups=groups,
            num_channels=groups * per_group,
            eps=draw(eps_values),
            affine=draw(st.booleans()),
            dtype=dtype,
        )
    elif kind == "layer_norm_2d":
        spatial = draw(st.lists(st.integers(1, 4), max_size=3))
        layer = nk.make_layer(
            kind,
            num_features=draw(st.integers(1, 6)),
            eps=draw(eps_values),
            elementwise_affine=draw(st.booleans()),
            bias=draw(st.booleans()),
            dtype=dtype,
        )
    else:
        normalized = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
        extra = {"bias": draw(st.booleans())} if kind == "layer_norm" else {}
        layer = nk.make_layer(
            kind,
            normalized_shape=normalized,
            eps=draw(eps_values if kind == "layer_norm" else st.one_of(st.none(), eps_values)),
            elementwise_affine=draw(st.booleans()),
            dtype=dtype,
            **extra,
        )
        spatial = []
    lead = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    shape = input_shape(layer, batch, tuple(spatial), lead)
    return layer, shape, draw(st.integers(0, 2**32 - 1))


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _assert_close(ours, theirs, dtype: str, what: str, exact=None) -> None:
    """ours ~ theirs; with ``exact`` (float64 truth) also fine when ours is nearer the truth than theirs."""
    if theirs is None:
        assert ours is None, what
        return
    tol = TOL[dtype]
    allowed = tol["atol"] + tol["rtol"] * np.abs(theirs)
    if exact is not None and dtype != "float64":
        allowed = allowed + 2 * np.abs(theirs.astype(np.float64) - exact)
    excess = np.abs(np.asarray(ours, np.float64) - theirs) - allowed
    assert np.asarray(ours).shape == np.shape(theirs), what
    assert (excess <= 0).all(), f"{what}: ours {ours!r} vs torch {theirs!r} (worst excess {excess.max():.3g})"


def _grad(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    param = getattr(module, name, None)
    return None if param is None else param.grad


def _torch_grads(module: torch.nn.Module, x: np.ndarray, dy: np.ndarray):
    module = copy.deepcopy(module)  # torch's training forward updates running stats; ours does not
    module.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    module(xt).backward(torch.tensor(dy))
    return _np(xt.grad), _np(_grad(module, "weight")), _np(_grad(module, "bias"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_torch_module(case) -> None:
    layer, shape, seed = case
    rng = np.random.default_rng(seed)
    dtype = layer.dtype.name
    randomize(layer, rng)
    module = torch_twin(layer, len(shape))
    # torch -> ours: start both from the same random state, loaded the torch way.
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    layer.load_state_dict(module.state_dict())

    for step in range(3):
        x = rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 3), shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        for training in (True, False):
            module.train(training)
            tag = f"step {step} training={training}"
            dx, grads = layer.backward(x, dy, training=training)
            theirs = _torch_grads(module, x, dy)
            # float32 gradients of ill-conditioned groups (two nearly equal
            # values) carry rounding error in torch too: there, ours must be at
            # least as close as torch's to the float64 gradient of the same values.
            truth = _torch_grads(copy.deepcopy(module).double(), x.astype(np.float64), dy.astype(np.float64))
            for name, got, want, exact in zip(
                ("dx", "dweight", "dbias"), (dx, grads["weight"], grads["bias"]), theirs, truth, strict=True
            ):
                _assert_close(got, want, dtype, f"{name} {tag}", exact)
            with torch.no_grad():
                y_t = _np(module(torch.tensor(x)))
                # torch folds mean and bias into one shift (x * scale + shift): with one value per group
                # that cancels to the bias only up to rounding; ours may instead be the exact value.
                y_exact = _np(copy.deepcopy(module).double()(torch.tensor(x.astype(np.float64))))
            y = layer.forward(x, training=training)
            assert y.dtype == x.dtype
            assert y.shape == x.shape
            _assert_close(y, y_t, dtype, f"y {tag}", y_exact)
            # The float64 textbook formula agrees too (after the update for eval).
            np.testing.assert_allclose(y, reference_forward(layer, x, training), **TOL[dtype], err_msg=f"ref {tag}")
        ours, theirs = layer.state_dict(), module.state_dict()
        assert list(ours) == list(theirs)
        for key in ours:
            _assert_close(np.asarray(ours[key]), _np(theirs[key]), dtype, f"{key} after step {step}")
        if "num_batches_tracked" in ours:
            assert int(ours["num_batches_tracked"]) == int(theirs["num_batches_tracked"])

    # ours -> torch: a fresh torch module takes our state dict and agrees in eval mode.
    fresh = torch_twin(layer, len(shape))
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    fresh.eval()
    x = rng.normal(size=shape).astype(dtype)
    with torch.no_grad():
        _assert_close(layer.forward(x, training=False), _np(fresh(torch.tensor(x))), dtype, "round trip")


@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm"])
def test_state_dict_keys_and_dtypes_match_torch(kind: str) -> None:
    layer = nk.make_layer(kind, num_features=3, track_running_stats=True, affine=True)
    module = torch_twin(layer, 4)
    ours, theirs = layer.state_dict(), module.state_dict()
    assert list(ours) == list(theirs) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert ours["num_batches_tracked"].dtype == np.int64
    assert ours["num_batches_tracked"].shape == ()
    assert all(ours[k].dtype == np.float32 for k in ("weight", "bias", "running_mean", "running_var"))


def test_float16_input_matches_torch(rng: np.random.Generator) -> None:
    """float16 inputs compute in float32, like torch's CPU kernels, and return float16."""
    x = rng.normal(1, 2, (6, 4, 5)).astype(np.float16)
    for layer in (
        nk.BatchNorm(4),
        nk.GroupNorm(2, 4),
        nk.LayerNorm(5),
        nk.RMSNorm(5),
    ):
        randomize(layer, rng)
        module = torch_twin(layer, 3)
        module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
        with torch.no_grad():
            y_t = module(torch.tensor(x)).numpy()
        y = layer.forward(x, training=True)
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float32), y_t.astype(np.float32), rtol=2e-3, atol=2e-3)
