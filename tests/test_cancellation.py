"""A storm of calls that end early, against the real server: hundreds of unary and streamed calls,
cancelled or timed out at random points (while the request is sent, while the server works, while the
answer is written and read). The server must stay up, every acknowledged write must be there (after a
kill -9 too), and no write may be half applied."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from serverproc import ServerProcess, everything, patience, wait_for

from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

SERVICE = "/normserve.v1.Normalization/"
CHANNELS = 8
CALLS = 400


def _rss(proc: ServerProcess) -> int:
    for line in Path(f"/proc/{proc.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _payload(message, **tensors: np.ndarray) -> wire.Payload:
    data = {}
    for name, array in tensors.items():
        header, data[name] = codec.outgoing(array)
        getattr(message, name).CopyFrom(header)
    return wire.Payload(message, data)


class Storm:
    """Random calls that end early, and what was acknowledged."""

    def __init__(self, target: str, seed: int) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.NormalizationStub(self.channel)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.trains_acked = self.trains_sent = 0
        self.values_sent: set[float] = set()
        self.values_acked: list[float] = []

    def _stream(self, method: str, payload: wire.Payload, slow: bool):
        def parts():
            for part in wire.split(payload, 256 << 10):
                if slow:
                    time.sleep(0.002)
                yield part

        call = self.channel.stream_stream(
            SERVICE + method + "Stream", request_serializer=wire.serialize_part, response_deserializer=bytes
        )
        return call(parts(), timeout=self.rng.uniform(0.005, 0.5))

    def _end_early(self, call, streamed: bool = False) -> bool:
        """Let ``call`` run a random while, maybe cancel it or read only part of it; True if it succeeded."""
        how = self.rng.choice(("cancel", "partial", "wait"))
        try:
            if how == "cancel":
                time.sleep(self.rng.uniform(0, 0.05))
                call.cancel()
            if how == "partial" and streamed:
                next(call)
                time.sleep(self.rng.uniform(0, 0.05))
                call.cancel()
            if streamed:
                for _ in call:
                    pass
                return call.code() == grpc.StatusCode.OK
            call.result()
            return True
        except (grpc.RpcError, grpc.FutureCancelledError, StopIteration):
            return False

    def one(self, i: int) -> None:
        rng = self.rng
        kind = rng.choice(("train", "train-stream", "set", "infer-stream", "gradient", "gradient-stream"))
        big = np.random.default_rng(i).normal(size=(64, CHANNELS, 2048)).astype(np.float32)  # 4 MiB
        small = big[:4, :, :16].copy()
        timeout = rng.uniform(0.001, 0.3)
        if kind.startswith("train"):
            with self.lock:
                self.trains_sent += 1
            if kind == "train":
                call = self.stub.Train.future(pb.TrainRequest(layer="s.train", x=codec.encode(small)), timeout=timeout)
            else:
                call = self._stream("Train", _payload(pb.TrainRequest(layer="s.train"), x=big), rng.random() < 0.3)
            if self._end_early(call, streamed=kind != "train"):
                with self.lock:
                    self.trains_acked += 1
        elif kind == "set":
            value = float(i) + 0.5
            with self.lock:
                self.values_sent.add(value)
            mean = np.full(CHANNELS, value, np.float32)
            request = pb.SetStateRequest(
                name="s.set",
                partial=True,
                tensors={"running_mean": codec.encode(mean), "running_var": codec.encode(mean + 1)},
            )
            if self._end_early(self.stub.SetState.future(request, timeout=timeout)):
                with self.lock:
                    self.values_acked.append(value)
        elif kind == "gradient":
            request = pb.GradientRequest(layer="s.read", x=codec.encode(small), dy=codec.encode(-small))
            self._end_early(self.stub.Gradient.future(request, timeout=timeout))
        else:
            method = "Infer" if kind == "infer-stream" else "Gradient"
            message = pb.InferRequest(layer="s.read") if method == "Infer" else pb.GradientRequest(layer="s.read")
            tensors = {"x": big} if method == "Infer" else {"x": big, "dy": -big}
            self._end_early(self._stream(method, _payload(message, **tensors), rng.random() < 0.3), streamed=True)


def test_a_storm_of_calls_that_end_early_leaves_the_server_whole(start_server) -> None:
    proc = start_server("--default-deadline", "2")
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        for name in ("s.train", "s.set", "s.read"):
            stub.CreateLayer(
                pb.CreateLayerRequest(name=name, config=pb.LayerConfig(kind=pb.BATCH_NORM, num_features=CHANNELS))
            )
        before = _rss(proc)

        storm = Storm(proc.target, seed=20261130)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(storm.one, range(CALLS)))
        storm.channel.close()

        assert proc.process.poll() is None, proc.log()[-3000:]
        assert "Traceback" not in proc.log(), proc.log()[-5000:]
        trained = stub.GetLayer(pb.GetLayerRequest(name="s.train"))
        # Every committed Train added one batch and one version: none half applied, none lost.
        assert trained.version == 1 + trained.num_batches_tracked
        assert storm.trains_acked <= trained.num_batches_tracked <= storm.trains_sent
        assert storm.trains_acked > 10  # the storm let some through
        state = stub.GetState(pb.GetStateRequest(name="s.set"))
        mean, var = (codec.decode(state.tensors[key]) for key in ("running_mean", "running_var"))
        if storm.values_acked:
            assert np.all(mean == mean[0])  # one write's values, whole
            assert float(mean[0]) in storm.values_sent
            np.testing.assert_array_equal(var, mean + 1)  # both tensors from that same write
            assert state.version - 1 >= len(storm.values_acked)
        assert stub.Infer(pb.InferRequest(layer="s.read", x=codec.encode(np.ones((2, CHANNELS), np.float32))))
        assert wait_for(lambda: _rss(proc) - before < 300 << 20, patience(0.1), 0.2), (
            "memory of ended calls outlived them"
        )
        acknowledged = everything(stub)
    proc.kill()  # acknowledged writes survive a crash, and nothing half written appears
    proc.start()
    with grpc.insecure_channel(proc.target) as channel:
        assert everything(pb_grpc.NormalizationStub(channel)) == acknowledged
    assert proc.stop() == 0
