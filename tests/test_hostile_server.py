"""The Python clients against a hostile (or broken) server: a fake gRPC server in the test process that lies
about sizes, shapes, dtypes and enums, or stalls (issue 25, finding 8). Whatever it answers, the client raises
a NormServeError subclass, with memory bounded by what its own request asked for, never by the lie.

This is the one place a fake server stands in for the real one: the real server does not lie.
"""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from serverproc import patience

from normserve.client import (
    AsyncNormClient,
    DeadlineExceeded,
    InvalidArgument,
    MalformedAnswer,
    NormClient,
    RetryPolicy,
)
from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb

SERVICE = "/normserve.v1.Normalization/"
MiB = 1 << 20
#: What a lying answer may cost the client, at most (its honest answers here are a few hundred bytes).
MEMORY_BOUND = 16 * MiB
LAYER = pb.Layer(
    name="bn",
    config=pb.LayerConfig(kind=pb.BATCH_NORM, num_features=4, param_dtype=pb.FLOAT32, device="cpu"),
    version=1,
    param_shape=[4],
    state_keys=["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
)
#: An answer: bytes for a unary method, or a list of stream messages (bytes), or a coroutine to stall in.
Answer = Callable[[], Any]


class FakeServer:
    """A grpc.aio server on a thread of its own whose every method answers what ``answers[method]`` makes
    (raw bytes: nothing is checked), and counts the calls it got."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {SERVICE + "GetLayer": LAYER.SerializeToString}
        self.calls: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(patience(3)), "the fake server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(patience(3))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(patience(3))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, fake: FakeServer) -> None:
        self._fake = fake

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        fake, method = self._fake, details.method

        async def unary(request: bytes, context: Any) -> bytes:
            fake.calls[method] = fake.calls.get(method, 0) + 1
            answer = fake.answers[method]()
            return await answer if asyncio.iscoroutine(answer) else answer

        async def stream(requests: Any, context: Any) -> Any:
            fake.calls[method] = fake.calls.get(method, 0) + 1
            async for _ in requests:
                pass
            for part in fake.answers[method]():
                yield await part if asyncio.iscoroutine(part) else part

        async def answering_each(requests: Any, context: Any) -> Any:  # PushStatistics: an answer per message
            fake.calls[method] = fake.calls.get(method, 0) + 1
            async for request in requests:
                answer = fake.answers[method](pb.PushStatisticsRequest.FromString(request))
                yield await answer if asyncio.iscoroutine(answer) else answer

        if method.endswith("PushStatistics"):
            return grpc.stream_stream_rpc_method_handler(answering_each)
        if method.endswith("Stream"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture(scope="module")
def fake() -> FakeServer:
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def nc(fake):
    fake.answers = {SERVICE + "GetLayer": LAYER.SerializeToString}
    fake.calls.clear()
    with NormClient(
        fake.target, timeout=patience(0.2), retry=RetryPolicy(attempts=1), stream_threshold=64 << 10
    ) as client:
        yield client


def _answer(message: Any, data: dict[str, Any] | None = None) -> Callable[[], bytes]:
    return lambda: wire.serialize(wire.Payload(message, data or {}))


def _streamed(head: Any, chunks: int, chunk: bytes = b"\0" * MiB) -> Callable[[], list[Any]]:
    """A streamed answer: ``head`` (its tensors without data), then ``chunks`` chunks (one message, sent
    again and again: the fake server runs in this process, and its own memory is traced too)."""
    part = wire.serialize_part(wire.Chunk(chunk))
    return lambda: [wire.serialize_part(head), *[part] * chunks]


async def _stall() -> bytes:
    await asyncio.sleep(patience(3))  # far past the client's deadline
    return b""


def _y(shape, dtype=pb.FLOAT32, data: bytes | None = None) -> pb.Tensor:
    tensor = pb.Tensor(dtype=dtype, shape=shape)
    if data is not None:
        tensor.data = data
    return tensor


def _within_memory(call: Callable[[], Any]) -> BaseException:
    """What ``call`` raised, after checking the client allocated less than MEMORY_BOUND doing it."""
    tracemalloc.start()
    try:
        call()
    except BaseException as error:
        raised = error
    else:
        raise AssertionError("the client accepted the answer")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"the client allocated {peak / MiB:.0f} MiB for one lying answer"
    return raised


X = np.random.default_rng(25).normal(size=(8, 4)).astype(np.float32)
BIG_X = np.random.default_rng(26).normal(size=(64, 1024)).astype(np.float32)  # 256 KiB: the call streams
INFER, INFER_STREAM, GRADIENT = SERVICE + "Infer", SERVICE + "InferStream", SERVICE + "Gradient"
GOOD_Y = _y([8, 4], data=X.tobytes())
LIES = {
    # unary answers whose output is not what was asked for
    "y-of-another-shape": (INFER, _answer(pb.InferResponse(y=_y([8, 5], data=b"\0" * 160))), X),
    "y-in-another-dtype": (INFER, _answer(pb.InferResponse(y=_y([8, 4], pb.FLOAT64, b"\0" * 256))), X),
    "y-of-an-unknown-dtype": (INFER, _answer(pb.InferResponse(y=_y([8, 4], 99, b"\0" * 128))), X),
    "y-shorter-than-its-shape": (INFER, _answer(pb.InferResponse(y=_y([8, 4], data=b"\0" * 10))), X),
    "y-missing": (INFER, _answer(pb.InferResponse(version=2)), X),
    "y-in-shared-memory-never-given": (
        INFER,
        _answer(pb.InferResponse(y=pb.Tensor(dtype=pb.FLOAT32, shape=[8, 4], shared_memory=pb.SharedMemoryRef()))),
        X,
    ),
    "y-with-a-negative-dimension": (INFER, _answer(pb.InferResponse(y=_y([-8, -4], data=b""))), X),
    # streamed answers whose head declares more than was asked for: 8 GiB, 4 TiB, a dweight of 1 GiB
    "stream-head-of-8-GiB": (INFER_STREAM, _streamed(pb.InferResponse(y=_y([2**31, 1])), 64), BIG_X),
    "stream-head-of-4-TiB": (INFER_STREAM, _streamed(pb.InferResponse(y=_y([2**40, 1])), 64), BIG_X),
    "stream-of-more-than-its-head": (INFER_STREAM, _streamed(pb.InferResponse(y=_y([64, 1024])), 2), BIG_X),
    "stream-that-ends-early": (INFER_STREAM, _streamed(pb.InferResponse(y=_y([64, 1024])), 0, b""), BIG_X),
    "stream-of-garbage": (INFER_STREAM, lambda: [b"\x0a\xff\xff\xff\xff\x0f"], BIG_X),
    "stream-of-two-heads": (
        INFER_STREAM,
        lambda: [wire.serialize_part(pb.InferResponse(y=_y([64, 1024])))] * 2,
        BIG_X,
    ),
    "garbage-bytes": (INFER, lambda: b"\xff\xff\xff", X),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_forward_answer_is_a_normserve_error_within_bounded_memory(fake, nc, lie) -> None:
    method, answer, x = LIES[lie]
    fake.answers[method] = answer
    layer = nc.layer("bn")
    error = _within_memory(lambda: layer.infer(x))
    assert isinstance(error, MalformedAnswer), repr(error)
    assert fake.calls[method] == 1


@pytest.mark.parametrize(
    ("lie", "answer"),
    [
        ("dweight-of-another-shape", pb.GradientResponse(dx=GOOD_Y, dweight=codec.encode(np.zeros(5, np.float32)))),
        ("dbias-in-another-dtype", pb.GradientResponse(dx=GOOD_Y, dbias=codec.encode(np.zeros(4, np.float64)))),
        ("dx-shaped-unlike-dy", pb.GradientResponse(dx=_y([4, 8], data=X.tobytes()))),
    ],
)
def test_gradients_unlike_the_parameters_or_the_input_are_refused(fake, nc, lie, answer) -> None:
    fake.answers[GRADIENT] = _answer(answer)
    with pytest.raises(MalformedAnswer):
        nc.layer("bn").gradient(X, X)


def test_a_streamed_gradient_that_streams_its_dweight_is_refused_before_allocating(fake, nc) -> None:
    head = pb.GradientResponse(dx=_y([64, 1024]), dweight=_y([2**30]))  # a dweight of 4 GiB, "in chunks"
    fake.answers[SERVICE + "GradientStream"] = _streamed(head, 16)
    error = _within_memory(lambda: nc.layer("bn").gradient(BIG_X, BIG_X))
    assert isinstance(error, MalformedAnswer), repr(error)


def test_state_and_running_statistics_unlike_the_layer_are_refused(fake, nc) -> None:
    wrong = codec.encode(np.zeros(7, np.float32))
    fake.answers[SERVICE + "GetState"] = _answer(pb.LayerState(name="bn", version=1, tensors={"weight": wrong}))
    fake.answers[SERVICE + "Train"] = _answer(
        pb.TrainResponse(y=GOOD_Y, version=2, running_stats={"running_var": wrong})
    )
    layer = nc.layer("bn")
    with pytest.raises(MalformedAnswer):
        layer.state_dict()
    with pytest.raises(MalformedAnswer):
        layer.train(X, return_running_stats=True)


def test_an_unknown_health_status_is_a_normserve_error(fake, nc) -> None:
    """A health status of 99 raised ValueError."""
    fake.answers["/grpc.health.v1.Health/Check"] = lambda: b"\x08\x63"  # status = 99
    with pytest.raises(MalformedAnswer, match="99"):
        nc.health()


def test_pages_that_never_end_are_refused(fake, nc) -> None:
    looping = pb.ListLayersResponse(layers=[LAYER], next_page_token="bn")
    fake.answers[SERVICE + "ListLayers"] = looping.SerializeToString
    with pytest.raises(MalformedAnswer, match="never end"):
        nc.list_layers()
    assert fake.calls[SERVICE + "ListLayers"] == 2


def test_a_server_that_stalls_is_a_deadline_exceeded(fake, nc) -> None:
    fake.answers[INFER] = _stall
    fake.answers[INFER_STREAM] = lambda: [wire.serialize_part(pb.InferResponse(y=_y([64, 1024]))), _stall()]
    layer = nc.layer("bn")
    for x in (X, BIG_X):  # unary, and a stream that stalls after its head
        error = _within_memory(lambda x=x: layer.infer(x, timeout=1))
        assert isinstance(error, DeadlineExceeded), repr(error)


@pytest.mark.parametrize("name", ["bad\nname", "x" * 257, "", "naïve"])
def test_a_layer_name_that_cannot_be_a_header_is_refused_before_it_is_sent(fake, nc, name) -> None:
    """A name with a newline failed inside gRPC: INTERNAL "Illegal header value"."""
    for call in (lambda: nc.layer(name), lambda: nc.create_layer(name, "batch_norm", num_features=4)):
        with pytest.raises(InvalidArgument, match="not a valid layer name"):
            call()
    assert not fake.calls


def test_the_asyncio_client_refuses_lies_alike(fake) -> None:
    fake.answers[INFER] = LIES["y-of-another-shape"][1]
    fake.answers[INFER_STREAM] = LIES["stream-head-of-8-GiB"][1]
    fake.answers["/grpc.health.v1.Health/Check"] = lambda: b"\x08\x63"

    async def main() -> None:
        async with AsyncNormClient(fake.target, timeout=patience(0.5), stream_threshold=64 << 10) as client:
            layer = await client.layer("bn")
            for x in (X, BIG_X):
                with pytest.raises(MalformedAnswer):
                    await layer.infer(x)
            with pytest.raises(MalformedAnswer):
                await client.health()
            with pytest.raises(InvalidArgument):
                await client.layer("bad\nname")

    asyncio.run(main())


def _outcomes(*outcomes: pb.StatisticsOutcome, sequence_offset: int = 0) -> Callable[[Any], bytes]:
    """A PushStatistics answer of ``outcomes`` to each message (its sequence moved by ``sequence_offset``)."""

    def answer(request: pb.PushStatisticsRequest) -> bytes:
        return pb.PushStatisticsResponse(
            sequence=request.sequence + sequence_offset, outcomes=outcomes
        ).SerializeToString()

    return answer


_RUNNING = {"running_mean": codec.encode(np.zeros(4, np.float32)), "running_var": codec.encode(np.ones(4, np.float32))}
PUSH_LIES = {
    "another-message's-number": _outcomes(pb.StatisticsOutcome(**_RUNNING), sequence_offset=1),
    "more-outcomes-than-updates": _outcomes(pb.StatisticsOutcome(**_RUNNING), pb.StatisticsOutcome(**_RUNNING)),
    "no-outcome": _outcomes(),
    "running-statistics-unlike-the-layer": _outcomes(
        pb.StatisticsOutcome(running_mean=codec.encode(np.zeros(9, np.float32)), running_var=_RUNNING["running_var"])
    ),
    "running-statistics-missing": _outcomes(pb.StatisticsOutcome()),
    "garbage": lambda request: b"\x0a\xff\xff\xff\xff\x0f",
}


@pytest.mark.parametrize("lie", list(PUSH_LIES))
def test_a_lying_answer_to_statistics_updates_is_raised_naming_their_steps(fake, nc, lie) -> None:
    import torch

    from normserve.client.torch import RemoteBatchNorm1d

    fake.answers[SERVICE + "CreateLayer"] = LAYER.SerializeToString
    fake.answers[SERVICE + "PushStatistics"] = PUSH_LIES[lie]
    bn = RemoteBatchNorm1d(4, client=nc, name="bn", mode="statistics")
    bn(torch.as_tensor(X)).sum().backward()
    with pytest.raises(MalformedAnswer) as raised:
        bn.state_dict()
    assert raised.value.steps == (0,)


def test_a_server_that_never_answers_statistics_updates_is_a_deadline_exceeded(fake, nc) -> None:
    import torch

    from normserve.client.torch import RemoteBatchNorm1d

    fake.answers[SERVICE + "CreateLayer"] = LAYER.SerializeToString
    fake.answers[SERVICE + "PushStatistics"] = lambda request: _stall()
    bn = RemoteBatchNorm1d(4, client=nc, name="bn", mode="statistics")
    bn(torch.as_tensor(X)).sum().backward()  # the step itself never waits
    with pytest.raises(DeadlineExceeded, match="still in flight"):
        bn.state_dict()
    with pytest.raises(DeadlineExceeded, match="still in flight"):
        nc.close()  # says so too, and closes
