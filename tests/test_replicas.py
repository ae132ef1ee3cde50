"""Replicas without a proxy: the routing header check, and the whole-cluster views of replicas started with
--peers, asked the way nginx asks them.

The calls here carry ``x-normserve-layer`` and ``x-normserve-view: cluster`` themselves (the clients and nginx
set them); tests/test_cluster.py has the same through a real nginx.
"""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import NORMSERVE, patience
from test_observability import free_port

from normserve.client import NormClient
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc
from normserve.v1.routing import LAYER_HEADER, VIEW_CLUSTER, VIEW_HEADER

MARKED = ((VIEW_HEADER, VIEW_CLUSTER),)


def calls_about(stub: pb_grpc.NormalizationStub, layer: str, x: pb.Tensor) -> dict:
    """Unary, streamed and state calls about ``layer``, each taking the metadata to send."""
    head = pb.TrainRequest(layer=layer, x=x)
    state = pb.SetStateRequest(name=layer, num_batches_tracked=7, partial=True)
    return {
        "Train": lambda md: stub.Train(head, metadata=md),
        "TrainStream": lambda md: list(stub.TrainStream(iter([pb.TrainStreamRequest(head=head)]), metadata=md)),
        "SetState": lambda md: stub.SetState(state, metadata=md),
    }


def refuses_misrouted_calls(target: str, layer: str, other: str, x: pb.Tensor) -> None:
    """Every call about ``layer`` whose routing header names ``other`` answers INVALID_ARGUMENT and changes
    nothing; with the right header, a Train is accepted."""
    right = ((LAYER_HEADER, layer),)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        before = stub.GetLayer(pb.GetLayerRequest(name=layer), metadata=right)
        for method, call in calls_about(stub, layer, x).items():
            with pytest.raises(grpc.RpcError) as refused:
                call(((LAYER_HEADER, other),))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert LAYER_HEADER in refused.value.details()
            assert repr(other) in refused.value.details()
        assert stub.GetLayer(pb.GetLayerRequest(name=layer), metadata=right).version == before.version
        assert stub.Train(pb.TrainRequest(layer=layer, x=x), metadata=right).version == before.version + 1


def test_a_call_whose_routing_header_names_another_layer_is_refused(server, client, layer_name, rng) -> None:
    client.create_layer(layer_name, "batch_norm", num_features=4)
    x = codec.encode(rng.normal(size=(8, 4)).astype(np.float32))
    refuses_misrouted_calls(server.target, layer_name, layer_name + ".other", x)
    assert client.layer(layer_name).info.num_batches_tracked == 1


def _list(target: str, metadata=()) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        return [
            layer.name
            for layer in stub.ListLayers(pb.ListLayersRequest(), metadata=metadata, timeout=patience(1)).layers
        ]


def _health(target: str, metadata=()) -> str:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@pytest.fixture
def pair(start_server, tmp_path):
    """Two replicas that know each other, each with one layer."""
    ports = free_port(), free_port()
    peers = [f"127.0.0.1:{port}" for port in reversed(ports)]
    replicas = [
        start_server("--port", str(port), "--peers", peer, "--peer-timeout", "1", state_dir=tmp_path / f"r{port}")
        for port, peer in zip(ports, peers, strict=True)
    ]
    for replica, name in zip(replicas, ("on.first", "on.second"), strict=True):
        with NormClient(replica.target) as nc:
            nc.create_layer(name, "batch_norm", num_features=2)
    return replicas


def test_a_marked_call_answers_for_every_replica_and_a_direct_one_for_this_replica(pair) -> None:
    first, second = pair
    assert _list(first.target, MARKED) == _list(second.target, MARKED) == ["on.first", "on.second"]
    assert _list(first.target) == ["on.first"]  # direct: the replica's own view, as without --peers
    assert _health(first.target, MARKED) == "SERVING"
    assert "1 peer(s): " + second.target in first.log()


def test_a_peer_down_fails_the_cluster_list_naming_it_and_turns_cluster_health_not_serving(pair) -> None:
    first, second = pair
    assert second.stop() == 0
    with pytest.raises(grpc.RpcError) as failed:
        _list(first.target, MARKED)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert second.target in failed.value.details()
    assert _health(first.target, MARKED) == "NOT_SERVING"
    assert _health(first.target) == "SERVING"  # its own health: what its container healthcheck asks
    assert _list(first.target) == ["on.first"]
    assert "peer " + second.target + " is not serving" in first.log()
    second.start()  # back on its port and state: the views follow without a restart of the first
    assert _list(first.target, MARKED) == ["on.first", "on.second"]
    assert _health(first.target, MARKED) == "SERVING"


def test_a_server_without_peers_ignores_the_mark(server, client, layer_name) -> None:
    client.create_layer(layer_name, "rms_norm", normalized_shape=[3])
    assert _list(server.target, MARKED) == _list(server.target)
    assert _health(server.target, MARKED) == "SERVING"


def _serve(state_dir, *args: str) -> subprocess.CompletedProcess:
    command = [NORMSERVE, "serve", "--port", "0", "--state-dir", str(state_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=patience(6))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--peers", "nohost"), "HOST:PORT"),
        (("--peers", "a:1,a:1"), "named twice"),
        (("--peers", "a:70000"), "1..65535"),
        (("--peers", ",".join(f"h{i}:1" for i in range(65))), "at most 64"),
        (("--peers", "a:1", "--peer-timeout", "61"), "--peer-timeout"),
        (("--peers", "a:1", "--peer-timeout", "0"), "--peer-timeout"),
    ],
)
def test_bad_peer_flags_are_refused(tmp_path, args, says) -> None:
    result = _serve(tmp_path, *args)
    assert result.returncode == 2
    assert says in result.stderr


def test_peers_with_tls_are_refused_with_the_way_out(tmp_path) -> None:
    from certs import Authority

    pair = Authority(tmp_path).issue("127.0.0.1", server=True)
    result = _serve(tmp_path / "s", "--peers", "a:1", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    assert result.returncode == 1
    assert "terminate TLS at the proxy" in result.stderr
