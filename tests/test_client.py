"""Client behaviour: the async mirror, errors, timeouts, retries, inputs and configs."""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from serverproc import NORMSERVE, patience

import normkernels as nk
from normserve.client import (
    AsyncNormClient,
    AsyncRemoteLayer,
    DeadlineExceeded,
    InvalidArgument,
    NormClient,
    NormServeError,
    NotFound,
    RemoteLayer,
    RetryPolicy,
    Unavailable,
    aio,
    blocking,
    operations,
    protocol,
)
from normserve.client.protocol import IDEMPOTENT_METHODS, layer_config
from normserve.tools import children
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


@pytest.mark.parametrize(
    ("blocking_class", "async_class"), [(NormClient, AsyncNormClient), (RemoteLayer, AsyncRemoteLayer)]
)
def test_the_async_classes_have_every_method_of_the_blocking_ones(blocking_class, async_class) -> None:
    """Same names, arguments and docs; coroutines on one side only (layer handles: the client's own class)."""

    def methods(cls: type) -> dict[str, object]:
        return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}

    blocking_methods, async_methods = methods(blocking_class), methods(async_class)
    assert blocking_methods.keys() == async_methods.keys()
    for name, method in blocking_methods.items():
        if not inspect.isfunction(method):  # properties and attributes: the shared base's
            assert async_methods[name] is method, name
            continue
        mirror = async_methods[name]
        assert not inspect.iscoroutinefunction(method), name
        assert inspect.iscoroutinefunction(mirror), name
        signature = str(inspect.signature(method)).replace("RemoteLayer", "AsyncRemoteLayer")
        assert str(inspect.signature(mirror)) == signature, name
        assert mirror.__doc__ == method.__doc__, name


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
    # A resent call would wait a backoff first: made long, it tells "sent once" from "resent" on any machine.
    backoff = patience(1)
    with NormClient(f"127.0.0.1:{port}", retry=RetryPolicy(2, initial_backoff=backoff, max_backoff=backoff)) as nc:
        started = time.monotonic()
        with pytest.raises(Unavailable):  # Train is never resent: it fails at once
            nc.call("Train", pb.TrainRequest(layer="bn"))
        assert time.monotonic() - started < backoff
    retrying = patience(3)  # a start loads the cached kernels: seconds alone
    policy = RetryPolicy(attempts=int(retrying / 0.25), initial_backoff=0.25, max_backoff=0.25)
    with NormClient(f"127.0.0.1:{port}", retry=policy, timeout=patience(0.5)) as nc:
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
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log:  # a failure shows what the server said
            server = children.popen(  # ends with the test run, however that ends
                [NORMSERVE, "serve", "--port", str(port), "--state-dir", str(tmp_path / "state")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            caller.join(patience(6))
            assert result == {"layers": []}, log_path.read_text()
        finally:
            server.terminate()
            assert server.wait(patience(3)) == 0, log_path.read_text()


UPDATES = [
    ("Train", pb.TrainRequest(layer="bn")),
    ("SetState", pb.SetStateRequest(name="bn")),
    ("DeleteLayer", pb.DeleteLayerRequest(name="bn")),
]
READS = [("ListLayers", pb.ListLayersRequest()), ("GetState", pb.GetStateRequest(name="bn"))]


async def _answer(call):
    """What a blocking call returns, or what an asyncio call's coroutine returns."""
    answer = call()
    return await answer if inspect.isawaitable(answer) else answer


@pytest.mark.parametrize("client_class", [NormClient, AsyncNormClient])
def test_both_clients_resend_reads_after_each_backoff_and_updates_never(client_class) -> None:
    async def seconds_to_fail(backoff: float, calls) -> list[float]:
        policy = RetryPolicy(attempts=3, initial_backoff=backoff, max_backoff=backoff)
        nc = client_class(f"127.0.0.1:{free_port()}", retry=policy, timeout=patience(0.5))  # nothing listens there
        waited = []
        for method, request in calls:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await _answer(functools.partial(nc.call, method, request))
            waited.append(time.monotonic() - started)
        await _answer(nc.close)
        return waited

    async def scenario() -> None:
        # A resent update would wait a backoff first: made long, it tells "sent once" apart on any machine.
        backoff = patience(1)
        for (method, _), waited in zip(UPDATES, await seconds_to_fail(backoff, UPDATES), strict=True):
            assert waited < backoff, method  # sent once: a reply may be lost
        backoff = 0.2
        for (method, _), waited in zip(READS, await seconds_to_fail(backoff, READS), strict=True):
            assert waited >= 2 * backoff, method  # 3 attempts, 2 waits

    asyncio.run(scenario())


@pytest.mark.parametrize("module", [protocol, operations, blocking, aio])
def test_client_modules_export_every_public_name(module) -> None:
    tree = ast.parse(inspect.getsource(module))
    defined = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {target.id for target in targets if isinstance(target, ast.Name)}
    assert {name for name in defined if not name.startswith("_")} == set(module.__all__)


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
