"""TLS, mutual TLS and bearer tokens on the real server, with certificates made at test time."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import grpc
import numpy as np
import pytest
from certs import make_pki
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serverproc import NORMSERVE, ServerProcess, everything, patience

from normserve.client import AsyncNormClient, NormClient, RetryPolicy, Unauthenticated, Unavailable
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

NORMALIZATION = pb.DESCRIPTOR.services_by_name["Normalization"]
TOKENS = ("first-token-3f9a1c", "second-token-77b2e0")
ONCE = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _round_trip(client: NormClient, name: str) -> None:
    layer = client.create_layer(name, "batch_norm", num_features=3)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    assert layer.train(x).shape == x.shape
    assert layer.refresh().num_batches_tracked == 1


def _refused(**client) -> None:
    """The server turns this client away at the handshake."""
    with (
        NormClient(client.pop("target"), retry=ONCE, timeout=patience(0.5), **client) as nc,
        pytest.raises(Unavailable),
    ):
        nc.list_layers()


def test_tls_serves_verified_clients_only(tmp_path, pki) -> None:
    server = pki["server"]
    proc = ServerProcess(
        tmp_path / "state",
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        client={"ca_cert": pki["ca"].ca},
    ).start()
    try:
        assert "listening on" in proc.log()
        assert "(TLS," in proc.log()
        target = f"localhost:{proc.port}"
        with NormClient(target, ca_cert=pki["ca"].ca) as nc:
            _round_trip(nc, "tls")
        # The IP address is in the certificate too; a name it lacks is accepted only when overridden.
        with NormClient(proc.target, ca_cert=pki["ca"].ca.read_bytes()) as nc:
            assert nc.health() == "SERVING"
        _refused(target=target)  # plaintext
        _refused(target=target, ca_cert=pki["rogue_ca"])  # a server this client cannot verify
        health = [NORMSERVE, "health", "--target", target, "--tls-ca", str(pki["ca"].ca)]
        assert subprocess.run(health, capture_output=True, text=True, timeout=patience(3)).returncode == 0
        assert subprocess.run(health[:4], capture_output=True, timeout=patience(3)).returncode == 1
    finally:
        assert proc.stop() == 0


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(tmp_path, pki) -> None:
    server, client = pki["server"], pki["client"]
    proc = ServerProcess(
        tmp_path / "state",
        *("--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(pki["ca"].ca)),
        client={"ca_cert": pki["ca"].ca, "client_cert": client.cert, "client_key": client.key},
    ).start()
    try:
        assert "(mutual TLS," in proc.log()
        target = f"localhost:{proc.port}"
        with NormClient(target, ca_cert=pki["ca"].ca, client_cert=client.cert, client_key=client.key) as nc:
            _round_trip(nc, "mtls")
        _refused(target=target, ca_cert=pki["ca"].ca)  # no client certificate
        rogue = pki["rogue_client"]
        _refused(target=target, ca_cert=pki["ca"].ca, client_cert=rogue.cert, client_key=rogue.key)
        layers = [NORMSERVE, "layers", "--target", target, "--tls-ca", str(pki["ca"].ca)]
        assert subprocess.run(layers, capture_output=True, timeout=patience(3)).returncode == 1
        with_cert = [*layers, "--tls-client-cert", str(client.cert), "--tls-client-key", str(client.key)]
        listed = subprocess.run(with_cert, capture_output=True, text=True, timeout=patience(3))
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[1].startswith("mtls\tbatch_norm")  # below the header
    finally:
        assert proc.stop() == 0


def test_client_cert_without_key_is_a_clear_error(pki) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        NormClient("localhost:1", client_cert=pki["client"].cert)


def test_serve_refuses_half_a_tls_config(tmp_path, pki) -> None:
    for args in (["--tls-cert", str(pki["server"].cert)], ["--tls-client-ca", str(pki["ca"].ca)]):
        result = subprocess.run(
            [NORMSERVE, "serve", "--port", "0", "--state-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=patience(3),
        )
        assert result.returncode == 2
        assert "--tls-cert and --tls-key" in result.stderr


# ---------------------------------------------------------------------- tokens
@pytest.fixture
def token_server(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may call\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    proc = ServerProcess(tmp_path / "state", "--auth-token-file", str(tokens), "--log-level", "debug").start()
    yield proc, tokens
    assert proc.stop() == 0


def _every_method(stub: pb_grpc.NormalizationStub, metadata) -> dict[str, tuple[grpc.StatusCode, str]]:
    """Call every Normalization method on layer "kept"; the status and message each answers.

    The methods come from the service descriptor, so a new RPC fails here until it has a request.
    """
    x = pb.Tensor(dtype=pb.FLOAT32, shape=[4, 2], data=np.arange(8, dtype=np.float32).tobytes())
    requests = {
        "CreateLayer": pb.CreateLayerRequest(name="other", config=pb.LayerConfig(kind=pb.BATCH_NORM, num_features=2)),
        "GetLayer": pb.GetLayerRequest(name="kept"),
        "ListLayers": pb.ListLayersRequest(),
        "Train": pb.TrainRequest(layer="kept", x=x),
        "Infer": pb.InferRequest(layer="kept", x=x),
        "Gradient": pb.GradientRequest(layer="kept", x=x, dy=x),
        "GetState": pb.GetStateRequest(name="kept"),
        "SetState": pb.SetStateRequest(name="kept", partial=True, num_batches_tracked=7),
        "Rollback": pb.RollbackRequest(name="kept", version=1),
        "TrainStatistics": pb.TrainStatisticsRequest(
            layer="kept", statistics=pb.BatchStatistics(count=4, mean=[0.5, 1.0], m2=[2.0, 3.0])
        ),
        "GradientStatistics": pb.GradientStatisticsRequest(
            layer="kept", count=4, sum_dy=[1.0, 2.0], sum_dy_xmu=[0.5, 0.5], sync=pb.SyncGroup(id="g", world_size=1)
        ),
        "PushStatistics": pb.PushStatisticsRequest(
            sequence=1,
            updates=[
                pb.StatisticsUpdate(
                    layer="kept",
                    count=4,
                    mean=pb.Tensor(dtype=pb.FLOAT64, shape=[2], data=np.array([0.5, 1.0]).tobytes()),
                    m2=pb.Tensor(dtype=pb.FLOAT64, shape=[2], data=np.array([2.0, 3.0]).tobytes()),
                )
            ],
        ),
        "DeleteLayer": pb.DeleteLayerRequest(name="kept"),
        "TrainStream": pb.TrainStreamRequest(head=pb.TrainRequest(layer="kept", x=x)),
        "InferStream": pb.InferStreamRequest(head=pb.InferRequest(layer="kept", x=x)),
        "GradientStream": pb.GradientStreamRequest(head=pb.GradientRequest(layer="kept", x=x, dy=x)),
        "RegisterSharedMemory": pb.RegisterSharedMemoryRequest(name="r", key="/normserve-test", byte_size=64),
        "UnregisterSharedMemory": pb.UnregisterSharedMemoryRequest(),  # every region
        "ListSharedMemory": pb.ListSharedMemoryRequest(),
    }
    codes = {}
    for method in NORMALIZATION.methods:
        assert method.name in requests, f"a new RPC needs a request here: {method.name}"
        request = requests[method.name]
        try:
            answer = getattr(stub, method.name)(
                iter([request]) if method.client_streaming else request, metadata=metadata, timeout=patience(1)
            )
            if method.server_streaming:
                list(answer)
            codes[method.name] = (grpc.StatusCode.OK, "")
        except grpc.RpcError as error:
            codes[method.name] = (error.code(), error.details())
    return codes


def test_tokens_guard_every_method_but_health_and_change_nothing(token_server) -> None:
    proc, _ = token_server
    with NormClient(proc.target, token=TOKENS[1]) as nc:
        _round_trip(nc, "kept")
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        good = (("authorization", f"Bearer {TOKENS[0]}"),)
        before = everything(_AuthStub(stub, good))
        for metadata in (
            None,
            (("authorization", "Bearer not-a-token"),),
            (("authorization", f"Bearer {TOKENS[0]}x"),),
            (("authorization", TOKENS[0]),),  # no scheme
            (("authorization", f"Basic {TOKENS[0]}"),),
        ):
            answers = _every_method(stub, metadata)
            assert {code for code, _ in answers.values()} == {grpc.StatusCode.UNAUTHENTICATED}
            assert all(re.search("token|authorization", details) for _, details in answers.values())
        assert everything(_AuthStub(stub, good)) == before
        # Reflection shows the API: it needs a token too.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(reflect.ServerReflectionInfo(iter([request]), timeout=patience(1)))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert list(reflect.ServerReflectionInfo(iter([request]), metadata=good, timeout=patience(1)))

    async def listed_by_async_client() -> list[str]:
        async with AsyncNormClient(proc.target, token=TOKENS[0]) as nc:
            return [layer.name for layer in await nc.list_layers()]

    assert asyncio.run(listed_by_async_client()) == ["kept"]

    with NormClient(proc.target, retry=ONCE) as anonymous:
        assert anonymous.health() == "SERVING"  # load balancers carry no token
        with pytest.raises(Unauthenticated, match="requires a token"):
            anonymous.list_layers()
    assert subprocess.run([NORMSERVE, "health", "--target", proc.target], timeout=patience(3)).returncode == 0

    proc.log_lines("code=UNAUTHENTICATED")
    log = proc.log()
    assert not any(token in log for token in TOKENS)  # never logged, not even at debug level
    assert "not-a-token" not in log


def test_token_file_is_reloaded_when_it_changes(token_server, tmp_path) -> None:
    proc, tokens = token_server
    with (
        NormClient(proc.target, token=TOKENS[0], retry=ONCE) as old,
        NormClient(proc.target, token="rotated-token-5d1e", retry=ONCE) as new,
    ):
        assert old.list_layers() == []
        with pytest.raises(Unauthenticated):
            new.list_layers()
        tokens.write_text("rotated-token-5d1e\n")
        deadline = time.monotonic() + patience(1)
        while True:  # re-read at most once a second
            try:
                new.list_layers()
                break
            except Unauthenticated:
                assert time.monotonic() < deadline, proc.log()
                time.sleep(0.2)
        with pytest.raises(Unauthenticated):
            old.list_layers()
        tokens.write_text("# nobody\n")  # an empty file keeps the tokens it had
        deadline = time.monotonic() + patience(1)
        while "keeping the previous tokens" not in proc.log():  # re-read by a call a second after the last
            assert new.list_layers() == []
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.2)
        assert new.list_layers() == []
    token_file = tmp_path / "client-token"
    token_file.write_text("rotated-token-5d1e\n")
    cli = [NORMSERVE, "layers", "--target", proc.target]
    assert subprocess.run(cli, capture_output=True, timeout=patience(3)).returncode == 1
    assert (
        subprocess.run([*cli, "--token-file", str(token_file)], capture_output=True, timeout=patience(3)).returncode
        == 0
    )


def test_an_empty_token_file_stops_startup(tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# no tokens yet\n")
    result = subprocess.run(
        [NORMSERVE, "serve", "--port", "0", "--state-dir", str(tmp_path / "s"), "--auth-token-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=patience(6),
    )
    assert result.returncode == 1
    assert "holds no tokens" in result.stderr


class _AuthStub:
    """A stub whose calls carry fixed metadata (for the ``everything`` helper)."""

    def __init__(self, stub, metadata) -> None:
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, method):
        rpc = getattr(self._stub, method)
        return lambda request: rpc(request, metadata=self._metadata, timeout=patience(1))
