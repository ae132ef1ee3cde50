"""Structured errors from the real server: a google.rpc ErrorInfo reason (and BadRequest field violations where a
field was wrong) beside each message, as the Python client exposes them and as a raw gRPC call sees them."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from serverproc import patience

from normserve.client import AlreadyExists, InvalidArgument, NormServeError, NotFound
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc


def _caught(call) -> NormServeError:
    with pytest.raises(NormServeError) as caught:
        call()
    return caught.value


def test_the_client_exposes_reasons_and_field_violations(client, layer_name, rng) -> None:
    missing = _caught(lambda: client.layer(layer_name + ".absent"))
    assert isinstance(missing, NotFound)
    assert (missing.reason, missing.field_violations) == ("LAYER_NOT_FOUND", ())

    bad_name = _caught(lambda: client.create_layer("no spaces", "batch_norm", num_features=2))
    assert isinstance(bad_name, InvalidArgument)
    assert bad_name.reason == "INVALID_REQUEST"
    ((field, description),) = bad_name.field_violations
    assert field == "name"
    assert "is not a valid layer name" in description

    bad_config = _caught(lambda: client.create_layer(layer_name + ".gn", "group_norm", num_groups=3, num_channels=4))
    assert bad_config.reason == "CONFIG_ERROR"
    assert [f for f, _ in bad_config.field_violations] == ["config"]

    layer = client.create_layer(layer_name, "batch_norm", num_features=3)
    taken = _caught(lambda: client.create_layer(layer_name, "batch_norm", num_features=4))
    assert isinstance(taken, AlreadyExists)
    assert (taken.reason, taken.field_violations) == ("LAYER_EXISTS", ())

    stale = _caught(lambda: layer.load_state_dict(layer.state_dict(), expected_version=7))
    assert stale.reason == "STALE_VERSION"
    assert _caught(lambda: layer.state_dict(version=5)).reason == "VERSION_NOT_KEPT"

    weight = rng.normal(size=4).astype(np.float32)  # one too many
    wrong_shape = _caught(
        lambda: layer.train(rng.normal(size=(6, 3)).astype(np.float32), parameters={"weight": weight})
    )
    assert wrong_shape.reason == "INVALID_REQUEST"
    assert [f for f, _ in wrong_shape.field_violations] == ["parameters['weight']"]


def test_a_raw_grpc_call_sees_the_status_details(server, layer_name) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        stub.CreateLayer(
            pb.CreateLayerRequest(name=layer_name, config=pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[4]))
        )
        bad_tensor = pb.TrainRequest(layer=layer_name, x=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], data=b"\0" * 7))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Train(bad_tensor, timeout=patience(3))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.details()
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert [status.details[0].Unpack(info), status.details[1].Unpack(bad)] == [True, True]
    assert (info.domain, info.reason) == ("normserve", "TENSOR_ERROR")
    assert [v.field for v in bad.field_violations] == ["x"]
    assert bad.field_violations[0].description == error.details()
