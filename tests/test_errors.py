"""Every error path: the right NormError subclass, a message a person can act on, no state change."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randomize, snapshot

import normkernels as nk

# Every test runs on the compiled CPU kernels and on the NumPy core.
pytestmark = pytest.mark.usefixtures("cpu_math")


@pytest.fixture
def layers(rng) -> dict[str, nk.NormLayer]:
    made = {
        "bn": nk.BatchNorm(3),
        "in": nk.InstanceNorm(3, affine=True, track_running_stats=True),
        "gn": nk.GroupNorm(3, 3),
        "ln": nk.LayerNorm([2, 3]),
        "rms": nk.RMSNorm(3),
    }
    for layer in made.values():
        randomize(layer, rng)
        if hasattr(layer, "num_features"):
            layer.forward(rng.normal(size=(4, 3, 5)).astype(np.float32))
    return made


def f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)


CALL_ERRORS = [
    ("bn", lambda L: L.forward(f32(3)), nk.ShapeError, r"rank >= 2.*shape \(3,\).*x\[None\]"),
    ("bn", lambda L: L.forward(f32(4, 5, 2)), nk.ShapeError, r"has 3 channels but x has 5 in dimension 1"),
    ("gn", lambda L: L.forward(f32(4, 2)), nk.ShapeError, r"has 3 channels but x has 2"),
    ("in", lambda L: L.forward(f32(4, 4, 7)), nk.ShapeError, r"3 channels"),
    ("ln", lambda L: L.forward(f32(4, 3, 2)), nk.ShapeError, r"trailing dimensions \(2, 3\).*shape \(4, 3, 2\)"),
    ("ln", lambda L: L.forward(f32(3)), nk.ShapeError, r"last 2 dimension\(s\) must equal normalized_shape"),
    ("rms", lambda L: L.forward(f32(2, 4)), nk.ShapeError, r"trailing dimensions \(3,\)"),
    ("bn", lambda L: L.forward(f32(1, 3)), nk.ShapeError, r"more than 1 value per channel.*\(1, 3\).*larger batch"),
    ("bn", lambda L: L.forward(f32(1, 3, 1, 1)), nk.ShapeError, r"more than 1 value per channel"),
    ("in", lambda L: L.forward(f32(5, 3, 1)), nk.ShapeError, r"more than 1 spatial element"),
    ("gn", lambda L: L.forward(f32(1, 3)), nk.ShapeError, r"more than 1 value per group"),
    ("bn", lambda L: L.forward(np.zeros((0, 3), np.float32)), nk.ShapeError, r"no elements"),
    ("ln", lambda L: L.forward(np.ones((4, 2, 3), np.int64)), nk.DTypeError, r"int64.*astype\(numpy.float32\)"),
    ("bn", lambda L: L.forward(np.ones((4, 3), bool)), nk.DTypeError, r"dtype bool"),
    ("bn", lambda L: L.forward(np.ones((4, 3), np.complex64)), nk.DTypeError, r"complex64"),
    ("bn", lambda L: L.forward([["a", "b", "c"]] * 2), nk.DTypeError, r"float16, float32 or float64"),
    ("bn", lambda L: L.backward(f32(4, 3), f32(4, 2)), nk.ShapeError, r"dy has shape \(4, 2\) but x has shape"),
    ("ln", lambda L: L.backward(f32(2, 3), np.ones((2, 3), np.int32)), nk.DTypeError, r"dy has dtype int32"),
    ("bn", lambda L: L.backward(f32(1, 3), f32(1, 3)), nk.ShapeError, r"more than 1 value per channel"),
]


@pytest.mark.parametrize(("name", "call", "error", "message"), CALL_ERRORS)
def test_bad_input_raises_and_changes_nothing(layers, name, call, error, message) -> None:
    layer = layers[name]
    before = snapshot(layer)
    with pytest.raises(error, match=message):
        call(layer)
    assert snapshot(layer) == before
    assert issubclass(error, ValueError)


def test_single_sample_is_fine_in_eval_with_running_stats(layers) -> None:
    y = layers["bn"].forward(f32(1, 3), training=False)
    assert y.shape == (1, 3)


CONFIG_ERRORS = [
    ("batch_norm", {"num_features": 0}, r"num_features must be a positive integer, got 0"),
    ("batch_norm", {"num_features": -2}, r"positive integer"),
    ("batch_norm", {"num_features": True}, r"positive integer, got True"),
    ("batch_norm", {"num_features": 2.5}, r"positive integer, got 2.5"),
    ("batch_norm", {"num_features": 2, "eps": 0}, r"eps must be a finite number > 0, got 0"),
    ("instance_norm", {"num_features": 2, "eps": -1e-5}, r"eps must be"),
    ("layer_norm", {"normalized_shape": 4, "eps": float("nan")}, r"eps must be"),
    ("rms_norm", {"normalized_shape": 4, "eps": float("inf")}, r"eps must be"),
    ("batch_norm", {"num_features": 2, "momentum": 1.5}, r"momentum must be in \[0, 1\] or None"),
    ("instance_norm", {"num_features": 2, "momentum": -0.1}, r"momentum must be"),
    ("group_norm", {"num_groups": 3, "num_channels": 4}, r"num_groups \(3\) must divide num_channels \(4\)"),
    ("group_norm", {"num_groups": 0, "num_channels": 4}, r"num_groups must be a positive integer"),
    ("layer_norm", {"normalized_shape": []}, r"at least one dimension"),
    ("layer_norm", {"normalized_shape": [3, 0]}, r"normalized_shape entry must be a positive integer, got 0"),
    ("layer_norm", {"normalized_shape": "abc"}, r"positive integer, got 'a'"),
    ("rms_norm", {"normalized_shape": None}, r"int or a sequence of ints"),
    ("batch_norm", {"num_features": 2, "dtype": "float16"}, r"dtype must be float32 or float64"),
    ("batch_norm", {"num_features": 2, "dtype": "int8"}, r"dtype must be float32 or float64"),
    ("batch_norm", {"num_features": 2, "device": "tpu"}, r"unknown device 'tpu'"),
    ("batch_norm", {"num_features": 2, "device": "cuda:x"}, r"unknown device"),
    ("batch_norm", {"num_features": 2, "groups": 2}, r"bad config for batch_norm:.*groups"),
    ("group_norm", {"num_channels": 4}, r"bad config for group_norm:.*num_groups"),
    ("conv", {}, r"unknown layer kind 'conv'; choose one of \['batch_norm'"),
]


@pytest.mark.parametrize(("kind", "config", "message"), CONFIG_ERRORS)
def test_bad_config_raises_config_error(kind, config, message) -> None:
    error = nk.DeviceError if "device" in config else nk.ConfigError
    with pytest.raises(error, match=message):
        nk.make_layer(kind, **config)


@pytest.mark.skipif(nk.cuda_device_count() > 0, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(nk.DeviceError, match=r"cuda:0.*(CuPy|not available).*device='cpu'"):
        nk.BatchNorm(2, device="cuda")


def _good_state(layer) -> dict:
    return {k: np.asarray(v).copy() for k, v in layer.state_dict().items()}


STATE_ERRORS = [
    ("bn", lambda s: {**s, "scale": s["weight"]}, r"unknown state key\(s\) \['scale'\].*expected \['weight'"),
    ("gn", lambda s: {**s, "running_mean": np.zeros(3)}, r"unknown state key\(s\) \['running_mean'\]"),
    ("bn", lambda s: {k: v for k, v in s.items() if k != "running_var"}, r"missing state key\(s\) \['running_var'\]"),
    ("bn", lambda s: {**s, "weight": np.ones(4)}, r"state\['weight'\] has shape \(4,\), the layer needs \(3,\)"),
    ("ln", lambda s: {**s, "bias": np.ones((3, 2))}, r"state\['bias'\] has shape \(3, 2\), the layer needs \(2, 3\)"),
    ("bn", lambda s: {**s, "bias": np.ones(3, np.int32)}, r"state\['bias'\] has dtype int32.*floating-point"),
    ("bn", lambda s: {**s, "running_var": np.array([1.0, -0.5, 1.0])}, r"negative entries"),
    ("in", lambda s: {**s, "running_mean": np.array([0.0, np.nan, 1.0])}, r"running_mean'\] contains NaN or Inf"),
    ("rms", lambda s: {**s, "weight": np.array([1.0, np.inf, 1.0])}, r"weight'\] contains NaN or Inf"),
    ("bn", lambda s: {**s, "num_batches_tracked": np.array(-1)}, r"num_batches_tracked'\] must be >= 0, got -1"),
    ("bn", lambda s: {**s, "num_batches_tracked": np.array(2.0)}, r"one integer.*float64"),
    ("bn", lambda s: {**s, "num_batches_tracked": np.array([1, 2])}, r"one integer.*shape \(2,\)"),
    ("bn", lambda s: {**s, "weight": object()}, r"state\['weight'\] has shape \(\)"),
    ("bn", lambda s: {**s, "weight": "abc"}, r"state\['weight'\] has shape \(\)"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), STATE_ERRORS)
def test_bad_state_dict_is_refused_whole(layers, name, mutate, message) -> None:
    layer = layers[name]
    before = snapshot(layer)
    bad = mutate(_good_state(layer))
    # Change every valid entry too, so a partial load would show.
    for key, value in bad.items():
        if key != "num_batches_tracked" and isinstance(value, np.ndarray) and value.dtype.kind == "f":
            bad[key] = value + 0.5 if key != "running_var" or (value >= 0).all() else value
    with pytest.raises(nk.StateDictError, match=message):
        layer.load_state_dict(bad)
    assert snapshot(layer) == before


def test_load_state_dict_copies_and_non_strict_loads_a_subset(layers) -> None:
    layer = layers["bn"]
    weight = np.full(3, 2.0)
    layer.load_state_dict({"weight": weight}, strict=False)
    weight[:] = 7.0
    np.testing.assert_array_equal(layer.weight, np.full(3, 2.0, np.float32))
    assert layer.weight.dtype == np.float32
