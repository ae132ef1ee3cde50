"""Moving tensors: streaming RPCs, kept forwards (Gradient by forward_id) and shared memory, end to end."""

from __future__ import annotations

import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from serverproc import everything, patience

import normkernels as nk
from normserve.client import (
    FailedPrecondition,
    InvalidArgument,
    NormClient,
    NotFound,
    ResourceExhausted,
)
from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

SERVICE = "/normserve.v1.Normalization/"


def _batch(rng: np.random.Generator, shape=(16, 8, 32)) -> np.ndarray:
    return rng.normal(0.5, 2.0, shape).astype(np.float32)


# ---------------------------------------------------------------------- streaming
def test_streamed_calls_equal_unary_ones(server, layer_name, rng) -> None:
    x, dy = _batch(rng), _batch(rng)
    local = nk.BatchNorm(8)
    # 1 KB chunks: every call streams, its tensors cut across chunk and tensor boundaries
    with NormClient(server.target, stream_threshold=1, chunk_bytes=1000) as streaming:
        layer = streaming.create_layer(layer_name, "batch_norm", num_features=8)
        y = layer.train(x)
        np.testing.assert_allclose(y, local.forward(x), rtol=1e-6, atol=1e-6)
        assert layer.info.num_batches_tracked == 1
        np.testing.assert_allclose(layer.infer(x), local.forward(x, training=False), rtol=1e-6, atol=1e-6)
        dx, dweight, dbias = layer.gradient(x, dy)
        ldx, grads = local.backward(x, dy)
        np.testing.assert_allclose(dx, ldx, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dweight, grads["weight"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dbias, grads["bias"], rtol=1e-5, atol=1e-5)
        y16 = layer.infer(x, wire_dtype="float16")  # wire dtypes stream too
        np.testing.assert_allclose(y16, local.forward(x, training=False), rtol=2e-3, atol=2e-3)
        streamed = layer.infer(x)
    with NormClient(server.target) as unary:  # the same state seen without streaming
        assert unary.layer(layer_name).info.num_batches_tracked == 1
        np.testing.assert_array_equal(unary.layer(layer_name).infer(x), streamed)


def test_streams_are_validated_like_unary_calls(server, layer_name, rng) -> None:
    with NormClient(server.target, stream_threshold=1, chunk_bytes=64) as nc:
        layer = nc.create_layer(layer_name, "batch_norm", num_features=8)
        with pytest.raises(InvalidArgument, match="channel"):
            layer.train(_batch(rng, (4, 5, 6)))
        with pytest.raises(NotFound):
            nc.layer(layer_name + "x")
        with NormClient(server.target, stream_threshold=1) as other, pytest.raises(NotFound):
            other.call("Infer", _infer_payload("missing", _batch(rng)))
        assert layer.refresh().num_batches_tracked == 0


def _infer_payload(layer: str, x: np.ndarray) -> wire.Payload:
    header, data = codec.outgoing(x)
    return wire.Payload(pb.InferRequest(layer=layer, x=header), {"x": data})


def _raw_stream(target: str, method: str, parts, timeout: float | None = None):
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            SERVICE + method, request_serializer=wire.serialize_part, response_deserializer=bytes
        )
        return list(call(parts, timeout=patience(3) if timeout is None else timeout))


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ("empty", "stream is empty"),
        ("chunk first", "starts with a chunk"),
        ("short", "ended after 8 of the 2048 bytes"),
        ("long", "more than the 2048 bytes"),
        ("two heads", "second head"),
    ],
)
def test_malformed_streams_answer_invalid_argument_and_change_nothing(server, layer_name, rng, parts, match) -> None:
    with NormClient(server.target) as nc:
        nc.create_layer(layer_name, "batch_norm", num_features=8)
        before = everything(pb_grpc.NormalizationStub(nc._channel))
        head = wire.Payload(pb.TrainRequest(layer=layer_name, x=pb.Tensor(dtype=pb.FLOAT32, shape=[8, 8, 8])))
        parts = {
            "empty": [],
            "chunk first": [wire.Chunk(b"1234")],
            "short": [head, wire.Chunk(b"12345678")],
            "long": [head, wire.Chunk(bytes(2048)), wire.Chunk(b"1")],
            "two heads": [head, head],
        }[parts]
        with pytest.raises(grpc.RpcError) as error:
            _raw_stream(server.target, "TrainStream", iter(parts))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in error.value.details()
        assert everything(pb_grpc.NormalizationStub(nc._channel)) == before


def test_a_stream_head_over_the_limits_is_refused_before_any_chunk(start_server, rng) -> None:
    proc = start_server("--max-tensor-bytes", "4096")
    with NormClient(proc.target) as nc:
        nc.create_layer("bn", "batch_norm", num_features=8)
    release = threading.Event()
    quiet = patience(2)  # a server that waited for the chunks would answer only after this

    def parts():
        yield wire.Payload(pb.TrainRequest(layer="bn", x=pb.Tensor(dtype=pb.FLOAT32, shape=[64, 8, 1024])))
        release.wait(quiet)  # the chunks would come only now
        yield wire.Chunk(bytes(1 << 20))

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        _raw_stream(proc.target, "InferStream", parts())
    release.set()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the server's limit of 4096" in error.value.details()
    assert time.monotonic() - start < quiet  # answered from the head alone, before any chunk was sent


# ---------------------------------------------------------------------- kept forwards
def test_gradient_by_forward_id_equals_gradient_with_x(client, layer_name, rng) -> None:
    layer = client.create_layer(layer_name, "group_norm", num_groups=2, num_channels=8)
    x, dy = _batch(rng), _batch(rng)
    y = layer.train(x, keep_forward=True)
    assert layer.forward_id
    kept = layer.gradient(None, dy)
    sent = layer.gradient(x, dy)
    for a, b in zip(kept, sent, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(layer.gradient(None, dy, forward_id=layer.forward_id)[0], sent[0])
    assert y.shape == x.shape
    # eval-mode gradient of the kept forward, in another wire dtype
    dx16, _, _ = layer.gradient(None, dy, training=False, wire_dtype="float16")
    np.testing.assert_allclose(dx16, layer.gradient(x, dy, training=False)[0], rtol=5e-3, atol=5e-3)


def test_a_kept_forward_keeps_the_weights_it_ran_with(client, layer_name, rng) -> None:
    layer = client.create_layer(layer_name, "batch_norm", num_features=8)
    x, dy = _batch(rng), _batch(rng)
    before = layer.state_dict()
    layer.train(x, keep_forward=True)
    layer.load_state_dict({"weight": rng.normal(size=8).astype(np.float32)}, strict=False)  # an optimizer step
    local = nk.BatchNorm(8)
    local.load_state_dict(before)
    dx, dweight, _ = layer.gradient(None, dy)
    ldx, grads = local.backward(x, dy)
    np.testing.assert_allclose(dx, ldx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dweight, grads["weight"], rtol=1e-5, atol=1e-5)


def test_forward_ids_are_evicted_least_recently_used_first(start_server, rng) -> None:
    x = _batch(rng)  # 16 KB
    # Two kept forwards fit: each counts x's message, the layer's state (weight and bias) and 2 KiB of records.
    proc = start_server("--forward-cache-bytes", str(2 * (x.nbytes + 4096)))
    with NormClient(proc.target) as nc:
        layer = nc.create_layer("ln", "layer_norm", normalized_shape=32)
        ids = []
        for _ in range(3):
            layer.train(x, keep_forward=True)
            ids.append(layer.forward_id)
            if len(ids) == 2:
                layer.gradient(None, x, forward_id=ids[0])  # use the first: the second is now the oldest
        layer.gradient(None, x, forward_id=ids[0])
        layer.gradient(None, x, forward_id=ids[2])
        with pytest.raises(FailedPrecondition, match="send x instead"):
            layer.gradient(None, x, forward_id=ids[1])
        with pytest.raises(FailedPrecondition):
            layer.gradient(None, x, forward_id="0" * 32)
        with pytest.raises(ResourceExhausted, match="--forward-cache-bytes"):
            layer.train(np.concatenate([x, x, x]), keep_forward=True)
        assert layer.refresh().num_batches_tracked == 0  # layer norm: nothing to track, nothing changed
        other = nc.create_layer("ln2", "layer_norm", normalized_shape=32)
        with pytest.raises(InvalidArgument, match="forward of layer 'ln'"):
            other.gradient(None, x, forward_id=ids[2])
        layer.delete()
        with pytest.raises(NotFound):
            layer.gradient(None, x, forward_id=ids[2])
        nc.create_layer("ln", "layer_norm", normalized_shape=32)
        with pytest.raises(FailedPrecondition):  # the new layer of that name has no forwards
            layer.gradient(None, x, forward_id=ids[2])


def test_a_refused_keep_forward_changes_nothing(start_server, rng) -> None:
    proc = start_server("--forward-cache-bytes", "0")
    with NormClient(proc.target) as nc:
        layer = nc.create_layer("bn", "batch_norm", num_features=8)
        before = everything(pb_grpc.NormalizationStub(nc._channel))
        with pytest.raises(ResourceExhausted, match="at most 0 bytes"):
            layer.train(_batch(rng), keep_forward=True)
        assert everything(pb_grpc.NormalizationStub(nc._channel)) == before
        with pytest.raises(ValueError, match="keep_forward=True"):
            layer.gradient(None, _batch(rng))


# ---------------------------------------------------------------------- shared memory
def _shm_objects() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def test_shared_memory_is_off_by_default(client, rng) -> None:
    objects = _shm_objects()
    with pytest.raises(FailedPrecondition, match="--shared-memory"):
        client.create_shared_memory("r", 1 << 16)
    assert _shm_objects() == objects  # the object made for the refused region is gone again
    assert client.regions == []
    with pytest.raises(FailedPrecondition, match="--shared-memory"):
        client.list_shared_memory()
    ref = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], shared_memory=pb.SharedMemoryRef(region="r", byte_size=16))
    with pytest.raises(FailedPrecondition, match="--shared-memory"):
        client.call("Infer", wire.Payload(pb.InferRequest(layer="any", x=ref)))


@pytest.fixture
def shm_server(start_server):
    return start_server("--shared-memory")


def test_tensors_in_shared_memory_match_bytes(shm_server, rng) -> None:
    x, dy = _batch(rng), _batch(rng)
    with NormClient(shm_server.target) as nc:
        layer = nc.create_layer("bn", "batch_norm", num_features=8)
        reference = NormClient(shm_server.target)
        with nc.create_shared_memory("io", 1 << 20) as region:
            assert [r.name for r in nc.list_shared_memory()] == ["io"]
            xs, dys, ys = region.array(x.shape), region.array(x.shape), region.array(x.shape)
            xs[...], dys[...] = x, dy
            y = layer.train(xs, out=ys, keep_forward=True)
            assert y is ys
            np.testing.assert_allclose(ys, nk.BatchNorm(8).forward(x), rtol=1e-6, atol=1e-6)
            xs[...] = 0  # the kept forward is the server's copy, not the region
            dx, dweight, _ = layer.gradient(None, dys, out=region.array(x.shape))
            ref_dx, ref_dw, _ = reference.layer("bn").gradient(x, dy)
            np.testing.assert_array_equal(dx, ref_dx)
            np.testing.assert_array_equal(dweight, ref_dw)
            xs[...] = x
            np.testing.assert_array_equal(layer.infer(xs), reference.layer("bn").infer(x))  # in by ref, out by bytes
            y16 = region.array(x.shape, np.float16)
            layer.infer(xs, out=y16)  # the output dtype is out's
            np.testing.assert_allclose(y16, reference.layer("bn").infer(x), rtol=2e-3, atol=2e-3)
        assert nc.list_shared_memory() == []
        reference.close()


def test_bad_shared_memory_references_are_refused_and_change_nothing(shm_server, rng) -> None:
    with NormClient(shm_server.target) as nc, nc.create_shared_memory("r", 4096) as region:
        nc.create_layer("bn", "batch_norm", num_features=4)
        region.array((16, 4))[...] = rng.normal(size=(16, 4))
        before = everything(pb_grpc.NormalizationStub(nc._channel))

        def train(ref: pb.SharedMemoryRef, shape=(16, 4), output: pb.SharedMemoryRef | None = None) -> None:
            x = pb.Tensor(dtype=pb.FLOAT32, shape=shape, shared_memory=ref)
            request = pb.TrainRequest(layer="bn", x=x)
            if output is not None:
                request.output_shared_memory.CopyFrom(output)
            nc.call("Train", wire.Payload(request))

        cases = [
            (pb.SharedMemoryRef(region="nope", byte_size=256), {}, "not registered"),
            (pb.SharedMemoryRef(region="r", offset=4000, byte_size=256), {}, "reaches beyond region 'r'"),
            (pb.SharedMemoryRef(region="r", offset=2**64 - 8, byte_size=256), {}, "reaches beyond"),
            (pb.SharedMemoryRef(region="r", byte_size=128), {}, "shared_memory has 128 bytes"),
            (
                pb.SharedMemoryRef(region="r", byte_size=256),
                {"output": pb.SharedMemoryRef(region="r", offset=3950, byte_size=256)},
                "reaches beyond",
            ),
            (
                pb.SharedMemoryRef(region="r", byte_size=256),
                {"output": pb.SharedMemoryRef(region="r", offset=256, byte_size=100)},
                "cannot hold the output",
            ),
        ]
        for ref, extra, match in cases:
            with pytest.raises(InvalidArgument, match=match):
                train(ref, **extra)
        assert everything(pb_grpc.NormalizationStub(nc._channel)) == before
        with pytest.raises(ValueError, match="out must be an array in a shared-memory region"):
            nc.layer("bn").infer(np.ones((4, 4), np.float32), out=np.empty((4, 4), np.float32))


def test_region_registration_rules(shm_server) -> None:
    with NormClient(shm_server.target) as nc:
        external = shared_memory.SharedMemory(create=True, size=8192)
        try:
            info = nc.register_shared_memory("ext", external.name, 4096, offset=4096)
            assert (info.key, info.offset, info.byte_size) == (external.name, 4096, 4096)
            nc.register_shared_memory("ext", external.name, 4096, offset=4096)  # the same again: fine
            from normserve.client import AlreadyExists

            with pytest.raises(AlreadyExists):
                nc.register_shared_memory("ext", external.name, 1024)
            for key, size, offset, match in [
                ("no_such_object_here", 16, 0, "no shared-memory object"),
                ("../etc/passwd", 16, 0, "not a POSIX shared-memory name"),
                (external.name, 8192, 1, "beyond the end"),
                (external.name, 0, 0, "byte_size must be > 0"),
            ]:
                with pytest.raises(InvalidArgument, match=match):
                    nc.register_shared_memory("other", key, size, offset=offset)
            assert [r.name for r in nc.unregister_shared_memory("ext")] == ["ext"]
            with pytest.raises(NotFound):
                nc.unregister_shared_memory("ext")
            assert nc.list_shared_memory() == []
        finally:
            external.close()
            external.unlink()


def test_server_shutdown_and_client_close_clean_up(start_server, rng) -> None:
    proc = start_server("--shared-memory")
    nc = NormClient(proc.target)
    region = nc.create_shared_memory("r", 1 << 16)
    key = region.key
    assert (Path("/dev/shm") / key.lstrip("/")).exists()
    nc.close()  # unregisters and unlinks the regions it created
    assert not (Path("/dev/shm") / key.lstrip("/")).exists()
    with NormClient(proc.target) as other:
        assert other.list_shared_memory() == []
        other.create_shared_memory("kept", 4096)
        assert proc.stop() == 0  # a registered region does not hold up shutdown


def test_the_async_client_streams_and_keeps_forwards(server, layer_name, rng) -> None:
    import asyncio

    from normserve.client import AsyncNormClient

    x, dy = _batch(rng), _batch(rng)

    async def scenario() -> None:
        async with AsyncNormClient(server.target, stream_threshold=1, chunk_bytes=999) as nc:
            layer = await nc.create_layer(layer_name, "rms_norm", normalized_shape=32)
            y = await layer.train(x, keep_forward=True)
            np.testing.assert_allclose(y, nk.RMSNorm(32).forward(x), rtol=1e-6, atol=1e-6)
            kept = await layer.gradient(None, dy)
            sent = await layer.gradient(x, dy)
            np.testing.assert_array_equal(kept[0], sent[0])
            np.testing.assert_array_equal(kept[1], sent[1])

    asyncio.run(scenario())
