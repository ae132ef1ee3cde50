"""Property-based fuzzing of every RPC of the real server, unary and streamed.

Valid requests of every method (Normalization's, in both forms, plus health
and reflection) are mutated at the byte level (bits flipped, bytes inserted,
deleted, replaced, truncated, spliced, stream parts dropped or repeated) and
at the field level (random values, extremes included, in random fields of
the decoded message), then sent as raw bytes. Each answer must be a status a
client can cause (never UNKNOWN or INTERNAL); a call that fails must leave
every layer byte for byte as it was; and the server must stay up, answer its
health check, and end within a bound of memory. The examples are
derandomized, so a failure reproduces; ``NORMSERVE_FUZZ_EXAMPLES`` runs more.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverproc import ServerProcess, everything, patience, wait_for

from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("NORMSERVE_FUZZ_EXAMPLES", "1200"))
#: The POSIX shared-memory object the fuzzed server may read and write (region "r").
SHM_KEY = f"normserve-fuzz-{os.getpid()}"
SHM_BYTES = 4096
SERVICE = "/normserve.v1.Normalization/"
#: What a client can cause. UNKNOWN and INTERNAL are server bugs; UNAVAILABLE a dead server.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
RNG = np.random.default_rng(20261130)
BASE = {  # the layers every example runs against (config, a training input's shape); recreated when deleted
    "f.bn": (pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3), (4, 3)),
    "f.in": (pb.LayerConfig(kind=pb.INSTANCE_NORM, num_features=3, track_running_stats=True, affine=True), (2, 3, 5)),
    "f.gn": (pb.LayerConfig(kind=pb.GROUP_NORM, num_features=4, num_groups=2), (2, 4, 3)),
    "f.ln": (pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[4]), (3, 4)),
    "f.rms": (pb.LayerConfig(kind=pb.RMS_NORM, normalized_shape=[2, 2]), (3, 2, 2)),
}


def tensor(*shape: int, dtype=np.float32) -> pb.Tensor:
    return codec.encode(RNG.normal(size=shape).astype(dtype))


def statistics(count: int, groups: int) -> pb.BatchStatistics:
    """A batch's statistics: ``count`` values behind each of ``groups`` means and m2."""
    return pb.BatchStatistics(count=count, mean=RNG.normal(size=groups), m2=RNG.uniform(0.5, 2, groups) * count)


@dataclass(frozen=True)
class Seed:
    """A valid call: its method path and message (unary), or its stream parts."""

    path: str
    message: Message | None = None
    parts: tuple[bytes, ...] = ()

    @property
    def streamed(self) -> bool:
        return bool(self.parts)


def _stream(method: str, head: Message, *tensors: tuple[str, np.ndarray]) -> Seed:
    """A streamed call: the head names the tensors, their elements follow in two chunks."""
    data = b"".join(array.tobytes() for _, array in tensors)
    for name, array in tensors:
        getattr(head, name).CopyFrom(pb.Tensor(dtype=codec.dtype_enum(array.dtype), shape=array.shape))
    half = len(data) // 2
    parts = (
        wire.serialize_part(wire.Payload(head)),
        wire.serialize_part(wire.Chunk(data[:half])),
        wire.serialize_part(wire.Chunk(data[half:])),
    )
    return Seed(SERVICE + method + "Stream", parts=parts)


def seeds() -> list[Seed]:
    bn_x, ln_x = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(3, 4)).astype(np.float32)
    sync = pb.SyncGroup(id="fuzz", world_size=1, rank=0, step=1)
    in_shm = pb.Tensor(dtype=pb.FLOAT32, shape=[4, 3], shared_memory=pb.SharedMemoryRef(region="r", byte_size=48))
    out_shm = pb.SharedMemoryRef(region="r", offset=2048, byte_size=48)
    unary = {
        "CreateLayer": [pb.CreateLayerRequest(name="f.new", config=BASE["f.gn"][0])],
        "GetLayer": [pb.GetLayerRequest(name="f.bn")],
        "ListLayers": [pb.ListLayersRequest(prefix="f.")],
        "DeleteLayer": [pb.DeleteLayerRequest(name="f.new")],
        "Train": [
            pb.TrainRequest(layer="f.bn", x=tensor(4, 3), keep_forward=True, return_running_stats=True),
            pb.TrainRequest(layer="f.in", x=tensor(2, 3, 5), parameters={"weight": tensor(3)}),
            pb.TrainRequest(layer="f.bn", x=tensor(4, 3), sync=sync, output_dtype=pb.FLOAT16),
            pb.TrainRequest(layer="f.rms", x=tensor(3, 2, 2, dtype=np.float16)),
        ],
        "Infer": [
            pb.InferRequest(layer="f.gn", x=tensor(2, 4, 3), output_dtype=pb.BFLOAT16),
            pb.InferRequest(layer="f.ln", x=tensor(5, 4, dtype=np.float64)),
            pb.InferRequest(layer="f.bn", x=in_shm, output_shared_memory=out_shm),
        ],
        "Gradient": [
            pb.GradientRequest(layer="f.bn", x=tensor(4, 3), dy=tensor(4, 3)),
            pb.GradientRequest(layer="f.ln", x=tensor(3, 4), dy=tensor(3, 4), training=False),
            pb.GradientRequest(layer="f.bn", forward_id="0" * 32, dy=tensor(4, 3), sync=sync),
            pb.GradientRequest(layer="f.bn", x=in_shm, dy=tensor(4, 3), output_shared_memory=out_shm),
        ],
        "TrainStatistics": [
            pb.TrainStatisticsRequest(layer="f.bn", statistics=statistics(8, 3), parameters={"bias": tensor(3)}),
            pb.TrainStatisticsRequest(layer="f.bn", statistics=statistics(4, 3), sync=sync),
            pb.TrainStatisticsRequest(layer="f.in", statistics=statistics(5, 6)),
        ],
        "GradientStatistics": [
            pb.GradientStatisticsRequest(
                layer="f.bn", count=4, sum_dy=RNG.normal(size=3), sum_dy_xmu=RNG.normal(size=3), sync=sync
            ),
        ],
        "GetState": [pb.GetStateRequest(name="f.in"), pb.GetStateRequest(name="f.bn", version=1)],
        "SetState": [
            pb.SetStateRequest(name="f.bn", tensors={"running_var": tensor(3)}, partial=True, expected_version=2),
            pb.SetStateRequest(name="f.ln", tensors={"weight": tensor(4), "bias": tensor(4)}),
        ],
        "Rollback": [pb.RollbackRequest(name="f.bn", version=1), pb.RollbackRequest(name="f.ln", version=2)],
        "RegisterSharedMemory": [pb.RegisterSharedMemoryRequest(name="r2", key=SHM_KEY, offset=64, byte_size=64)],
        "UnregisterSharedMemory": [pb.UnregisterSharedMemoryRequest(name="r2")],
        "ListSharedMemory": [pb.ListSharedMemoryRequest()],
    }
    found = [Seed(SERVICE + method, message) for method, messages in unary.items() for message in messages]
    found += [
        Seed("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(service="normserve.v1.Normalization")),
        Seed(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            parts=(reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),),
        ),
        _stream("Train", pb.TrainRequest(layer="f.bn", keep_forward=True), ("x", bn_x)),
        _stream("Infer", pb.InferRequest(layer="f.ln"), ("x", ln_x)),
        _stream("Gradient", pb.GradientRequest(layer="f.bn"), ("x", bn_x), ("dy", -bn_x)),
    ]
    pushed = [
        pb.StatisticsUpdate(
            layer="f.bn", step=7, count=8, mean=tensor(3, dtype=np.float64), m2=codec.encode(RNG.uniform(1, 2, 3))
        ),
        pb.StatisticsUpdate(
            layer="f.in",
            count=5,
            mean=tensor(6, dtype=np.float64),
            m2=codec.encode(RNG.uniform(1, 2, 6)),
            parameters={"weight": tensor(3)},
        ),
    ]
    found.append(
        Seed(
            SERVICE + "PushStatistics",
            parts=(pb.PushStatisticsRequest(sequence=1, updates=pushed).SerializeToString(),),
        )
    )
    every_rpc = {m.name for m in pb.DESCRIPTOR.services_by_name["Normalization"].methods}
    assert every_rpc <= {s.path.rpartition("/")[2] for s in found}, "a new RPC needs a seed here"
    return found


SEEDS = seeds()


# ---------------------------------------------------------------------- mutations
@st.composite
def byte_mutation(draw: st.DrawFn, buf: bytes) -> bytes:
    """``buf`` with a few byte-level edits."""
    buf = bytearray(buf)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(0, len(buf))))
        edit = draw(st.sampled_from(("flip", "insert", "delete", "replace", "truncate", "splice", "varint")))
        if edit == "flip" and buf:
            where = min(where, len(buf) - 1)
            buf[where] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            buf[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del buf[where : where + draw(st.integers(1, 8))]
        elif edit == "replace" and buf:
            where = min(where, len(buf) - 1)
            buf[where] = draw(st.integers(0, 255))
        elif edit == "truncate":
            del buf[where:]
        elif edit == "splice" and buf:
            start = draw(st.integers(0, len(buf) - 1))
            buf[where:where] = buf[start : start + draw(st.integers(1, 32))]
        elif edit == "varint":  # a field key or length as large as varints go
            buf[where:where] = draw(st.sampled_from((b"\xff" * 9 + b"\x01", b"\x80" * 10, b"\x12\xff\xff\xff\xff\x0f")))
    return bytes(buf)


_INTS = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.CPPTYPE_ENUM: (-(2**31), 2**31 - 1),
}


def _scalar(draw: st.DrawFn, field: FieldDescriptor):
    kind = field.cpp_type
    if kind in _INTS:
        low, high = _INTS[kind]
        edges = [v for v in (low, high, -1, 0, 1, 2, 3, 4, 2**26, 2**31, 2**32, 2**62) if low <= v <= high]
        return draw(st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(0, 70)))
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return draw(st.booleans())
    if kind in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return draw(st.one_of(st.floats(allow_nan=True), st.sampled_from((0.0, -1.0, 1e-300, 1e300))))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return draw(st.one_of(st.binary(max_size=96), st.just(b"\0" * 48)))
    return draw(  # strings: names, keys, ids
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(("f.bn", "f.ln", "f.gn", "f.in", "f.rms", "weight", "bias", "running_var", "x" * 300)),
            st.just("a\n\x1b[31mb\t" * 20),
        )
    )


def _mutate_field(draw: st.DrawFn, message: Message, depth: int = 0) -> None:
    if not message.DESCRIPTOR.fields:
        return  # a message without fields: only bytes can be wrong (byte_mutation)
    field = draw(st.sampled_from(tuple(message.DESCRIPTOR.fields)))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        target = getattr(message, field.name)
        if field.message_type.GetOptions().map_entry:
            key = _scalar(draw, field.message_type.fields_by_name["key"])
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = target[key]
                if depth < 3:
                    _mutate_field(draw, inner, depth + 1)
            else:
                target[key] = _scalar(draw, value_field)
        elif field.is_repeated:
            inner = target.add()
            if depth < 3:
                _mutate_field(draw, inner, depth + 1)
        elif draw(st.booleans()) and depth < 3:
            _mutate_field(draw, target, depth + 1)
        else:
            message.ClearField(field.name)
    elif field.is_repeated:
        values = getattr(message, field.name)
        if draw(st.booleans()):
            del values[:]
        values.extend(_scalar(draw, field) for _ in range(draw(st.integers(0, 6))))
    else:
        setattr(message, field.name, _scalar(draw, field))


@st.composite
def field_mutation(draw: st.DrawFn, message: Message) -> bytes:
    mutated = type(message)()
    mutated.CopyFrom(message)
    for _ in range(draw(st.integers(1, 3))):
        _mutate_field(draw, mutated)
    return mutated.SerializeToString()


@st.composite
def mutated_call(draw: st.DrawFn, level: str) -> tuple[Seed, list[bytes]]:
    seed = draw(st.sampled_from(SEEDS))
    if not seed.streamed:
        base = seed.message.SerializeToString()
        payload = draw(byte_mutation(base)) if level == "bytes" else draw(field_mutation(seed.message))
        return seed, [payload]
    parts = list(seed.parts)
    if level == "bytes":
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = draw(byte_mutation(parts[index]))
    else:  # the stream's structure: a part dropped, repeated, or moved
        edit = draw(st.sampled_from(("drop", "repeat", "swap", "head-fields")))
        index = draw(st.integers(0, len(parts) - 1))
        if edit == "drop":
            del parts[index]
        elif edit == "repeat":
            parts.insert(index, parts[index])
        elif edit == "swap" and len(parts) > 1:
            parts[0], parts[-1] = parts[-1], parts[0]
        elif edit == "head-fields" and seed.path.startswith(SERVICE) and seed.path.endswith("Stream"):
            head_type = {"Train": pb.TrainRequest, "Infer": pb.InferRequest, "Gradient": pb.GradientRequest}[
                seed.path[len(SERVICE) : -len("Stream")]
            ]
            head = wire.parse_part(head_type, parts[0]).message
            parts[0] = wire.serialize_part(wire.Payload(type(head).FromString(draw(field_mutation(head)))))
    return seed, parts


# ---------------------------------------------------------------------- the server under attack
def _rss(proc: ServerProcess) -> int:
    for line in Path(f"/proc/{proc.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Target:
    """The fuzzed server, its layers, and what every layer held after the last call."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.channel = grpc.insecure_channel(proc.target)
        self.stub = pb_grpc.NormalizationStub(self.channel)
        self.state: list[bytes] = []
        self.calls = 0
        self.reset()
        self.rss = _rss(proc)

    def reset(self) -> None:
        """The base layers and region present (a fuzzed call may have removed one), nothing else, and their
        state read."""
        regions = self.stub.ListSharedMemory(pb.ListSharedMemoryRequest()).regions
        if [region.name for region in regions] != ["r"]:
            self.stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest())
            self.stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(name="r", key=SHM_KEY, byte_size=SHM_BYTES))
        present = {layer.name for layer in self.stub.ListLayers(pb.ListLayersRequest()).layers}
        for name in present - set(BASE):
            self.stub.DeleteLayer(pb.DeleteLayerRequest(name=name))
        for name, (config, shape) in BASE.items():
            if name not in present:
                self.stub.CreateLayer(pb.CreateLayerRequest(name=name, config=config))
                self.stub.Train(pb.TrainRequest(layer=name, x=tensor(*shape)))
        self.state = everything(self.stub)

    def send(self, seed: Seed, parts: list[bytes]) -> tuple[grpc.StatusCode, bool]:
        """The call's status, and whether it may have changed state (a PushStatistics answer whose every
        outcome is a refusal may not: a refused update changes nothing)."""
        self.calls += 1
        answers: list[bytes] = []
        code = grpc.StatusCode.OK
        try:
            if seed.streamed:
                for answer in self.channel.stream_stream(seed.path)(iter(parts), timeout=patience(1)):
                    answers.append(answer)
            else:
                self.channel.unary_unary(seed.path)(parts[0], timeout=patience(1))
        except grpc.RpcError as error:
            code = error.code()
        if seed.path.endswith("/PushStatistics"):  # each message answered before a failure may have stored
            outcomes = [o for answer in answers for o in pb.PushStatisticsResponse.FromString(answer).outcomes]
            assert all(o.code in {c.value[0] for c in ALLOWED} for o in outcomes), outcomes
            stored = any(o.code == 0 for o in outcomes)
        else:
            stored = code == grpc.StatusCode.OK
        # A deadline the client gave up on may end a write the server goes on with (a write that holds its
        # locks runs to the end): on a loaded machine it lands after the answer.
        return code, stored or code == grpc.StatusCode.DEADLINE_EXCEEDED

    def check(self, seed: Seed, parts: list[bytes]) -> None:
        code, changing = self.send(seed, parts)
        assert self.proc.process.poll() is None, f"the server died on {seed.path} {parts!r}:\n{self.proc.log()[-3000:]}"
        assert code in ALLOWED, f"{seed.path} answered {code.name} for {parts!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            time.sleep(patience(1))  # what the server went on with has ended before the reset reads the state
        if not changing:
            assert everything(self.stub) == self.state, f"a failed {seed.path} ({code.name}) changed state: {parts!r}"
        else:
            self.reset()
        if self.calls % 100 == 0:
            health = health_pb2.HealthCheckResponse.FromString(
                self.channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=patience(0.2))
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    shm = shared_memory.SharedMemory(SHM_KEY, create=True, size=SHM_BYTES)
    np.ndarray((SHM_BYTES // 4,), np.float32, shm.buf)[...] = RNG.normal(size=SHM_BYTES // 4)
    proc = ServerProcess(
        tmp_path_factory.mktemp("fuzz") / "state",
        "--shared-memory",
        "--sync-timeout",
        "0.5",
        "--max-layer-state-bytes",
        str(1 << 20),
        "--max-state-bytes",
        str(16 << 20),
        "--max-layers",
        "100",
    ).start()
    fuzzed = Target(proc)
    yield fuzzed
    fuzzed.channel.close()
    shm.close()
    shm.unlink()
    code = proc.stop()  # first: a failing check below must not leave the server running
    assert "Traceback" not in proc.log(), proc.log()[-5000:]
    assert code == 0, proc.log()[-3000:]


_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@_SETTINGS
@given(call=mutated_call("bytes"))
def test_byte_mutations_of_every_rpc(target, call) -> None:
    target.check(*call)


@_SETTINGS
@given(call=mutated_call("fields"))
def test_field_mutations_of_every_rpc(target, call) -> None:
    target.check(*call)


def test_the_fuzzed_server_is_whole_afterwards(target) -> None:
    """Runs after the fuzzing (file order): every base layer serves, and memory came back down."""
    assert wait_for(lambda: _rss(target.proc) - target.rss < 150 << 20, patience(0.05)), _rss(target.proc) - target.rss
    for name in BASE:
        target.stub.GetState(pb.GetStateRequest(name=name))
    target.stub.Infer(pb.InferRequest(layer="f.ln", x=tensor(2, 4)))
