"""Every RPC and every kind against the real server, compared with normkernels and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize, torch_twin

import normkernels as nk
from normserve.client import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

CASES = [
    ("batch_norm", {"num_features": 4}, (6, 4, 5), np.float32),
    ("batch_norm", {"num_features": 3, "momentum": None, "affine": False}, (5, 3, 2, 2), np.float32),
    ("batch_norm", {"num_features": 2, "dtype": "float64", "biased_running_var": True}, (4, 2, 3), np.float64),
    ("instance_norm", {"num_features": 3, "affine": True, "track_running_stats": True}, (4, 3, 7), np.float32),
    ("instance_norm", {"num_features": 3}, (2, 3, 4, 2), np.float32),
    ("group_norm", {"num_groups": 2, "num_channels": 4, "eps": 1e-3}, (3, 4, 5), np.float32),
    ("layer_norm", {"normalized_shape": [3, 4]}, (2, 5, 3, 4), np.float32),
    ("layer_norm", {"normalized_shape": 6, "bias": False, "dtype": "float64"}, (4, 6), np.float64),
    ("rms_norm", {"normalized_shape": 6}, (3, 2, 6), np.float32),
    ("rms_norm", {"normalized_shape": [2, 3], "eps": 1e-6, "elementwise_affine": False}, (4, 2, 3), np.float32),
]
IDS = [f"{kind}-{i}" for i, (kind, *_) in enumerate(CASES)]


def assert_state_equal(remote: dict, local: dict) -> None:
    assert list(remote) == list(local)
    for key in local:
        np.testing.assert_array_equal(remote[key], np.asarray(local[key]), err_msg=key)
        assert remote[key].dtype == np.asarray(local[key]).dtype, key


@pytest.mark.parametrize(("kind", "config", "shape", "dtype"), CASES, ids=IDS)
def test_every_rpc_matches_normkernels_and_torch(client, layer_name, rng, kind, config, shape, dtype) -> None:
    local = nk.make_layer(kind, **config)
    remote = client.create_layer(layer_name, kind, **config)
    assert remote.info.config.device == "cpu"
    assert list(remote.info.state_keys) == list(local.state_keys)
    assert tuple(remote.info.param_shape) == local.param_shape

    randomize(local, rng)
    remote.load_state_dict(local.state_dict())
    assert_state_equal(remote.state_dict(), local.state_dict())

    module = torch_twin(local, len(shape))
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in local.state_dict().items()})
    module.train()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for _ in range(3):
        x = rng.normal(0.5, 2.0, shape).astype(dtype)
        y = remote.train(x)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, local.forward(x, training=True))  # same kernels: bit for bit
        np.testing.assert_allclose(y, module(torch.from_numpy(x)).detach().numpy(), **tol)
        assert_state_equal(remote.state_dict(), local.state_dict())
    assert remote.refresh().num_batches_tracked == local.num_batches_tracked

    x = rng.normal(0.5, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    np.testing.assert_array_equal(remote.infer(x), local.forward(x, training=False))
    if not config.get("biased_running_var"):  # torch has only the unbiased running variance
        module.eval()
        np.testing.assert_allclose(remote.infer(x), module(torch.from_numpy(x)).detach().numpy(), **tol)
    for training in (True, False):
        dx, dweight, dbias = remote.gradient(x, dy, training=training)
        ldx, grads = local.backward(x, dy, training=training)
        np.testing.assert_array_equal(dx, ldx)
        for got, want in ((dweight, grads["weight"]), (dbias, grads["bias"])):
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_array_equal(got, want)
    assert_state_equal(remote.state_dict(), local.state_dict())  # Infer and Gradient changed nothing


def test_layer_lifecycle(client, layer_name) -> None:
    bn = client.create_layer(layer_name, "batch_norm", num_features=8)
    assert bn.version == 1
    again = client.create_layer(layer_name, "batch_norm", num_features=8, eps=1e-5, momentum=0.1)
    assert again.info == bn.info  # an equal config (defaults spelled out) is the same layer
    with pytest.raises(AlreadyExists, match="different config"):
        client.create_layer(layer_name, "batch_norm", num_features=8, momentum=0.2)
    client.create_layer(layer_name + ".ln", "layer_norm", normalized_shape=[8])
    assert [layer.name for layer in client.list_layers(layer_name)] == [layer_name, layer_name + ".ln"]
    assert client.layer(layer_name).info == bn.info

    deleted = client.delete_layer(layer_name)
    assert deleted.name == layer_name
    x = np.ones((2, 8), np.float32)
    for call in (
        lambda: client.layer(layer_name),
        lambda: bn.train(x),
        lambda: bn.infer(x),
        lambda: bn.gradient(x, x),
        bn.state_dict,
        lambda: bn.load_state_dict({"weight": np.ones(8, np.float32)}, strict=False),
        lambda: client.delete_layer(layer_name),
    ):
        with pytest.raises(NotFound, match="no layer named"):
            call()
    assert [layer.name for layer in client.list_layers(layer_name)] == [layer_name + ".ln"]
    fresh = client.create_layer(layer_name, "batch_norm", num_features=8)  # the name is free again, state fresh
    assert fresh.version == 1
    assert int(fresh.state_dict()["num_batches_tracked"]) == 0


def test_versions_count_state_changes(client, layer_name, rng) -> None:
    bn = client.create_layer(layer_name, "batch_norm", num_features=3)
    ln = client.create_layer(layer_name + ".ln", "layer_norm", normalized_shape=3)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    bn.train(x)
    bn.infer(x)
    bn.gradient(x, x)
    assert bn.refresh().version == 2
    ln.train(x)
    assert ln.refresh().version == 1  # no running statistics: a Train changes nothing
    state = bn.state_dict()
    state["running_var"] = state["running_var"] * 2
    with pytest.raises(FailedPrecondition, match="version 2, not the expected 1"):
        bn.load_state_dict(state, expected_version=1)
    assert bn.refresh().version == 2
    assert bn.load_state_dict(state, expected_version=2).version == 3
    np.testing.assert_array_equal(bn.state_dict()["running_var"], state["running_var"])


def test_partial_state_updates_only_given_keys(client, layer_name) -> None:
    bn = client.create_layer(layer_name, "batch_norm", num_features=3)
    before = bn.state_dict()
    bn.load_state_dict({"bias": np.array([1.0, 2.0, 3.0])}, strict=False)  # float64 is cast to the layer's float32
    after = bn.state_dict()
    np.testing.assert_array_equal(after["bias"], np.array([1, 2, 3], np.float32))
    for key in ("weight", "running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_array_equal(after[key], before[key])
    with pytest.raises(InvalidArgument, match="missing state key"):
        bn.load_state_dict({"bias": np.zeros(3, np.float32)})


def test_torch_state_dict_round_trip(client, layer_name, rng) -> None:
    module = torch.nn.BatchNorm2d(5)
    module.train()
    for _ in range(3):
        module(torch.from_numpy(rng.normal(1.0, 2.0, (4, 5, 3, 3)).astype(np.float32)))
    remote = client.create_layer(layer_name, "batch_norm", num_features=5)
    remote.load_state_dict(module.state_dict())  # torch tensors straight in
    state = remote.state_dict()
    fresh = torch.nn.BatchNorm2d(5)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    for key, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.from_numpy(rng.normal(size=(2, 5, 3, 3)).astype(np.float32))
    module.eval()
    np.testing.assert_allclose(remote.infer(x), module(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_wire_dtypes(client, layer_name, rng) -> None:
    local = nk.LayerNorm(16)
    remote = client.create_layer(layer_name, "layer_norm", normalized_shape=16)
    x = rng.normal(3.0, 2.0, (8, 16))
    # float16 data travels as float16 and comes back as float16, computed in float32 as locally
    x16 = x.astype(np.float16)
    y16 = remote.train(x16)
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, local.forward(x16))
    # bfloat16 on the wire halves the bytes; the caller still gets its float32 back
    x32 = x.astype(np.float32)
    y = remote.infer(x32, wire_dtype="bfloat16")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, local.forward(x32, training=False), rtol=0.02, atol=0.05)
    assert not np.array_equal(y, local.forward(x32, training=False))  # it really went through bfloat16
    # torch tensors in (bfloat16 too), NumPy out in the tensor's dtype
    y_torch = remote.infer(torch.from_numpy(x32))
    np.testing.assert_array_equal(y_torch, local.forward(x32, training=False))
    y_bf16 = remote.infer(torch.from_numpy(x32).to(torch.bfloat16))
    assert str(y_bf16.dtype) == "bfloat16"
    np.testing.assert_allclose(y_bf16.astype(np.float32), y, rtol=0.02, atol=0.05)


def test_server_reflection_lists_services(server) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"normserve.v1.Normalization", "grpc.health.v1.Health"} <= names
