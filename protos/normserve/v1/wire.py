"""Protobuf wire format for messages that carry tensors, without copying the tensors.

protobuf's Python runtime copies a ``bytes`` field when it is set, again
when it is read, and again when the message is serialized; for a 16 MB
tensor that is most of a call's cost. This module writes and reads the very
same wire format (any protobuf parser reads what it writes, and it reads
what any protobuf writer produces) but moves tensor elements as buffers:

* :func:`serialize` joins the small fields, serialized by protobuf, with
  each tensor's header and its elements in one ``bytes.join``: one copy.
  Every field is written once (a tensor is one occurrence, header and
  elements), so parsers that keep only the last occurrence of a field,
  such as protobuf.js, read it whole.
* :func:`parse` scans the top-level fields, hands everything but the tensor
  elements to protobuf (small), and returns the elements as memoryviews of
  the received bytes: no copy.

A :class:`Payload` is a message plus the elements of its ``Tensor`` fields.
The streaming RPCs' messages (a head, then :class:`Chunk` parts) are handled
the same way by :func:`serialize_part` and :func:`parse_part`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from normserve.v1 import normalization_pb2 as pb

__all__ = [
    "Assembly",
    "Chunk",
    "Method",
    "Payload",
    "WireError",
    "methods",
    "nbytes",
    "parse",
    "parse_part",
    "parser",
    "serialize",
    "serialize_part",
    "serializer",
    "split",
    "streamed_fields",
]

_LEN = 2  # wire type of length-delimited fields
#: Fields one message level may hold. Ours have a few dozen at most; scanning is Python work per field,
#: so a message of millions of tiny (unknown) fields is refused rather than walked.
MAX_FIELDS = 4096
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_CHUNK_DATA_FIELD = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


class WireError(DecodeError):
    """Bytes that are not a valid message of the expected type."""


class Payload:
    """A message whose ``Tensor`` fields keep their elements outside it.

    ``message`` has each tensor's dtype, shape (and shared-memory reference)
    but empty ``data``; ``data`` maps a tensor field's name to its elements
    (any C-contiguous buffer: bytes, memoryview, NumPy array). Attribute
    reads fall through to ``message``, so a Payload reads like the message.
    """

    __slots__ = ("_encoded", "data", "message", "wire_size")

    def __init__(self, message: Message, data: dict[str, Any] | None = None, wire_size: int | None = None) -> None:
        self.message = message
        self.data = data or {}
        self.wire_size = wire_size
        self._encoded: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def encoded(self) -> bytes:
        """The serialized message (built once; :func:`serialize` returns the same bytes)."""
        if self._encoded is None:
            self._encoded = _join(self.message, self.data)
            self.wire_size = len(self._encoded)
        return self._encoded

    def ByteSize(self) -> int:  # noqa: N802 -- protobuf's name, so a Payload sizes like a message
        return self.wire_size if self.wire_size is not None else len(self.encoded())


class Chunk:
    """One piece of a stream's tensor elements (the TensorChunk part of a stream message)."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def ByteSize(self) -> int:  # noqa: N802 -- sized like a message by the call metrics
        size = nbytes(self.data)
        inner = len(_chunk_prefix(size)) + size
        return len(_tag(_CHUNK_FIELD, _LEN)) + len(_varint(inner)) + inner


def nbytes(data: Any) -> int:
    """Length in bytes of a buffer (NumPy arrays of dtypes the buffer protocol cannot name included)."""
    return data.nbytes if isinstance(data, np.ndarray) else memoryview(data).nbytes


def _flat_bytes(data: Any) -> Any:
    """``data`` as a one-dimensional sequence of bytes that slices without copying."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


# ---------------------------------------------------------------------- varints
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


_DATA_TAG = _tag(_DATA_FIELD, _LEN)  # written in front of every tensor's elements: built once


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            break
    raise WireError("malformed varint")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, where the field's encoding starts, where its value starts, where it ends) of each field."""
    pos, count = start, 0
    while pos < end:
        count += 1
        if count > MAX_FIELDS:
            raise WireError(f"more than {MAX_FIELDS} fields in one message; this is not a request of this service")
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
            value_start = pos
        elif wire_type == 1:
            value_start, pos = pos, pos + 8
        elif wire_type == _LEN:
            length, value_start = _read_varint(buf, pos, end)
            pos = value_start + length
        elif wire_type == 5:
            value_start, pos = pos, pos + 4
        else:  # groups (3, 4) are not used by proto3 messages
            raise WireError(f"unsupported wire type {wire_type} in field {number}")
        if pos > end or number == 0:
            raise WireError("truncated or corrupt message")
        yield number, wire_type, field_start, value_start, pos


# ---------------------------------------------------------------------- tensors
def _tensor_fields(descriptor: Descriptor) -> dict[int, FieldDescriptor]:
    return {
        f.number: f
        for f in descriptor.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is pb.Tensor.DESCRIPTOR and not f.is_repeated
    }


_TENSOR_FIELDS: dict[Descriptor, dict[int, FieldDescriptor]] = {}


def tensor_fields(descriptor: Descriptor) -> dict[int, FieldDescriptor]:
    """The singular ``Tensor`` fields of a message type, by field number."""
    if descriptor not in _TENSOR_FIELDS:
        _TENSOR_FIELDS[descriptor] = _tensor_fields(descriptor)
    return _TENSOR_FIELDS[descriptor]


def _join(message: Message, data: dict[str, Any]) -> bytes:
    # Each tensor of ``data`` goes out as ONE occurrence of its field: header, then elements. protobuf
    # merges repeated occurrences of a message field, but protobuf.js (grpc-js) and other strict parsers
    # keep only the last, and would read a tensor split in two as dtype DTYPE_UNSPECIFIED, shape [].
    # So the small fields are serialized from a copy without those tensors (the copy holds no elements:
    # they are outside the message), and each tensor's header is written in front of its elements under
    # a length prefix counted up front: the elements are copied once, by the join, as before.
    if not data:  # a stream's head, an answer in shared memory: nothing to take out
        return message.SerializeToString()
    rest = type(message)()
    rest.CopyFrom(message)
    fields = message.DESCRIPTOR.fields_by_name
    parts: list[Any] = [b""]  # the small fields, once the tensors are cleared from them
    for name, elements in data.items():
        rest.ClearField(name)
        header = getattr(message, name).SerializeToString()
        size = nbytes(elements)
        data_prefix = _DATA_TAG + _varint(size)
        inner = len(header) + len(data_prefix) + size
        parts += [_tag(fields[name].number, _LEN), _varint(inner), header, data_prefix, elements]
    parts[0] = rest.SerializeToString()
    return b"".join(parts)


def serialize(message: Payload | Message) -> bytes:
    """The wire bytes of a message or :class:`Payload`."""
    return message.encoded() if isinstance(message, Payload) else message.SerializeToString()


def parse(message_type: type[Message], buf: bytes | memoryview) -> Payload:
    """Parse ``buf`` as ``message_type``; tensor elements become memoryviews of ``buf``."""
    tensors = tensor_fields(message_type.DESCRIPTOR)
    rest: list[Any] = []  # everything but the tensor elements, for protobuf to parse
    spans: dict[int, list[tuple[int, int]]] = {}
    view = memoryview(buf)
    for number, wire_type, field_start, value_start, end in _fields(buf, 0, len(buf)):
        if number in tensors and wire_type == _LEN:
            spans.setdefault(number, []).append((value_start, end))
        else:
            rest.append(view[field_start:end])
    try:
        message = message_type.FromString(b"".join(rest))
    except DecodeError as exc:
        raise WireError(f"not a valid {message_type.DESCRIPTOR.name}: {exc}") from None
    data = {}
    for number, occurrences in spans.items():
        field = tensors[number]
        oneof = field.containing_oneof
        if oneof is not None and message.WhichOneof(oneof.name) is not None:
            raise WireError(f"{field.name} and {message.WhichOneof(oneof.name)} are both set; send one of them")
        header: list[Any] = []
        elements = None
        for start, end in occurrences:  # other writers may split a tensor: occurrences merge, as in protobuf
            for inner, inner_type, inner_start, inner_value, inner_end in _fields(buf, start, end):
                if inner == _DATA_FIELD and inner_type == _LEN:
                    elements = view[inner_value:inner_end]
                else:
                    header.append(view[inner_start:inner_end])
        tensor = getattr(message, field.name)
        tensor.SetInParent()
        tensor.MergeFromString(b"".join(header))
        if elements is not None:
            if tensor.HasField("shared_memory"):
                raise WireError(f"{field.name} has both data and shared_memory; send one of them")
            data[field.name] = elements
    return Payload(message, data, len(buf))


# ---------------------------------------------------------------------- streams
_HEAD_FIELD = 1
_CHUNK_FIELD = 2


def serialize_part(part: Payload | Message | Chunk) -> bytes:
    """A stream message: its head (a message or Payload) or a :class:`Chunk` of elements."""
    if isinstance(part, Chunk):
        size = nbytes(part.data)
        inner = _chunk_prefix(size)
        return b"".join((_tag(_CHUNK_FIELD, _LEN), _varint(len(inner) + size), inner, part.data))
    head = serialize(part)
    return b"".join((_tag(_HEAD_FIELD, _LEN), _varint(len(head)), head))


def _chunk_prefix(nbytes: int) -> bytes:
    return _tag(_CHUNK_DATA_FIELD, _LEN) + _varint(nbytes)


def streamed_fields(head: Payload) -> list[str]:
    """The tensors of a received stream head whose elements follow in chunks, in field order:
    every set tensor that carries neither its data nor a shared-memory reference."""
    return [
        field.name
        for _, field in sorted(tensor_fields(head.message.DESCRIPTOR).items())
        if head.message.HasField(field.name)
        and field.name not in head.data
        and not getattr(head.message, field.name).HasField("shared_memory")
    ]


def split(payload: Payload, chunk_bytes: int) -> Iterator[Payload | Chunk]:
    """A Payload as stream parts: the head (the message: small tensors' data stays in it), then the
    elements of the tensors held outside it, in field order, in chunks."""
    yield Payload(payload.message)
    fields = payload.message.DESCRIPTOR.fields_by_name
    for name in sorted(payload.data, key=lambda name: fields[name].number):
        elements = _flat_bytes(payload.data[name])
        for start in range(0, len(elements), chunk_bytes):
            yield Chunk(elements[start : start + chunk_bytes])


class Assembly:
    """Gathers one stream's parts (a head, then chunks) into one Payload.

    ``size_of(tensor, name)`` gives the byte length of each streamed tensor
    of the head (and raises for one over the receiver's limits), so a bad
    head is refused before any chunk is taken. The chunks fill the tensors in
    field order, at any chunk boundaries.
    """

    def __init__(self, size_of: Callable[[Any, str], int]) -> None:
        self._size_of = size_of
        self._head: Payload | None = None
        self._buffers: list[tuple[str, np.ndarray]] = []
        self._expected = self._received = 0

    @property
    def head(self) -> Payload | None:
        """The stream's head, once taken."""
        return self._head

    def take(self, part: Payload | Chunk) -> None:
        if isinstance(part, Payload):
            if self._head is not None:
                raise WireError("the stream carries a second head; one stream is one call")
            names = streamed_fields(part)
            self._buffers = [(n, np.empty(self._size_of(getattr(part.message, n), n), np.uint8)) for n in names]
            self._expected = sum(len(buffer) for _, buffer in self._buffers)
            self._head = part
        elif self._head is None:
            raise WireError("the stream starts with a chunk; send the head (the request) first")
        elif not nbytes(part.data):
            raise WireError("an empty chunk: every chunk carries at least one byte of the head's tensors")
        else:
            self._add(_flat_bytes(part.data))

    def _add(self, chunk: Any) -> None:
        if self._received + len(chunk) > self._expected:
            raise WireError(
                f"the stream sends more than the {self._expected} bytes its head's tensors hold; "
                "send exactly product(shape) * itemsize bytes per tensor"
            )
        position = self._received
        self._received += len(chunk)
        for _, buffer in self._buffers:  # a chunk may span the end of one tensor and the start of the next
            if position >= len(buffer):
                position -= len(buffer)
                continue
            taken = min(len(buffer) - position, len(chunk))
            buffer[position : position + taken] = chunk[:taken]
            chunk, position = chunk[taken:], 0
            if not len(chunk):
                break

    def result(self) -> Payload:
        if self._head is None:
            raise WireError("the stream is empty; send the head (the request), then the tensors' chunks")
        if self._received != self._expected:
            raise WireError(
                f"the stream ended after {self._received} of the {self._expected} bytes its head's tensors hold"
            )
        return Payload(self._head.message, {**self._head.data, **dict(self._buffers)}, self._head.wire_size)


def parse_part(head_type: type[Message], buf: bytes) -> Payload | Chunk:
    """A stream message: its head as a Payload, or a Chunk viewing ``buf``."""
    part: Payload | Chunk | None = None
    for number, wire_type, _, value_start, end in _fields(buf, 0, len(buf)):
        if wire_type != _LEN or number not in (_HEAD_FIELD, _CHUNK_FIELD):
            continue  # unknown fields are skipped, as protobuf does
        if number == _HEAD_FIELD:
            part = parse(head_type, memoryview(buf)[value_start:end])
        else:
            elements = memoryview(b"")
            for inner, inner_type, _, inner_value, inner_end in _fields(buf, value_start, end):
                if inner == _CHUNK_DATA_FIELD and inner_type == _LEN:
                    elements = memoryview(buf)[inner_value:inner_end]
            part = Chunk(elements)
    if part is None:
        raise WireError(f"a {head_type.DESCRIPTOR.name} stream message with neither head nor chunk")
    return part


# ---------------------------------------------------------------------- codecs for a method
class Method(NamedTuple):
    name: str
    path: str  # "/normserve.v1.Normalization/Train"
    streaming: bool  # both ways (the service has no half-streaming methods)
    request_type: type[Message]
    response_type: type[Message]


def methods(service: ServiceDescriptor) -> list[Method]:
    """Every method of ``service`` with its message classes (for handlers and client callables)."""
    return [
        Method(
            m.name,
            f"/{service.full_name}/{m.name}",
            m.client_streaming,
            _message_class(m.input_type),
            _message_class(m.output_type),
        )
        for m in service.methods
    ]


def _is_stream_part(descriptor: Descriptor) -> bool:
    return "part" in descriptor.oneofs_by_name and "chunk" in descriptor.fields_by_name


def serializer(message_type: type[Message]) -> Callable[[Any], bytes]:
    """How to write ``message_type`` (a request or response type of the service)."""
    if _is_stream_part(message_type.DESCRIPTOR):
        return serialize_part
    return serialize if tensor_fields(message_type.DESCRIPTOR) else message_type.SerializeToString


def parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    """How to read ``message_type``: zero-copy for messages with tensors, protobuf's parser otherwise."""
    descriptor = message_type.DESCRIPTOR
    if _is_stream_part(descriptor):
        head_type = _message_class(descriptor.fields_by_name["head"].message_type)
        return lambda buf: parse_part(head_type, buf)
    if tensor_fields(descriptor):
        return lambda buf: parse(message_type, buf)
    return message_type.FromString


def _message_class(descriptor: Descriptor) -> type[Message]:
    return getattr(pb, descriptor.name)
