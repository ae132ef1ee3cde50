"""Every message our encoder writes holds each non-repeated field once (client requests and server answers,
unary and streamed, at every depth): parsers that keep only a field's last occurrence, such as protobuf.js
in grpc-js, then read what protobuf's merging parsers read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from normserve.client import NormClient, SyncGroup
from normserve.client.torch import RemoteBatchNorm1d
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import wire

SERVICE = pb.DESCRIPTOR.services_by_name["Normalization"]
_LEN = 2  # wire type of length-delimited fields (messages among them)


def repeated_occurrences(
    descriptor: Descriptor, buf: bytes, seen: set[str], start: int = 0, end: int | None = None, path: str = ""
) -> list[str]:
    """Where ``buf`` (a ``descriptor`` message) writes a non-repeated field or a oneof more than once, or a
    field its descriptor lacks, as paths such as ``head.y``, at any depth. Adds the path of every field met
    to ``seen``. A wire walk driven by the descriptors, blind to how the bytes were made."""
    found: list[str] = []
    written: set[str] = set()
    for number, wire_type, _, value_start, value_end in wire._fields(buf, start, len(buf) if end is None else end):
        field = descriptor.fields_by_number.get(number)
        if field is None:
            found.append(f"{path}{number} (not a field of {descriptor.name})")
            continue
        where = path + field.name
        seen.add(where)
        if not field.is_repeated:
            # The members of a oneof overwrite each other as occurrences of one field do.
            once = field.containing_oneof.name if field.containing_oneof is not None else field.name
            if once in written:
                found.append(where)
            written.add(once)
        if field.type == FieldDescriptor.TYPE_MESSAGE and wire_type == _LEN:
            found += repeated_occurrences(field.message_type, buf, seen, value_start, value_end, where + ".")
    return found


def _walk(message_type: type[Message], buf: bytes) -> list[str]:
    return repeated_occurrences(message_type.DESCRIPTOR, buf, set())


def test_the_walk_finds_fields_written_twice_at_any_depth() -> None:
    header = pb.InferRequest(layer="a", x=pb.Tensor(dtype=pb.FLOAT32, shape=[2])).SerializeToString()
    elements = pb.InferRequest(x=pb.Tensor(data=bytes(8))).SerializeToString()
    assert _walk(pb.InferRequest, header) == []
    assert _walk(pb.InferRequest, header + elements) == ["x"]  # a tensor as header, then elements
    answer = pb.InferResponse(y=pb.Tensor(dtype=pb.FLOAT32)).SerializeToString()
    answer += pb.InferResponse(y=pb.Tensor(shape=[1])).SerializeToString()
    stream_head = bytes([1 << 3 | _LEN, len(answer)]) + answer  # InferStreamResponse.head, written by hand
    assert _walk(pb.InferStreamResponse, stream_head) == ["head.y"]
    both = pb.GradientRequest(forward_id="f").SerializeToString()
    both += pb.GradientRequest(x=pb.Tensor(dtype=pb.FLOAT32)).SerializeToString()
    assert _walk(pb.GradientRequest, both) == ["x"]  # two members of the oneof "forward"
    assert _walk(pb.InferRequest, header + b"\xf8\x06\x07") == ["111 (not a field of InferRequest)"]


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[tuple[type[Message], bytes]]:
    """(type, bytes) of every Normalization message the clients made from here on send or receive: what our
    encoder writes as requests, and what the server's encoder wrote as answers."""
    messages: list[tuple[type[Message], bytes]] = []
    serializer, parser = wire.serializer, wire.parser

    def recording_serializer(message_type: type[Message]) -> Callable[[Any], bytes]:
        serialize = serializer(message_type)

        def record(message: Any) -> bytes:
            buf = serialize(message)
            messages.append((message_type, buf))
            return buf

        return record

    def recording_parser(message_type: type[Message]) -> Callable[[bytes], Any]:
        parse = parser(message_type)

        def record(buf: bytes) -> Any:
            messages.append((message_type, bytes(buf)))
            return parse(buf)

        return record

    monkeypatch.setattr(wire, "serializer", recording_serializer)
    monkeypatch.setattr(wire, "parser", recording_parser)
    return messages


def test_every_message_of_every_rpc_writes_each_field_once(start_server, written, rng) -> None:
    server = start_server("--shared-memory")
    x = rng.normal(size=(6, 4, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    with (
        NormClient(server.target) as nc,
        NormClient(server.target, stream_threshold=1, chunk_bytes=100) as streaming,  # several chunks per tensor
    ):
        layer = nc.create_layer("bn", "batch_norm", num_features=4)
        layer.train(
            x,
            keep_forward=True,
            parameters={"weight": rng.normal(size=4).astype(np.float32)},
            sync=SyncGroup("job", world_size=1, rank=0),
            return_running_stats=True,
        )
        layer.gradient(None, dy)  # by forward_id
        layer.gradient(x, dy, training=False, wire_dtype="float16")
        step = SyncGroup("job", world_size=1, rank=0).at(1)
        layer.train_statistics(30, x.mean(axis=(0, 2)), x.var(axis=(0, 2)) * 30, sync=step)
        layer.gradient_statistics(30, dy.sum(axis=(0, 2)), (dy * x).sum(axis=(0, 2)), sync=step)
        layer.infer(x)
        layer.load_state_dict(layer.state_dict())
        layer.state_dict(version=2)
        layer.rollback(2)
        nc.layer("bn").refresh()
        nc.list_layers()
        statistics_mode = RemoteBatchNorm1d(4, client=nc, name="stats", mode="statistics")
        statistics_mode(torch.as_tensor(x[:, :, 0])).sum().backward()  # a PushStatistics message, and its answer
        statistics_mode.settle_updates()
        streamed = streaming.layer("bn")
        streamed.train(x, keep_forward=True)
        streamed.infer(x)
        streamed.gradient(x, dy)
        with nc.create_shared_memory("io", 1 << 16) as region:
            inputs, outputs = region.array(x.shape), region.array(x.shape)
            inputs[...] = x
            layer.infer(inputs, out=outputs)
            layer.gradient(inputs, dy)
            nc.list_shared_memory()
        nc.delete_layer("bn")

    every_type = {t for m in wire.methods(SERVICE) for t in (m.request_type, m.response_type)}
    assert {message_type for message_type, _ in written} == every_type  # every RPC, both ways
    seen: set[str] = set()
    for message_type, buf in written:
        assert repeated_occurrences(message_type.DESCRIPTOR, buf, seen) == [], message_type.__name__
    # Tensors went everywhere they can: in a unary message (header and data in one occurrence), as a
    # stream's head and chunks, small ones inside a head, in maps, and by shared-memory reference.
    assert {
        "x.data",
        "dy.data",
        "y.data",
        "dx.data",
        "dweight.data",
        "head.x.shape",
        "head.y.dtype",
        "head.dweight.data",
        "chunk.data",
        "parameters.value.data",
        "running_stats.value.data",
        "tensors.value.data",
        "x.shared_memory",
        "y.shared_memory",
    } <= seen
