"""The real server in a subprocess, started the way a user starts it: ``normserve serve``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.v1 import normalization_pb2 as pb

NORMSERVE = str(Path(sys.executable).with_name("normserve"))
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def everything(stub) -> list[bytes]:
    """Every layer's description and state on a server, serialized deterministically."""
    layers = stub.ListLayers(pb.ListLayersRequest()).layers
    states = [stub.GetState(pb.GetStateRequest(name=layer.name)) for layer in layers]
    return [m.SerializeToString(deterministic=True) for m in (*layers, *states)]


def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Block until the health service at ``target`` answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become SERVING within {timeout} s")
            time.sleep(0.05)


class ServerProcess:
    """``normserve serve --port 0 --state-dir DIR`` with its log in ``DIR/../server-N.log``."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.state_dir = Path(state_dir)
        self.args = args
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log_path = self.state_dir.parent / "server.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.starts += 1
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-server-{self.starts}.log"
        command = [NORMSERVE, "serve", "--port", "0", "--state-dir", str(self.state_dir), *self.args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while (match := _LISTENING.search(self.log())) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        wait_serving(self.target, timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful shutdown a deployment does."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: the crash the store must survive."""
        self.process.kill()
        return self.process.wait(30)
