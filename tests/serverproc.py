"""The real server in a subprocess, started the way a user starts it: ``normserve serve``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from normserve.client import NormClient, NormServeError, RetryPolicy
from normserve.tools import children
from normserve.v1 import normalization_pb2 as pb

NORMSERVE = str(Path(sys.executable).with_name("normserve"))
_LISTENING = re.compile(r"listening on \S+:(\d+) ")


def slowdown() -> float:
    """How many times slower than alone this machine runs now: its load average per core, at least 1
    (NORMSERVE_TEST_SLOWDOWN sets it)."""
    given = os.environ.get("NORMSERVE_TEST_SLOWDOWN")
    return float(given) if given else max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def patience(seconds_alone: float) -> float:
    """A wall-clock bound for what takes about ``seconds_alone`` on an idle 2-core machine: ten times that,
    times the slowdown now. A bound catches a hang; it never fails a test for a busy machine."""
    return 10 * seconds_alone * slowdown()


def wait_for(condition, timeout: float, step: float = 0.1) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (asked every ``step``): for what a server does
    soon after an answer (memory given back, a connection closed), which a busy machine does later."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def everything(stub) -> list[bytes]:
    """Every layer's description and state on a server, serialized deterministically.

    Training stats are left out: they are monitoring since the server started, not state.
    """
    layers = stub.ListLayers(pb.ListLayersRequest()).layers
    for layer in layers:
        layer.ClearField("stats")
    states = [stub.GetState(pb.GetStateRequest(name=layer.name)) for layer in layers]
    return [m.SerializeToString(deterministic=True) for m in (*layers, *states)]


def env_variables(command: str) -> set[str]:
    """The NORMSERVE_* variables ``normserve COMMAND --help`` names."""
    text = subprocess.run([NORMSERVE, command, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env (NORMSERVE_[A-Z_]+)\]", " ".join(text.split())))


def wait_serving(target: str, timeout: float | None = None, **client: Any) -> None:
    """Block until the health service at ``target`` answers SERVING (``client``: NormClient's TLS arguments)."""
    timeout = patience(3) if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with NormClient(target, retry=RetryPolicy(attempts=1), **client) as nc:
        while True:
            try:
                if nc.health(timeout=patience(0.1)) == "SERVING":
                    return
            except NormServeError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become SERVING within {timeout} s")
            time.sleep(0.05)


class ServerProcess:
    """``normserve serve --port 0 --state-dir DIR`` with its log in ``DIR/../server-N.log``.

    ``client`` holds NormClient's TLS arguments for a server that serves TLS;
    ``env`` adds environment variables; ``command`` replaces the whole command
    line (a deployment's, configured by ``env``).
    """

    def __init__(
        self,
        state_dir: Path,
        *args: str,
        client: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.args = args
        self.client = client or {}
        self.env = env or {}
        self.command = command
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log_path = self.state_dir.parent / "server.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float | None = None, ready: bool = True) -> ServerProcess:
        """Start, and wait until it listens and (``ready``) its health answers SERVING."""
        timeout = patience(6) if timeout is None else timeout  # a start loads the cached kernels: seconds
        self.starts += 1
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-server-{self.starts}.log"
        command = self.command or [NORMSERVE, "serve", "--port", "0", "--state-dir", str(self.state_dir), *self.args]
        with open(self.log_path, "w") as log:
            # Ends with the test run, however that ends (a timeout's SIGKILL included): see tools.children.
            self.process = children.popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while (match := _LISTENING.search(self.log())) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        if ready:
            wait_serving(self.target, timeout, **self.client)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_lines(self, text: str, timeout: float | None = None) -> list[str]:
        """The log lines containing ``text``, waiting for the first one (the server logs a failed call
        just after the client has its answer)."""
        timeout = patience(1) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not (lines := [line for line in self.log().splitlines() if text in line]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return lines

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM and wait: the graceful shutdown a deployment does."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(patience(6) if timeout is None else timeout)

    def rss(self) -> int:
        """Bytes the server process holds in memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def kill(self) -> int:
        """SIGKILL: the crash the store must survive."""
        self.process.kill()
        return self.process.wait(patience(3))
