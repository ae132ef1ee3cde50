"""A starting server listens at once: liveness SERVING, readiness NOT_SERVING and layer calls UNAVAILABLE while
its CPU kernels compile, SERVING after; a server stopped while it compiles exits at once."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import ServerProcess, patience

from normkernels import compiled, parallel_compile
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


#: Kernels missing from a half-cold cache: one that takes seconds to compile, and a quick one.
_MISSING = ("normalize", "track_running")


def _half_cold_cache(folder) -> str:
    """A copy of the kernel cache without the kernels of _MISSING: starting on it compiles those only."""
    shutil.copytree(compiled.cache_dir(), folder)
    for name in _MISSING:
        removed = [path for path in folder.glob(f"*/cpu_kernels.{name}-*") if path.unlink() is None]
        assert removed, f"the kernel cache holds no {name} kernel to remove"
    return str(folder)


def _compile_helpers(cache: str) -> list[int]:
    """The processes compiling into ``cache`` for a starting server (normkernels.parallel_compile)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:  # ended meanwhile, or not ours
            continue
        if b"parallel_compile" in command and f"NORMKERNELS_CACHE_DIR={cache}".encode() in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def test_health_says_live_not_ready_while_the_kernels_compile(tmp_path) -> None:
    cache = _half_cold_cache(tmp_path / "cache")
    proc = ServerProcess(tmp_path / "state", env={"NORMKERNELS_CACHE_DIR": cache, parallel_compile.ENV_PROCESSES: "2"})
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
        # The removed kernels were compiled (both signatures each), one in each of two helper processes.
        assert f"({2 * len(_MISSING)} compiled by 2 processes" in log
        assert "layer calls UNAVAILABLE" in log
    finally:
        assert proc.stop() == 0


def test_a_server_stopped_while_it_compiles_exits_at_once(tmp_path) -> None:
    cold = tmp_path / "empty-cache"
    cold.mkdir()
    proc = ServerProcess(
        tmp_path / "state", env={"NORMKERNELS_CACHE_DIR": str(cold), parallel_compile.ENV_PROCESSES: "2"}
    )
    proc.start(timeout=READY_SECONDS, ready=False)
    assert _statuses(proc.target)[""] == "NOT_SERVING"  # a whole first start compiles for long
    deadline = time.monotonic() + READY_SECONDS
    while len(_compile_helpers(str(cold))) < 2:  # the cold cache is being filled by two helper processes
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.05)
    started = time.monotonic()
    assert proc.stop() == 0
    # A second or so alone, not the minutes (alone) the compile would take: both grow with the slowdown.
    assert time.monotonic() - started < patience(3)
    assert "ready: SERVING" not in proc.log()
    assert "stopped; state is in" in proc.log()
    while _compile_helpers(str(cold)):  # the helpers end with the server, in the middle of their compiles
        assert time.monotonic() - started < patience(3), _compile_helpers(str(cold))
        time.sleep(0.05)
