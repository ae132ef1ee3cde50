"""A starting server listens at once: liveness SERVING, readiness NOT_SERVING and layer calls UNAVAILABLE while
its CPU kernels compile, SERVING after; a server stopped while it compiles exits at once."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import ServerProcess, patience

from normkernels import compiled
from normserve.client import NormClient, RetryPolicy, Unavailable
from normserve.server.app import LIVENESS_SERVICE, SERVICE_NAME

pytestmark = pytest.mark.skipif(not compiled.wanted(), reason="NORMKERNELS_CPU=numpy: no kernels to compile")

#: Compiling one kernel takes seconds alone, a whole first start a minute or more.
READY_SECONDS = patience(60)


def _statuses(target: str) -> dict[str, str]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            service: health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=patience(1)).status
            )
            for service in ("", SERVICE_NAME, LIVENESS_SERVICE)
        }


def _half_cold_cache(folder) -> str:
    """A copy of the kernel cache without one kernel (``normalize``): starting on it compiles that one only."""
    shutil.copytree(compiled.cache_dir(), folder)
    removed = [path for path in folder.glob("*/cpu_kernels.normalize-*") if path.unlink() is None]
    assert removed, "the kernel cache holds no normalize kernel to remove"
    return str(folder)


def test_health_says_live_not_ready_while_the_kernels_compile(tmp_path) -> None:
    cache = _half_cold_cache(tmp_path / "cache")
    proc = ServerProcess(tmp_path / "state", env={"NORMKERNELS_CACHE_DIR": cache})
    proc.start(timeout=READY_SECONDS, ready=False)  # returns once the port is open
    try:
        assert _statuses(proc.target) == {"": "NOT_SERVING", SERVICE_NAME: "NOT_SERVING", LIVENESS_SERVICE: "SERVING"}
        with NormClient(proc.target, retry=RetryPolicy(attempts=1)) as nc:
            with pytest.raises(Unavailable, match="CPU kernels are compiling"):
                nc.create_layer("early", "batch_norm", num_features=2)
            assert nc.health(LIVENESS_SERVICE) == "SERVING"
        deadline = time.monotonic() + READY_SECONDS
        while _statuses(proc.target)[""] != "SERVING":
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        assert _statuses(proc.target) == {"": "SERVING", SERVICE_NAME: "SERVING", LIVENESS_SERVICE: "SERVING"}
        with NormClient(proc.target) as nc:
            x = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
            y = nc.create_layer("early", "batch_norm", num_features=2).train(x)
            np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
        log = proc.log()
        listening, ready = log.index("listening on"), log.index("ready: SERVING")
        assert listening < log.index("warming up the CPU kernels") < log.index("CPU kernels ready") < ready
        assert "(0 compiled" not in log  # the removed kernel was compiled, not loaded
        assert "layer calls UNAVAILABLE" in log
    finally:
        assert proc.stop() == 0


def test_a_server_stopped_while_it_compiles_exits_at_once(tmp_path) -> None:
    cold = tmp_path / "empty-cache"
    cold.mkdir()
    proc = ServerProcess(tmp_path / "state", env={"NORMKERNELS_CACHE_DIR": str(cold)})
    proc.start(timeout=READY_SECONDS, ready=False)
    assert _statuses(proc.target)[""] == "NOT_SERVING"  # a whole first start compiles for long
    started = time.monotonic()
    assert proc.stop() == 0
    # A second or so alone, not the minutes (alone) the compile would take: both grow with the slowdown.
    assert time.monotonic() - started < patience(3)
    assert "ready: SERVING" not in proc.log()
    assert "stopped; state is in" in proc.log()
