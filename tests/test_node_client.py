"""Cross-language: a Node.js client (@grpc/grpc-js, built from the .proto alone) gets the Python client's
numbers from the real server, tensors read whole (dtype, shape and elements), and its status codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NODE_CLIENT
from serverproc import patience

from normserve.client import NormClient, NotFound
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb

PROTO = Path(__file__).resolve().parents[1] / "protos" / "normserve" / "v1" / "normalization.proto"


def _to_node(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "values": array.ravel().tolist()}  # float32 values are exact doubles


def _from_node(tensor: dict[str, Any], expected: np.ndarray) -> np.ndarray:
    """The array a Node answer holds, after checking it has the header the Python client read."""
    assert (tensor["dtype"], tensor["shape"]) == ("FLOAT32", list(expected.shape))
    return np.asarray(tensor["values"], np.float32).reshape(tensor["shape"])


def test_a_node_client_gets_the_python_clients_numbers(node, start_server, rng) -> None:
    executable, env = node
    server = start_server()
    x = rng.normal(0.5, 2.0, (6, 4, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    request = {"layer": "node.bn", "x": _to_node(x), "dy": _to_node(dy)}
    result = subprocess.run(
        [executable, str(NODE_CLIENT / "client.js"), server.target, str(PROTO)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=patience(12),
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)

    with NormClient(server.target) as nc:  # the same calls, in the same order, on a twin layer
        layer = nc.create_layer("python.bn", "batch_norm", num_features=4)
        created = layer.info.version, list(layer.info.param_shape)
        y_train = layer.train(x)
        trained = layer.info.version, layer.info.num_batches_tracked
        y_infer = layer.infer(x)
        gradients = dict(zip(("dx", "dweight", "dbias"), layer.gradient(x, dy), strict=True))
        with pytest.raises(NotFound) as missing:
            nc.call("Infer", pb.InferRequest(layer="node.bn-missing", x=codec.encode(x)))

    assert answers["created"] == {"name": "node.bn", "version": created[0], "param_shape": created[1]}
    np.testing.assert_array_equal(_from_node(answers["train"]["y"], y_train), y_train)
    assert (answers["train"]["version"], answers["train"]["num_batches_tracked"]) == trained == (2, 1)
    np.testing.assert_array_equal(_from_node(answers["infer"]["y"], y_infer), y_infer)
    assert answers["infer"]["version"] == trained[0]
    for name, expected in gradients.items():
        np.testing.assert_array_equal(_from_node(answers["gradient"][name], expected), expected)
    assert answers["not_found"] == {"code": "NOT_FOUND", "details": missing.value.details}
    assert "node.bn-missing" in missing.value.details
