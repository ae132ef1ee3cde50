"""``normserve cluster``: layer-sharded replicas behind nginx on one host, to use all of its cores.

Replica i (1..N) is ``normserve serve`` on 127.0.0.1:P+i with its state in
D/replica-i and its log in D/replica-i.log; nginx listens on HOST:P with a
config generated into D/nginx/ (tools.nginx). Each replica knows the others
as ``--peers``, so ListLayers and health through the front end cover the
whole cluster (server.cluster_views). A replica that dies is started again
on its port and state; SIGTERM or SIGINT stops nginx gracefully first (no
new calls, calls in progress finish), then the replicas (each drains for its
--grace-period).

Changing N changes the ring: start the cluster with the new N on the same D,
then run ``normserve rebalance --replicas ...`` (tools.rebalance).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from normserve.client import NormClient, NormServeError, RetryPolicy
from normserve.tools import children
from normserve.tools.nginx import Nginx, find_nginx, http_config, main_config

__all__ = ["MAX_REPLICAS", "REPLICA_HOST", "Cluster", "Replica", "free_port_block"]

MAX_REPLICAS = 64
#: Replicas listen on loopback only: nginx is their one client (and each other's, for the cluster views).
REPLICA_HOST = "127.0.0.1"
#: A replica that dies sooner than this after its start counts as crash-looping: its restarts back off.
_STEADY_SECONDS = 10.0
_MAX_BACKOFF = 30.0


@dataclass
class Replica:
    """One ``normserve serve`` of the cluster."""

    index: int  # 1..N
    port: int
    state_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{REPLICA_HOST}:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, characters: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-characters:].strip()
        return ""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Cluster:
    """N replicas and nginx in front of them (see the module doc); a context manager that stops them all.

    ``serve_args`` go to every replica's ``normserve serve`` as they are (the
    cluster sets --host, --port, --state-dir, --peers and --metrics-port);
    ``metrics_port`` M > 0 serves replica i's metrics on M+i-1.
    """

    def __init__(
        self,
        replicas: int,
        port: int,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        serve_args: Sequence[str] = (),
        nginx: str | None = None,
        metrics_port: int = 0,
        peer_timeout: float = 2.0,
        proxy_timeout: int = 600,
    ) -> None:
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"--replicas must be in 1..{MAX_REPLICAS}, got {replicas}")
        if not 1 <= port <= 65535 - replicas:
            raise ValueError(f"--port must be in 1..{65535 - replicas} (replicas use the next {replicas}), got {port}")
        if metrics_port and not 1 <= metrics_port <= 65536 - replicas:
            raise ValueError(f"--metrics-port must be 0 or in 1..{65536 - replicas}, got {metrics_port}")
        self.nginx_executable = find_nginx(nginx)
        self.host, self.port = host, port
        self.state_dir = Path(state_dir)
        self.serve_args = tuple(serve_args)
        self.metrics_port = metrics_port
        self.peer_timeout = peer_timeout
        self.proxy_timeout = proxy_timeout
        self.replicas = [
            Replica(i, port + i, self.state_dir / f"replica-{i}", self.state_dir / f"replica-{i}.log")
            for i in range(1, replicas + 1)
        ]
        self.nginx = Nginx(self.nginx_executable, self.state_dir / "nginx" / "nginx.conf")

    @property
    def front(self) -> str:
        """Where clients connect: nginx."""
        return _address(self.host, self.port)

    @property
    def addresses(self) -> list[str]:
        """The replicas' own addresses, as nginx's upstream (and so the ring) names them."""
        return [replica.address for replica in self.replicas]

    def left_behind(self) -> list[Path]:
        """State folders of replicas beyond this cluster's (from a larger one before): their layers are served
        by no one until a replica runs on them and ``normserve rebalance --drain`` moves the layers."""
        indexes = (
            int(m.group(1)) for p in self.state_dir.glob("replica-*") if (m := re.fullmatch(r"replica-(\d+)", p.name))
        )
        return [self.state_dir / f"replica-{i}" for i in sorted(indexes) if i > len(self.replicas)]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ starting
    def start(self, timeout: float = 60.0) -> None:
        """Start every replica and nginx, and wait until the front end reports the whole cluster SERVING.

        On any failure what was started is stopped and the error says which part failed and why.
        """
        try:
            self.nginx.config.parent.mkdir(parents=True, exist_ok=True)
            http = http_config(self.addresses, self.front, call_timeout=self.proxy_timeout)
            self.nginx.config.write_text(main_config(self.nginx.config.parent, http))
            self.nginx.check()  # before any replica starts: a refused config is the quickest error
            deadline = time.monotonic() + timeout
            for replica in self.replicas:
                self._spawn(replica)
            for replica in self.replicas:
                self._wait_serving(replica, deadline)
            self.nginx.start((self.host, self.port), timeout=max(1.0, deadline - time.monotonic()))
            _wait_health(self.front, deadline, lambda: None)
        except BaseException:
            self.stop(grace=5)
            raise

    def start_replica(self, index: int, timeout: float = 60.0) -> Replica:
        """(Re)start replica ``index`` (1-based) on its port and state, and wait until it is SERVING."""
        replica = self.replicas[index - 1]
        if replica.alive():
            raise RuntimeError(f"replica {index} is running (pid {replica.process.pid})")
        self._spawn(replica)
        self._wait_serving(replica, time.monotonic() + timeout)
        return replica

    def _command(self, replica: Replica) -> list[str]:
        peers = ",".join(address for address in self.addresses if address != replica.address)
        command = [
            sys.executable,
            "-m",
            "normserve.tools",
            "serve",
            "--host",
            REPLICA_HOST,
            "--port",
            str(replica.port),
            "--state-dir",
            str(replica.state_dir),
            "--metrics-port",
            str(self.metrics_port + replica.index - 1 if self.metrics_port else 0),
        ]
        if peers:
            command += ["--peers", peers, "--peer-timeout", str(self.peer_timeout)]
        return [*command, *self.serve_args]

    def _spawn(self, replica: Replica) -> None:
        with open(replica.log_path, "a") as log:
            # Its own session: a Ctrl-C at the terminal reaches the cluster alone, which stops nginx first.
            # ... and the parent-death signal: it ends with the cluster, a SIGKILL of the cluster included.
            replica.process = children.popen(
                self._command(replica), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        replica.started = time.monotonic()
        replica.restart_at = None

    def _wait_serving(self, replica: Replica, deadline: float) -> None:
        def exited() -> None:
            if not replica.alive():
                raise RuntimeError(
                    f"replica {replica.index} ({replica.address}) exited with {replica.process.returncode}; "
                    f"the end of {replica.log_path}:\n{replica.log_tail()}"
                )

        _wait_health(replica.address, deadline, exited)

    # ------------------------------------------------------------------ running
    def supervise(self, stop: threading.Event, out: TextIO = sys.stderr, poll: float = 0.5) -> int:
        """Until ``stop`` is set: start again each replica that dies (backing off when one keeps dying).
        Returns 0 when stopped, 1 when nginx died (the cluster cannot serve without its front end)."""
        while not stop.wait(poll):
            if not self.nginx.alive():
                print(f"nginx exited with {self.nginx.process.returncode}: {self.nginx.errors()}", file=out)
                return 1
            now = time.monotonic()
            for replica in self.replicas:
                if replica.alive():
                    if now - replica.started > _STEADY_SECONDS:
                        replica.backoff = 1.0
                    continue
                if replica.restart_at is None:
                    code = replica.process.returncode
                    replica.restart_at = now + replica.backoff
                    print(
                        f"replica {replica.index} ({replica.address}) exited with {code}; starting it again in "
                        f"{replica.backoff:g} s (log {replica.log_path})",
                        file=out,
                        flush=True,
                    )
                    replica.backoff = min(_MAX_BACKOFF, replica.backoff * 2)
                elif now >= replica.restart_at:
                    self._spawn(replica)  # not waited for here: the next polls see whether it stays up
        return 0

    def stop(self, grace: float = 40.0) -> bool:
        """nginx first (no new calls; calls in progress finish), then every replica (SIGTERM: each drains for
        its --grace-period); what is still running after ``grace`` seconds is killed. True when all exited 0."""
        clean = self.nginx.stop(grace) in (0, None)
        running = [replica for replica in self.replicas if replica.alive()]
        for replica in running:
            replica.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for replica in running:
            try:
                clean &= replica.process.wait(max(0.1, deadline - time.monotonic())) == 0
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait(30)
                clean = False
        return clean


def _wait_health(target: str, deadline: float, check: Callable[[], None]) -> None:
    """Poll ``target``'s health until SERVING; ``check()`` may raise to give up early."""
    with NormClient(target, retry=RetryPolicy(attempts=1)) as client:
        while True:
            check()
            with contextlib.suppress(NormServeError):
                if client.health(timeout=1) == "SERVING":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} was not SERVING in time")
            time.sleep(0.1)


def free_port_block(count: int, host: str = REPLICA_HOST) -> int:
    """A port P with P..P+count-1 all free on ``host`` now: room for a cluster of count-1 replicas."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports on {host}")
