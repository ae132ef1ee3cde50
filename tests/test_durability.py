"""State survives: kill -9 loses no acknowledged Train; a graceful restart is bit-exact."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import randomize
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import everything, patience, wait_for

import normkernels as nk
from normserve.client import NormClient, NormServeError
from normserve.server.store import StateStore, StoreLocked
from normserve.v1 import normalization_pb2_grpc as pb_grpc


def everything_on(target: str) -> list[bytes]:
    with grpc.insecure_channel(target) as channel:
        return everything(pb_grpc.NormalizationStub(channel))


def test_kill_9_loses_no_acknowledged_train(start_server) -> None:
    proc = start_server()
    with NormClient(proc.target) as nc:
        nc.create_layer("bn", "batch_norm", num_features=8)
    sent = [0] * 4
    acked = [0] * 4
    stop = threading.Event()

    def train(c: int) -> None:
        rng = np.random.default_rng(c)
        with NormClient(proc.target, timeout=patience(1)) as nc:
            layer = nc.layer("bn")
            while not stop.is_set():
                sent[c] += 1
                try:
                    layer.train(rng.normal(size=(32, 8, 4)).astype(np.float32))
                except NormServeError:
                    return
                acked[c] += 1

    threads = [threading.Thread(target=train, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    # the clients train for a while before the kill: many calls acknowledged, however long those take here
    assert wait_for(lambda: sum(acked) > 20, patience(1.5), 0.05), acked
    assert proc.kill() == -signal.SIGKILL
    stop.set()
    for thread in threads:
        thread.join()

    restarted = start_server()  # same state dir
    with NormClient(restarted.target) as nc:
        count = int(nc.layer("bn").state_dict()["num_batches_tracked"])
        assert sum(acked) <= count <= sum(sent)
        assert nc.layer("bn").version == 1 + count


def test_graceful_restart_round_trips_every_layer_bit_exactly(start_server, rng) -> None:
    proc = start_server()
    with NormClient(proc.target) as nc:
        for i, (kind, config, shape) in enumerate(
            [
                ("batch_norm", {"num_features": 3, "momentum": None}, (5, 3, 4)),
                ("batch_norm", {"num_features": 3, "dtype": "float64"}, (5, 3)),
                ("instance_norm", {"num_features": 2, "affine": True, "track_running_stats": True}, (3, 2, 6)),
                ("group_norm", {"num_groups": 2, "num_channels": 4}, (2, 4, 3)),
                ("layer_norm", {"normalized_shape": [2, 3], "bias": False}, (4, 2, 3)),
                ("rms_norm", {"normalized_shape": 5, "eps": None}, (3, 5)),
            ]
        ):
            local = nk.make_layer(kind, **config)
            randomize(local, rng)
            layer = nc.create_layer(f"model.layers.{i}.norm", kind, **config)
            layer.load_state_dict(local.state_dict())
            for _ in range(3):
                layer.train(rng.normal(1.0, 3.0, shape).astype(np.float32))
    before = everything_on(proc.target)
    assert proc.stop() == 0
    assert "stopped; state is in" in proc.log()

    restarted = start_server()
    assert "6 layer(s) restored" in restarted.log()
    assert everything_on(restarted.target) == before


def test_sigterm_finishes_in_flight_calls_and_reports_not_serving(start_server, rng) -> None:
    proc = start_server()
    with grpc.insecure_channel(proc.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with NormClient(proc.target) as nc:
            layer = nc.create_layer("bn", "batch_norm", num_features=16)
            x = rng.normal(size=(256, 16, 1024)).astype(np.float32)  # 16 MB: a call that takes a while
            result = {}
            thread = threading.Thread(target=lambda: result.setdefault("y", layer.train(x)))
            thread.start()
            time.sleep(patience(0.02))  # the Train is in flight (it takes far longer)
            proc.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            thread.join()
            assert result["y"].shape == x.shape  # the in-flight Train completed
    assert proc.process.wait(patience(6)) == 0
    restarted = start_server()
    with NormClient(restarted.target) as nc:
        assert int(nc.layer("bn").state_dict()["num_batches_tracked"]) == 1


# ---------------------------------------------------------------------- the store itself
def test_store_round_trips_bit_exactly_and_uses_wal(tmp_path, rng) -> None:
    store = StateStore(tmp_path)
    tensors = {
        "weight": rng.normal(size=(3, 4)).astype(np.float32),
        "running_var": rng.uniform(size=7) ** 9,  # float64, tiny values: every bit counts
    }
    store.create_layer("a", b"config", 1, 0, tensors)
    store.update_state("a", 2, 5, {"running_var": tensors["running_var"] * 3})
    with pytest.raises(StoreLocked, match="in use by another normserve process"):
        StateStore(tmp_path)
    store.close()

    reopened = StateStore(tmp_path)
    (stored,) = reopened.load_all()
    assert (stored.name, stored.config, stored.version, stored.num_batches_tracked) == ("a", b"config", 2, 5)
    assert stored.tensors["weight"].tobytes() == tensors["weight"].tobytes()
    assert stored.tensors["weight"].shape == (3, 4)
    assert stored.tensors["running_var"].tobytes() == (tensors["running_var"] * 3).tobytes()
    with pytest.raises(KeyError):
        reopened.update_state("missing", 2, 0, {})
    with pytest.raises(sqlite3.IntegrityError):  # a failed write leaves nothing half-done
        reopened.create_layer("a", b"other", 1, 0, {"bias": np.zeros(2)})
    assert reopened.load_all()[0].tensors.keys() == {"weight", "running_var"}
    reopened.delete_layer("a")
    assert reopened.load_all() == []
    mode = sqlite3.connect(reopened.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


def test_parameters_sent_with_a_train_are_used_stored_and_survive_kill_9(start_server, rng) -> None:
    proc = start_server()
    x = rng.normal(1.0, 2.0, size=(6, 4)).astype(np.float32)
    weight, bias = rng.normal(1.0, 0.5, 4).astype(np.float32), rng.normal(0.0, 0.5, 4).astype(np.float32)
    with NormClient(proc.target) as nc:
        ln = nc.create_layer("ln", "layer_norm", normalized_shape=4)
        y = ln.train(x, keep_forward=True, parameters={"weight": weight, "bias": bias})
        xhat = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, xhat * weight + bias, rtol=1e-5, atol=1e-5)
        assert ln.version == 2  # a layer without running statistics changed: its parameters
        dy = rng.normal(size=x.shape).astype(np.float32)
        dx, dweight, _ = ln.gradient(None, dy)  # the kept forward ran with the new parameters
        g = dy * weight
        rstd = 1 / np.sqrt(x.var(1, keepdims=True) + 1e-5)
        expected = rstd * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
        np.testing.assert_allclose(dx, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dweight, (dy * xhat).sum(0), rtol=1e-5, atol=1e-5)
        ln.train(x)  # no parameters: nothing changed, same version
        assert ln.version == 2
    assert proc.kill() == -signal.SIGKILL
    with NormClient(start_server().target) as nc:
        state = nc.layer("ln").state_dict()
        np.testing.assert_array_equal(state["weight"], weight)
        np.testing.assert_array_equal(state["bias"], bias)
        assert nc.layer("ln").version == 2
