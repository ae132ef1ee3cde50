"""nginx in front of layer-sharded replicas: its config, the ring it hashes layers onto, and running it.

One layer's state lives on one replica. nginx routes every call about a
layer by its ``x-normserve-layer`` header (normserve.v1.routing) with
``hash $http_x_normserve_layer consistent``: a ketama ring of 160 points per
replica, so adding a replica to N moves about 1/(N+1) of the layers.
:class:`Ring` computes the same ring in Python, which is how ``normserve
rebalance`` knows each layer's owner; tests check it against nginx itself.

:func:`http_config` is the part of nginx's config that is ours (an upstream
and a server, for the ``http`` context): ``deploy/nginx/normserve.conf`` is
its output for the compose file's replicas, and ``normserve cluster`` wraps
it in a whole config of its own (:func:`main_config`) and runs nginx on it
(:class:`Nginx`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from normserve.tools import children

__all__ = [
    "POINTS_PER_REPLICA",
    "UPSTREAM",
    "Nginx",
    "NginxMissing",
    "Ring",
    "find_nginx",
    "http_config",
    "main_config",
    "replicas_in_config",
]

UPSTREAM = "normserve_replicas"
ANY_UPSTREAM = "normserve_any_replica"
#: nginx's points per unit of weight on its consistent-hash ring (ngx_http_upstream_hash_module.c).
POINTS_PER_REPLICA = 160
#: Where nginx lives when it is installed but not on a user's PATH (Debian puts it in /usr/sbin).
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
INSTALL_HINT = (
    "install it (Debian/Ubuntu: apt-get install nginx-light, or nginx; Fedora: dnf install nginx; "
    "macOS: brew install nginx) or name it with --nginx PATH"
)


class NginxMissing(RuntimeError):
    """No nginx executable where one was looked for."""


def find_nginx(explicit: str | os.PathLike | None = None) -> str:
    """The nginx executable: ``explicit``, else ``nginx`` on PATH or in the usual sbin folders."""
    if explicit is not None:
        path = shutil.which(str(explicit))
        if path is None:
            raise NginxMissing(f"{explicit} is not an executable; {INSTALL_HINT}")
        return path
    path = shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(_SBIN))
    if path is None:
        raise NginxMissing(f"nginx is not on PATH (nor in {', '.join(_SBIN)}); {INSTALL_HINT}")
    return path


class Ring:
    """nginx's consistent-hash ring over ``replicas``, the ``server`` addresses of its upstream as written.

    Each replica gets 160 points: the CRC32 of ``host \\0 port`` followed by
    the previous point's hash (little-endian), as nginx (and
    Cache::Memcached::Fast) compute them; a key's owner is the replica of the
    first point at or after CRC32(key), wrapping around.
    """

    def __init__(self, replicas: Sequence[str]) -> None:
        if not replicas:
            raise ValueError("a ring needs at least one replica")
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"a replica is named twice in {list(replicas)}")
        self.replicas = tuple(replicas)
        points: dict[int, str] = {}
        # nginx sorts the points and keeps the first of equal hashes; the sort is not stable, so which
        # replica keeps a shared point is not defined there. Sharing one needs a CRC32 collision between
        # replicas' points: with a few hundred points in 2**32 it does not happen for any sane set of names.
        for replica in self.replicas:
            host, port = _host_port(replica)
            base = host.encode() + b"\0" + port.encode()
            previous = 0
            for _ in range(POINTS_PER_REPLICA):
                previous = zlib.crc32(base + previous.to_bytes(4, "little"))
                points.setdefault(previous, replica)
        self._hashes = sorted(points)
        self._owners = [points[h] for h in self._hashes]

    def owner(self, layer: str) -> str:
        """The replica nginx sends calls about ``layer`` to."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        index = bisect.bisect_left(self._hashes, zlib.crc32(layer.encode()))
        return self._owners[index % len(self._hashes)]


def _host_port(server: str) -> tuple[str, str]:
    """How nginx splits a ``server`` address for hashing: at the last ``:`` not inside ``[...]``."""
    host, colon, port = server.rpartition(":")
    if not colon or "]" in port:
        return server, ""
    return host, port


def replicas_in_config(text: str) -> tuple[str, ...]:
    """The ``server`` addresses of the normserve upstream in an nginx config :func:`http_config` wrote."""
    block = re.search(r"upstream\s+" + UPSTREAM + r"\s*\{(.*?)\}", text, flags=re.S)
    if block is None:
        raise ValueError(f"no 'upstream {UPSTREAM} {{ ... }}' block in the config")
    lines = (line.split("#", 1)[0] for line in block.group(1).splitlines())
    return tuple(match.group(1) for line in lines if (match := re.match(r"\s*server\s+([^\s;]+)", line)))


def http_config(replicas: Sequence[str], listen: str, *, call_timeout: int = 600, connect_timeout: int = 5) -> str:
    """nginx's ``http``-context config for a front end on ``listen`` over ``replicas`` (HOST:PORT each).

    ``call_timeout``: seconds nginx waits for a replica's next bytes, or a client's,
    within a call (long streams and synchronized steps wait; the replicas enforce
    the call's own deadline). ``connect_timeout``: seconds to connect to a replica.
    """
    Ring(replicas)  # the same checks as the ring rebalance computes
    owned = "\n".join(f"    server {replica} max_fails=0;" for replica in replicas)
    anyone = "\n".join(f"    server {replica} max_fails=1 fail_timeout=5s;" for replica in replicas)
    grpc = f"""\
        grpc_connect_timeout {connect_timeout}s;
        grpc_read_timeout {call_timeout}s;
        grpc_send_timeout {call_timeout}s;
        grpc_socket_keepalive on;
        # Asks a replica for the whole cluster's ListLayers and health (it asks its --peers); set here, so that
        # only calls through the proxy get it.
        grpc_set_header x-normserve-view cluster;"""
    return f"""\
# normserve: nginx in front of layer-sharded replicas. Generated by normserve.tools.nginx.http_config();
# deploy/nginx/README.md explains every choice.

upstream {UPSTREAM} {{
    # Calls about a layer carry x-normserve-layer: equal names go to the same replica, on a consistent-hash
    # ring (adding a replica moves about 1/N of the layers).
    hash $http_x_normserve_layer consistent;
    # max_fails=0: a replica that fails stays in the ring, so its layers' calls fail (UNAVAILABLE) instead of
    # moving to a replica that lacks their state. The ring is these lines as written: change them and run
    # `normserve rebalance`.
{owned}
    # Open connections to the replicas, reused: a new HTTP/2 connection per call would cost more than the call.
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
}}

upstream {ANY_UPSTREAM} {{
    # Calls about no layer (ListLayers, health): any replica answers for the whole cluster, so a dead one is
    # skipped (passive health: one failed connection takes it out for 5 s).
{anyone}
    keepalive 16;
    keepalive_timeout 300s;
}}

server {{
    listen {listen} http2;  # gRPC is HTTP/2; TLS termination: deploy/nginx/README.md
    http2_max_concurrent_streams 1024;
    # nginx would close a client connection after 1,000 calls or 75 s idle: gRPC clients keep theirs for hours.
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    # No body limit here: the replicas check every message against --max-message-bytes and answer with a
    # gRPC status; a stream's body is all its messages, larger than any one may be.
    client_max_body_size 0;
    client_body_timeout {call_timeout}s;
    access_log off;

    location / {{
        if ($http_x_normserve_layer = "") {{
            rewrite ^ /@any$uri last;
        }}
        grpc_pass grpc://{UPSTREAM};
        # Never resend a call to another replica: it would not own the layer, and a resent Train could apply twice.
        grpc_next_upstream off;
{grpc}
    }}

    location /@any/ {{
        internal;
        rewrite ^/@any(/.*)$ $1 break;  # the gRPC method's path again
        grpc_pass grpc://{ANY_UPSTREAM};
        # The next replica when this one cannot be reached: a gRPC call is a POST, which nginx never resends
        # once sent, and any replica can answer a call about no layer.
        grpc_next_upstream error timeout;
        grpc_next_upstream_tries 3;
{grpc}
    }}
}}
"""


def main_config(prefix: Path, http: str, workers: int | str = "auto") -> str:
    """A whole nginx.conf around ``http`` (from :func:`http_config`) whose files all lie under ``prefix``."""
    # Started as root, nginx runs its workers as "nobody"; they only proxy (gRPC bodies are never buffered to
    # the temp folders), so the default is kept. Any other user's nginx runs as that user and ignores `user`.
    temp = "\n".join(f"    {kind}_temp_path {prefix / 'temp' / kind};" for kind in _TEMP_KINDS)
    body = "\n".join("    " + line if line else "" for line in http.splitlines())
    return f"""\
# Generated by `normserve cluster`: nginx in front of its replicas, with every file under {prefix}.
worker_processes {workers};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
{temp}

{body}
}}
"""


_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Nginx:
    """nginx on ``config`` (a file :func:`main_config` wrote), run in the foreground as a child process."""

    def __init__(self, executable: str, config: Path) -> None:
        self.executable = executable
        self.config = Path(config)
        self.prefix = self.config.parent
        self.process: subprocess.Popen | None = None

    def _command(self, *extra: str) -> list[str]:
        # -e: nginx opens its error log before it reads the config; the default place may not be writable.
        return [
            self.executable,
            "-p",
            str(self.prefix),
            "-c",
            str(self.config),
            "-e",
            str(self.prefix / "error.log"),
            *extra,
        ]

    def check(self) -> None:
        """``nginx -t``: RuntimeError with nginx's own words when the config is refused."""
        for kind in _TEMP_KINDS:
            (self.prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
        result = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"nginx refused {self.config}: {(result.stderr or result.stdout).strip()}")

    def start(self, listen: tuple[str, int], timeout: float = 30.0) -> None:
        """Check the config, start nginx, and wait until it accepts connections on ``listen``."""
        self.check()
        with open(self.prefix / "nginx.out", "ab") as out:
            # Its own session (Ctrl-C reaches its parent, which stops it gracefully), and it ends with its parent.
            self.process = children.popen(
                self._command("-g", "daemon off;"), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not _accepts(listen):
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.errors()}")
            if time.monotonic() > deadline:
                self.stop(0)
                raise TimeoutError(f"nginx did not listen on {listen[0]}:{listen[1]} within {timeout:g} s")
            time.sleep(0.05)

    def errors(self) -> str:
        """The tail of nginx's error log."""
        with contextlib.suppress(OSError):
            return (self.prefix / "error.log").read_text()[-2000:].strip()
        return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float) -> int | None:
        """Graceful stop (SIGQUIT: calls in progress finish, new ones are refused), then SIGTERM after ``grace``
        seconds; nginx's exit status, or None when it never ran."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                return self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.terminate()
        return self.process.wait(30)


def _accepts(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
        return True
    return False
