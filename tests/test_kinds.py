"""A kind is declared once: its class in normkernels.layers (config = constructor signature) and a proto enum value.

Everything else (the server's LayerConfig <-> layer mapping, the clients'
keyword arguments, ``layer.config``) is derived; these tests fail when a kind
is added on one side only or an argument has no LayerConfig field.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from conftest import input_shape

import normkernels as nk
from normserve.client.protocol import layer_config
from normserve.server.layer_config import build_layer, describe_config
from normserve.v1 import kinds
from normserve.v1 import normalization_pb2 as pb

#: A value other than the default for every config argument any kind takes (sizes consistent with each other).
OTHER_VALUES = {
    "num_features": 6,
    "num_channels": 6,
    "num_groups": 3,
    "normalized_shape": [3, 5],
    "eps": 1e-3,
    "momentum": None,
    "affine": False,
    "elementwise_affine": False,
    "bias": False,
    "track_running_stats": False,
    "biased_running_var": True,
    "device": "cpu",
    "dtype": "float64",
}


def test_the_wire_and_the_kernels_know_the_same_kinds() -> None:
    assert sorted(kinds.kind_names()) == sorted(nk.KINDS)


@pytest.mark.parametrize("kind", sorted(nk.KINDS))
def test_every_config_argument_has_a_layer_config_field(kind: str) -> None:
    names = nk.config_names(nk.KINDS[kind])
    assert set(names) <= set(OTHER_VALUES), "give the new argument a value in OTHER_VALUES"
    fields = set(pb.LayerConfig.DESCRIPTOR.fields_by_name)
    assert set(kinds.config_fields(kind)) <= fields
    assert sorted(kinds.config_fields(kind).values()) == sorted(set(names) - set(kinds.COMMON_ARGUMENTS))


@pytest.mark.parametrize("kind", sorted(nk.KINDS))
def test_config_is_read_back_from_the_constructor_signature(kind: str) -> None:
    cls = nk.KINDS[kind]
    parameters = nk.config_parameters(cls)
    layer = cls(**{name: OTHER_VALUES[name] for name in parameters})
    assert list(layer.config) == list(parameters)
    assert layer.config == {name: OTHER_VALUES[name] for name in parameters}
    defaults = cls(**{n: OTHER_VALUES[n] for n, p in parameters.items() if p.default is inspect.Parameter.empty})
    for name, parameter in parameters.items():
        if parameter.default is not inspect.Parameter.empty and name != "dtype":
            assert defaults.config[name] == parameter.default, name
    assert defaults.config["dtype"] == np.dtype(parameters["dtype"].default).name


@pytest.mark.parametrize("kind", sorted(nk.KINDS))
@pytest.mark.parametrize("values", ["defaults", "other"])
def test_a_config_crosses_the_wire_unchanged(kind: str, values: str) -> None:
    """Client keyword arguments -> LayerConfig -> server layer -> LayerConfig -> the same keyword arguments."""
    parameters = nk.config_parameters(nk.KINDS[kind])
    chosen = {
        name: OTHER_VALUES[name]
        for name, parameter in parameters.items()
        if values == "other" or parameter.default is inspect.Parameter.empty
    }
    message = layer_config(kind, **chosen)
    layer = build_layer(pb.LayerConfig.FromString(message.SerializeToString()), default_device="cpu")
    assert layer.kind == kind
    expected = nk.make_layer(kind, **chosen).config
    assert layer.config == expected
    assert build_layer(describe_config(layer), default_device="cpu").config == expected


def test_every_kind_has_cases_in_the_kernel_tables() -> None:
    """Gradients (finite differences) and the GPU comparison take explicit cases: a new kind needs some."""
    from test_gpu import CONFIGS as GPU_CASES
    from test_gradients import CONFIGS as GRADIENT_CASES

    assert {kind for kind, *_ in GRADIENT_CASES} == set(nk.KINDS)
    assert {kind for kind, *_ in GPU_CASES} == set(nk.KINDS)


@pytest.mark.parametrize("kind", sorted(nk.KINDS))
def test_every_kind_serves_end_to_end(kind: str, client, layer_name: str, rng) -> None:
    """Create, Train, Infer, Gradient and GetState of each kind through `normserve serve`, against a local layer."""
    parameters = nk.config_parameters(nk.KINDS[kind])
    required = {n: OTHER_VALUES[n] for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    local = nk.make_layer(kind, **required)
    remote = client.create_layer(layer_name, kind, **required)
    assert remote.info.config == describe_config(local)
    shape = input_shape(local, 4, (3, 2), lead=(5,))
    for _ in range(2):
        x = rng.normal(0.5, 2.0, shape).astype(np.float32)
        np.testing.assert_allclose(remote.train(x), local.forward(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(remote.infer(x), local.forward(x, training=False), rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=shape).astype(np.float32)
    dx, dweight, dbias = remote.gradient(x, dy)
    want_dx, grads = local.backward(x, dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    for got, want in ((dweight, grads["weight"]), (dbias, grads["bias"])):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for key, value in local.state_dict().items():
        np.testing.assert_allclose(remote.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_every_list_of_the_kinds_names_all_of_them() -> None:
    """The summaries that name the kinds (the .proto header, the package, the README, `normserve --help`)
    name every one: LayerNorm2d was once missing from two of them."""
    import re
    import subprocess
    from pathlib import Path

    from serverproc import NORMSERVE

    root = Path(__file__).resolve().parents[1]
    proto = (root / "protos" / "normserve" / "v1" / "normalization.proto").read_text()
    header = " ".join(line.lstrip("/ ") for line in proto.split("syntax")[0].splitlines())
    description = re.search(r'^description = "(.*)"$', (root / "pyproject.toml").read_text(), re.M)[1]
    readme = " ".join((root / "README.md").read_text().split("\n\n")[1].split())
    classes = [cls.__name__ for cls in nk.KINDS.values()]
    for text in (header, description, readme):
        assert [name for name in classes if not re.search(rf"\b{name}\b", text)] == [], text
    helped = " ".join(subprocess.run([NORMSERVE, "--help"], capture_output=True, text=True, check=True).stdout.split())
    assert [name for name in kinds.kind_names() if not re.search(rf"\b{name}\b", helped)] == []
