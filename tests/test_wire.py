"""normserve.v1.wire: the zero-copy encoding is protobuf's wire format, both ways, and streams reassemble."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb


def _payload(x: np.ndarray, **fields) -> wire.Payload:
    header, data = codec.outgoing(x)
    return wire.Payload(pb.GradientRequest(x=header, dy=header, **fields), {"x": data, "dy": data[::-1].copy()})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_what_wire_writes_protobuf_reads(rng, dtype) -> None:
    x = rng.normal(size=(3, 4, 5)).astype(dtype)
    payload = _payload(x, layer="enc.bn1", training=False, output_dtype=pb.FLOAT16)
    parsed = pb.GradientRequest.FromString(wire.serialize(payload))
    assert parsed.layer == "enc.bn1"
    assert parsed.HasField("training")
    assert not parsed.training
    assert parsed.output_dtype == pb.FLOAT16
    np.testing.assert_array_equal(codec.decode(parsed.x), x)
    np.testing.assert_array_equal(codec.decode(parsed.dy), payload.data["dy"])
    assert payload.ByteSize() == len(wire.serialize(payload))


def test_what_protobuf_writes_wire_reads_without_copying(rng) -> None:
    x = rng.normal(size=(6, 7)).astype(np.float32)
    buf = pb.GradientRequest(layer="a", x=codec.encode(x), dy=codec.encode(-x), training=True).SerializeToString()
    payload = wire.parse(pb.GradientRequest, buf)
    assert (payload.layer, payload.training, payload.wire_size) == ("a", True, len(buf))
    assert payload.x.data == b""  # the elements stay outside the message
    assert list(payload.x.shape) == [6, 7]
    got = codec.decode(payload.x, data=payload.data["x"])
    np.testing.assert_array_equal(got, x)
    assert not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(buf, np.uint8))  # a view of the received bytes
    np.testing.assert_array_equal(codec.decode(payload.dy, data=payload.data["dy"]), -x)


def test_a_tensor_split_over_occurrences_merges_as_protobuf_says(rng) -> None:
    x = rng.normal(size=(2, 3)).astype(np.float32)
    first = pb.InferRequest(layer="a", x=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3])).SerializeToString()
    second = pb.InferRequest(x=pb.Tensor(data=x.tobytes())).SerializeToString()
    payload = wire.parse(pb.InferRequest, first + second)
    reference = pb.InferRequest.FromString(first + second)
    assert list(payload.x.shape) == list(reference.x.shape) == [2, 3]
    assert bytes(payload.data["x"]) == reference.x.data


def test_unknown_fields_and_empty_tensors_survive(rng) -> None:
    buf = pb.InferRequest(layer="a", x=pb.Tensor(dtype=pb.FLOAT32, shape=[0, 4], data=b"")).SerializeToString()
    unknown = bytes([0xF8, 0x06, 0x07])  # field 111, varint 7
    payload = wire.parse(pb.InferRequest, buf + unknown)
    assert codec.decode(payload.x, data=payload.data.get("x")).shape == (0, 4)
    assert pb.InferRequest.FromString(payload.message.SerializeToString() + unknown).layer == "a"


@pytest.mark.parametrize(
    ("buf", "match"),
    [
        (b"\x12\x05\x08\x01", "truncated"),  # x claims 5 bytes, 2 follow
        (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint"),
        (b"\x0b", "wire type"),  # a group: not proto3
    ],
)
def test_malformed_bytes_are_refused(buf, match) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.parse(pb.InferRequest, buf)


def test_both_members_of_a_oneof_are_refused(rng) -> None:
    x = rng.normal(size=(2, 2)).astype(np.float32)
    both = (
        pb.GradientRequest(x=codec.encode(x)).SerializeToString()
        + pb.GradientRequest(forward_id="f").SerializeToString()
    )
    with pytest.raises(wire.WireError, match="x and forward_id"):
        wire.parse(pb.GradientRequest, both)
    ref = pb.Tensor(dtype=pb.FLOAT32, shape=[1], shared_memory=pb.SharedMemoryRef(region="r", byte_size=4))
    data_and_ref = (
        pb.InferRequest(x=ref).SerializeToString() + pb.InferRequest(x=pb.Tensor(data=b"1234")).SerializeToString()
    )
    with pytest.raises(wire.WireError, match="both data and shared_memory"):
        wire.parse(pb.InferRequest, data_and_ref)


def _round_trip(payload: wire.Payload, chunk_bytes: int, head_type) -> wire.Payload:
    """Split into stream messages, serialize each, parse each back, reassemble."""
    assembly = wire.Assembly(lambda tensor, name: codec.check(tensor, name)[2])
    for part in wire.split(payload, chunk_bytes):
        assembly.take(wire.parse_part(head_type, wire.serialize_part(part)))
    return assembly.result()


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_streams_reassemble_at_any_chunk_size(rng, chunk_bytes) -> None:
    x = rng.normal(size=(5, 3)).astype(np.float32)
    payload = _payload(x, layer="g", training=True)
    got = _round_trip(payload, chunk_bytes, pb.GradientRequest)
    assert (got.layer, got.training) == ("g", True)
    for name in ("x", "dy"):
        np.testing.assert_array_equal(codec.decode(getattr(got, name), data=got.data[name]), payload.data[name])


def test_small_tensors_may_stay_in_the_stream_head(rng) -> None:
    dx = rng.normal(size=(4, 3)).astype(np.float32)
    weight = rng.normal(size=3).astype(np.float32)
    header, data = codec.outgoing(dx)
    payload = wire.Payload(pb.GradientResponse(dx=header, dweight=codec.encode(weight), version=3), {"dx": data})
    got = _round_trip(payload, 5, pb.GradientResponse)
    np.testing.assert_array_equal(codec.decode(got.dx, data=got.data["dx"]), dx)
    np.testing.assert_array_equal(codec.decode(got.dweight, data=got.data["dweight"]), weight)
    assert got.version == 3


def test_stream_protocol_errors() -> None:
    header = pb.Tensor(dtype=pb.FLOAT32, shape=[2])
    head = wire.parse_part(pb.InferRequest, wire.serialize_part(wire.Payload(pb.InferRequest(layer="a", x=header))))
    sizes = lambda tensor, name: codec.check(tensor, name)[2]  # noqa: E731
    with pytest.raises(wire.WireError, match="starts with a chunk"):
        wire.Assembly(sizes).take(wire.Chunk(b"1234"))
    assembly = wire.Assembly(sizes)
    assembly.take(head)
    with pytest.raises(wire.WireError, match="second head"):
        assembly.take(head)
    assembly.take(wire.Chunk(b"1234"))
    with pytest.raises(wire.WireError, match="ended after 4 of the 8 bytes"):
        assembly.result()
    with pytest.raises(wire.WireError, match="more than the 8 bytes"):
        assembly.take(wire.Chunk(b"123456789"))
    with pytest.raises(wire.WireError, match="empty"):
        wire.Assembly(sizes).result()
    assert wire.Chunk(b"abc").ByteSize() == len(wire.serialize_part(wire.Chunk(b"abc")))
