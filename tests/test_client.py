"""Client behaviour: the async mirror, errors, timeouts, retries, inputs and configs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from serverproc import NORMSERVE

import normkernels as nk
from normserve.client import (
    AsyncNormClient,
    DeadlineExceeded,
    InvalidArgument,
    NormClient,
    NormServeError,
    NotFound,
    RetryPolicy,
    Unavailable,
)
from normserve.client.protocol import IDEMPOTENT_METHODS, layer_config
from normserve.v1 import normalization_pb2 as pb


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_async_client_mirrors_the_sync_one(server, layer_name, rng) -> None:
    local = nk.GroupNorm(2, 4)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)

    async def scenario() -> None:
        async with AsyncNormClient(server.target) as nc:
            assert await nc.health() == "SERVING"
            with pytest.raises(NotFound):
                await nc.health("no.such.Service")
            layer = await nc.create_layer(layer_name, "group_norm", num_groups=2, num_channels=4)
            np.testing.assert_array_equal(await layer.train(x), local.forward(x))
            np.testing.assert_array_equal(await layer.infer(x), local.forward(x, training=False))
            dx, dweight, dbias = await layer.gradient(x, dy)
            ldx, grads = local.backward(x, dy)
            np.testing.assert_array_equal(dx, ldx)
            np.testing.assert_array_equal(dweight, grads["weight"])
            np.testing.assert_array_equal(dbias, grads["bias"])
            state = await layer.state_dict()
            assert (await layer.load_state_dict(state)).version == 2
            assert [remote.name for remote in await nc.list_layers(layer_name)] == [layer_name]
            assert (await nc.layer(layer_name)).version == 2
            await layer.delete()
            with pytest.raises(NotFound) as caught:
                await layer.refresh()
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
            assert layer_name in caught.value.details

    asyncio.run(scenario())


def test_errors_carry_code_details_and_method(client, layer_name) -> None:
    layer = client.create_layer(layer_name, "batch_norm", num_features=3)
    with pytest.raises(InvalidArgument) as caught:
        layer.train(np.ones((2, 5), np.float32))
    error = caught.value
    assert isinstance(error, NormServeError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.method == "Train"
    assert "3 channels" in error.details
    assert str(error).startswith("Train: INVALID_ARGUMENT: ")


def test_per_call_timeout(client, layer_name, rng) -> None:
    layer = client.create_layer(layer_name, "batch_norm", num_features=8)
    x = rng.normal(size=(512, 8, 1024)).astype(np.float32)  # 16 MB: far more than 1 ms of work
    with pytest.raises(DeadlineExceeded):
        layer.infer(x, timeout=0.001)
    assert layer.infer(x[:2]).shape == (2, 8, 1024)


def test_idempotent_calls_retry_until_the_server_is_up(tmp_path) -> None:
    assert {"Train", "SetState", "DeleteLayer"}.isdisjoint(IDEMPOTENT_METHODS)
    port = free_port()
    policy = RetryPolicy(attempts=120, initial_backoff=0.25, max_backoff=0.25)  # up to 30 s of retries
    with NormClient(f"127.0.0.1:{port}", retry=policy, timeout=5) as nc:
        started = time.monotonic()
        with pytest.raises(Unavailable):  # Train is never resent: it fails at once
            nc.call("Train", pb.TrainRequest(layer="bn"))
        assert time.monotonic() - started < 0.25

        result = {}

        def list_layers() -> None:
            try:
                result["layers"] = nc.list_layers()
            except NormServeError as exc:
                result["error"] = exc

        caller = threading.Thread(target=list_layers)
        caller.start()
        time.sleep(1.0)  # the first attempts fail: nothing listens yet
        assert caller.is_alive()
        server = subprocess.Popen(
            [NORMSERVE, "serve", "--port", str(port), "--state-dir", str(tmp_path / "state")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            caller.join(60)
            assert result == {"layers": []}
        finally:
            server.terminate()
            assert server.wait(30) == 0


def test_layer_config_takes_pytorch_arguments() -> None:
    config = layer_config("group_norm", num_groups=4, num_channels=32, eps=1e-3, affine=False, dtype="float64")
    assert (config.kind, config.num_groups, config.num_features, config.eps) == (pb.GROUP_NORM, 4, 32, 1e-3)
    assert config.HasField("affine")
    assert not config.affine
    assert config.param_dtype == pb.FLOAT64
    assert layer_config("batch_norm", num_features=3, momentum=None).cumulative_average
    assert list(layer_config("layer_norm", normalized_shape=7, elementwise_affine=True).normalized_shape) == [7]
    assert not layer_config("rms_norm", normalized_shape=[2, 3], eps=None).HasField("eps")
    with pytest.raises(ValueError, match="unknown layer kind"):
        layer_config("batchnorm", num_features=3)
    with pytest.raises(TypeError, match="unexpected argument 'num_feature'"):
        layer_config("batch_norm", num_feature=3)


def test_inputs_must_be_floating_point(client, layer_name) -> None:
    layer = client.create_layer(layer_name, "layer_norm", normalized_shape=3)
    with pytest.raises(ValueError, match="cannot go on the wire"):
        layer.train(np.ones((2, 3), dtype=np.int64))
