"""Malformed requests sent with the generated stubs: each gets its status code and a message
a person can act on, and no layer's state changes (byte for byte)."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from serverproc import everything, patience

import normkernels as nk
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
RNG = np.random.default_rng(20261123)
X = RNG.normal(size=(2, 4)).astype(np.float32)  # fits bad.bn (C=4)


def t(array) -> pb.Tensor:
    return codec.encode(np.asarray(array, dtype=np.float32))


def raw(dtype: int = pb.FLOAT32, shape=(2, 4), nbytes: int = 32) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=b"\x00" * nbytes)


def with_value(value: float) -> np.ndarray:
    x = X.copy()
    x[1, 2] = value
    return x


def bn_config(**fields) -> pb.LayerConfig:
    return pb.LayerConfig(kind=pb.BATCH_NORM, **{"num_features": 4, **fields})


def state(**tensors) -> dict[str, pb.Tensor]:
    return {key: t(value) for key, value in tensors.items()}


CORPUS = [
    # --- tensors
    ("byte-length", "Train", pb.TrainRequest(layer="bad.bn", x=raw(nbytes=31)), INVALID, "31 bytes.*needs 32"),
    ("dtype-unset", "Train", pb.TrainRequest(layer="bad.bn", x=raw(dtype=0)), INVALID, "dtype is not set"),
    ("dtype-unknown", "Infer", pb.InferRequest(layer="bad.bn", x=raw(dtype=99)), INVALID, "not a known DType"),
    ("shape-negative", "Train", pb.TrainRequest(layer="bad.bn", x=raw(shape=(2, -4))), INVALID, "negative"),
    ("shape-overflow", "Train", pb.TrainRequest(layer="bad.bn", x=raw(shape=(2**62, 2**62))), INVALID, "int64"),
    (
        "too-many-elements",
        "Infer",
        pb.InferRequest(layer="bad.bn", x=raw(shape=(2**40, 4), nbytes=0)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit",
    ),
    ("rank-too-deep", "Infer", pb.InferRequest(layer="bad.bn", x=raw(shape=(1,) * 40, nbytes=4)), INVALID, "dim"),
    ("empty", "Train", pb.TrainRequest(layer="bad.bn", x=raw(shape=(0, 4), nbytes=0)), INVALID, "no elements"),
    ("missing-x", "Train", pb.TrainRequest(layer="bad.bn"), INVALID, "x is required"),
    ("output-dtype", "Infer", pb.InferRequest(layer="bad.bn", x=t(X), output_dtype=17), INVALID, "output_dtype"),
    # --- shapes against the layer
    ("wrong-channels", "Train", pb.TrainRequest(layer="bad.bn", x=t(np.ones((2, 5)))), INVALID, "4 channels"),
    ("rank-too-low", "Train", pb.TrainRequest(layer="bad.bn", x=t(np.ones(4))), INVALID, "rank >= 2"),
    ("trailing-dims", "Infer", pb.InferRequest(layer="bad.ln", x=t(np.ones((2, 4, 3)))), INVALID, "trailing"),
    ("one-value", "Train", pb.TrainRequest(layer="bad.bn", x=t(np.ones((1, 4)))), INVALID, "more than 1 value"),
    ("group-one-value", "Train", pb.TrainRequest(layer="bad.gn", x=t(np.ones((1, 2)))), INVALID, "more than 1"),
    ("nan", "Train", pb.TrainRequest(layer="bad.bn", x=t(with_value(np.nan))), INVALID, "NaN or Inf"),
    ("inf", "Train", pb.TrainRequest(layer="bad.bn", x=t(with_value(np.inf))), INVALID, "NaN or Inf"),
    ("nan-stateless", "Train", pb.TrainRequest(layer="bad.ln", x=t(np.full((2, 3, 4), np.nan))), INVALID, "NaN"),
    (
        "dy-shape",
        "Gradient",
        pb.GradientRequest(layer="bad.bn", x=t(X), dy=t(np.ones((3, 4)))),
        INVALID,
        "dy has shape",
    ),
    ("dy-missing", "Gradient", pb.GradientRequest(layer="bad.bn", x=t(X)), INVALID, "dy is required"),
    # --- parameters carried by Train
    (
        "parameters-unknown-key",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), parameters=state(running_mean=np.zeros(4))),
        INVALID,
        "weight and bias only",
    ),
    (
        "parameters-missing-bias",
        "Train",
        pb.TrainRequest(layer="bad.rms", x=t(np.ones((2, 4))), parameters=state(bias=np.zeros(4))),
        INVALID,
        "weight and bias only",
    ),
    (
        "parameters-shape",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), parameters=state(weight=np.ones(5))),
        INVALID,
        r"shape \(5,\)",
    ),
    (
        "parameters-nan",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), parameters=state(bias=[0.0, np.nan, 0.0, 0.0])),
        INVALID,
        "NaN",
    ),
    (
        "parameters-dtype",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), parameters={"weight": raw(dtype=0, shape=(4,), nbytes=16)}),
        INVALID,
        "dtype is not set",
    ),
    # --- synchronized steps
    (
        "sync-rank",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), sync=pb.SyncGroup(id="g", world_size=2, rank=5)),
        INVALID,
        "sync.rank 5",
    ),
    (
        "sync-world",
        "Gradient",
        pb.GradientRequest(layer="bad.bn", x=t(X), dy=t(X), sync=pb.SyncGroup(id="g")),
        INVALID,
        "world_size must be at least 1",
    ),
    (
        "sync-id",
        "Train",
        pb.TrainRequest(layer="bad.bn", x=t(X), sync=pb.SyncGroup(id="", world_size=1)),
        INVALID,
        "sync.id",
    ),
    (
        "sync-kind",
        "Train",
        pb.TrainRequest(layer="bad.ln", x=t(np.ones((2, 3, 4))), sync=pb.SyncGroup(id="g", world_size=1)),
        INVALID,
        "only batch norm",
    ),
    (
        "sync-eval-gradient",
        "Gradient",
        pb.GradientRequest(layer="bad.bn", x=t(X), dy=t(X), training=False, sync=pb.SyncGroup(id="g", world_size=1)),
        INVALID,
        "training-mode gradients only",
    ),
    # --- names
    ("name-chars", "CreateLayer", pb.CreateLayerRequest(name="bad name!", config=bn_config()), INVALID, "valid"),
    ("name-long", "CreateLayer", pb.CreateLayerRequest(name="a" * 257, config=bn_config()), INVALID, "length 257"),
    ("name-empty", "Train", pb.TrainRequest(layer="", x=t(X)), INVALID, "not a valid layer name"),
    ("unknown-layer", "Train", pb.TrainRequest(layer="bad.none", x=t(X)), grpc.StatusCode.NOT_FOUND, "no layer"),
    ("unknown-get", "GetState", pb.GetStateRequest(name="bad.none"), grpc.StatusCode.NOT_FOUND, "no layer"),
    # --- configs
    ("no-config", "CreateLayer", pb.CreateLayerRequest(name="bad.new"), INVALID, "config is required"),
    (
        "kind-unset",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=pb.LayerConfig(num_features=3)),
        INVALID,
        "kind",
    ),
    (
        "zero-features",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(num_features=0)),
        INVALID,
        "num_features is required",
    ),
    (
        "negative-features",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(num_features=-3)),
        INVALID,
        "positive integer",
    ),
    (
        "negative-eps",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(eps=-1e-5)),
        INVALID,
        "eps must be",
    ),
    (
        "momentum-above-1",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(momentum=1.5)),
        INVALID,
        r"momentum must be in \[0, 1\]",
    ),
    (
        "momentum-and-cumulative",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(momentum=0.5, cumulative_average=True)),
        INVALID,
        "pick one",
    ),
    (
        "groups-not-dividing",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=pb.LayerConfig(kind=pb.GROUP_NORM, num_groups=3, num_features=4)),
        INVALID,
        "must divide",
    ),
    (
        "field-of-other-kind",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(normalized_shape=[4])),
        INVALID,
        "do not apply to batch_norm",
    ),
    (
        "param-dtype",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(param_dtype=pb.FLOAT16)),
        INVALID,
        "param_dtype",
    ),
    (
        "device-unknown",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.new", config=bn_config(device="tpu")),
        INVALID,
        "unknown device",
    ),
    (
        "conflicting-create",
        "CreateLayer",
        pb.CreateLayerRequest(name="bad.bn", config=bn_config(num_features=5)),
        grpc.StatusCode.ALREADY_EXISTS,
        "different config",
    ),
    # --- state
    (
        "state-unknown-key",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(gamma=np.ones(4)), partial=True),
        INVALID,
        "unknown state key",
    ),
    (
        "state-missing-keys",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(weight=np.ones(4))),
        INVALID,
        "missing state key",
    ),
    (
        "state-shape",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(running_mean=np.zeros(5)), partial=True),
        INVALID,
        r"shape \(5,\)",
    ),
    (
        "state-negative-var",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(running_var=[1.0, -1.0, 1.0, 1.0]), partial=True),
        INVALID,
        "negative",
    ),
    (
        "state-nan",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(weight=[1.0, np.nan, 1.0, 1.0]), partial=True),
        INVALID,
        "NaN",
    ),
    (
        "state-negative-count",
        "SetState",
        pb.SetStateRequest(name="bad.bn", num_batches_tracked=-1, partial=True),
        INVALID,
        ">= 0",
    ),
    (
        "state-count-without-stats",
        "SetState",
        pb.SetStateRequest(name="bad.ln", num_batches_tracked=3, partial=True),
        INVALID,
        "unknown state key",
    ),
    ("state-empty", "SetState", pb.SetStateRequest(name="bad.bn", partial=True), INVALID, "nothing to set"),
    (
        "stale-version",
        "SetState",
        pb.SetStateRequest(name="bad.bn", tensors=state(bias=np.zeros(4)), partial=True, expected_version=1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not the expected 1",
    ),
]
if nk.cuda_device_count() == 0:
    CORPUS.append(
        (
            "cuda-missing",
            "CreateLayer",
            pb.CreateLayerRequest(name="bad.new", config=bn_config(device="cuda")),
            INVALID,
            "CuPy|not available",
        )
    )


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        for name, config in (
            ("bad.bn", bn_config()),
            ("bad.ln", pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[3, 4])),
            ("bad.gn", pb.LayerConfig(kind=pb.GROUP_NORM, num_groups=2, num_features=2)),
            ("bad.rms", pb.LayerConfig(kind=pb.RMS_NORM, normalized_shape=[4])),
        ):
            stub.CreateLayer(pb.CreateLayerRequest(name=name, config=config))
        for _ in range(2):  # bad.bn at version 3: non-trivial running statistics
            stub.Train(pb.TrainRequest(layer="bad.bn", x=t(RNG.normal(1.0, 2.0, (8, 4)))))
        yield stub


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25
    assert len({case[0] for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("method", "request_", "code", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_request_is_refused_and_changes_nothing(stub, method, request_, code, message) -> None:
    before = everything(stub)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_, timeout=patience(3))
    assert caught.value.code() == code, caught.value.details()
    assert caught.value.details(), "every refusal carries a message"
    assert re.search(message, caught.value.details()), caught.value.details()
    # beside the message, the standard google.rpc.Status with an ErrorInfo that names the error for programs
    status = rpc_status.from_call(caught.value)  # raises if its code or message contradicts the call's
    assert status is not None, "every refusal carries google.rpc details"
    (info,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    unpacked = error_details_pb2.ErrorInfo()
    info.Unpack(unpacked)
    assert unpacked.domain == "normserve"
    assert re.fullmatch(r"[A-Z][A-Z0-9_]+", unpacked.reason), unpacked.reason
    assert everything(stub) == before
    # and the server still serves
    y = stub.Infer(pb.InferRequest(layer="bad.bn", x=t(X))).y
    assert codec.decode(y).shape == X.shape


def test_size_limits_answer_resource_exhausted(start_server) -> None:
    proc = start_server("--max-message-bytes", "65536", "--max-tensor-elements", "1000")
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn", config=bn_config()))
        before = everything(stub)
        for x in (np.ones((300, 4)), np.ones((5000, 4))):  # 1200 elements; 80 KB > the message limit
            with pytest.raises(grpc.RpcError) as caught:
                stub.Train(pb.TrainRequest(layer="bn", x=t(x)))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            assert caught.value.details()
        assert everything(stub) == before
        assert stub.Train(pb.TrainRequest(layer="bn", x=t(np.arange(8.0).reshape(2, 4)))).version == 2
