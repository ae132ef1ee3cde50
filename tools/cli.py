"""``normserve``: the command line (serve, cluster, rebalance, health, layers, bench).

Every flag can also come from an environment variable named after it,
``--max-layers`` from ``NORMSERVE_MAX_LAYERS``; a flag on the command line
wins over the variable. ``normserve <command> --help`` lists both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: a client command loads neither the server nor the kernels
    from normserve.server.app import ServerOptions

__all__ = ["ENV_PREFIX", "default_target", "env_name", "main"]

ENV_PREFIX = "NORMSERVE_"
_LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(flag: str, command: str = "") -> str:
    """The environment variable of a flag: ``--max-layers`` -> ``NORMSERVE_MAX_LAYERS``.

    ``serve``'s flags and the client flags that every client command shares (``--target``, ``--tls``, ...)
    are unqualified; another command's own flags carry its name (``layers --json`` ->
    ``NORMSERVE_LAYERS_JSON``), so that each variable means one thing whichever command reads it.
    """
    scope = command.replace("-", "_").upper() + "_" if command else ""
    return ENV_PREFIX + scope + flag.lstrip("-").replace("-", "_").upper()


class BadEnvironment(ValueError):
    """An environment variable whose value its flag would refuse."""


def _number(kind: type, minimum: float, inclusive: bool = True, maximum: float = math.inf) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_positive_int = _number(int, 0, inclusive=False)
_port = _number(int, 0)
_seconds = _number(float, 0, inclusive=False)
#: gRPC takes connection ages in int32 milliseconds.
_connection_seconds = _number(float, 0, inclusive=False, maximum=(2**31 - 1) // 1000)
_peer_seconds = _number(float, 0, inclusive=False, maximum=60)


def _peers(text: str) -> tuple[str, ...]:
    from normserve.server.cluster_views import parse_peers

    try:
        return parse_peers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Options:
    """Adds flags to a parser, each with its environment variable as the default when set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str], command: str = "") -> None:
        self.parser = parser
        self.environ = environ
        self.command = command  # qualifies the variables of the command's own flags (see env_name)

    def add(self, flag: str, **kwargs: Any) -> None:
        name = env_name(flag, self.command)
        help_text = kwargs.get("help", "")
        if "(default" not in help_text and kwargs.get("default") not in (None, "", (), False):
            help_text += f" (default: {kwargs['default']})"  # each default shown once, by one rule
        kwargs["help"] = f"{help_text} [env {name}]".strip()
        if name in self.environ:
            kwargs["default"] = self._from_env(name, self.environ[name], kwargs)
        self.parser.add_argument(flag, **kwargs)

    @staticmethod
    def _from_env(name: str, text: str, kwargs: Mapping[str, Any]) -> Any:
        if kwargs.get("action") == "store_true":
            if text.strip().lower() not in _TRUE + _FALSE:
                raise BadEnvironment(f"{name}={text!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")
            return text.strip().lower() in _TRUE
        try:
            value = kwargs.get("type", str)(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise BadEnvironment(f"{name}={text!r}: {exc}") from None
        if "choices" in kwargs and value not in kwargs["choices"]:
            raise BadEnvironment(f"{name}={text!r}: choose from {', '.join(kwargs['choices'])}")
        return value


def _serve_options(add: Callable[..., None]) -> None:
    from normserve.server import logs
    from normserve.server.app import ServerOptions

    defaults = ServerOptions()
    add("--host", default=defaults.host, help="address to listen on (0.0.0.0 or :: for all)")
    add("--port", type=_port, default=defaults.port, help="port to listen on; 0 picks a free one")
    add("--device", default=defaults.device, help="default device of new layers: auto, cpu, cuda or cuda:<k>")
    add("--state-dir", type=Path, default=defaults.state_dir, help="folder of the SQLite state")
    add("--workers", type=_positive_int, default=defaults.workers, help="kernel threads")
    add(
        "--sync",
        choices=("full", "normal"),
        default=defaults.sqlite_synchronous.lower(),
        help="SQLite synchronous mode: full survives power loss; normal survives a killed process only",
    )
    add(
        "--layers-file",
        type=Path,
        help="JSON file of layers to create at start, idempotently (docs/service.md: declarative layers)",
    )
    add(
        "--keep-versions",
        type=_positive_int,
        default=defaults.keep_versions,
        help="states of each layer kept in --state-dir, the current one included, to read (GetState version) "
        "and roll back to (normserve rollback)",
    )
    # Limits
    add("--max-layers", type=_positive_int, default=defaults.max_layers, help="most layers the server holds")
    add(
        "--max-message-bytes",
        type=_positive_int,
        default=defaults.limits.max_message_bytes,
        help="largest gRPC message either way; a unary answer that would not fit is refused before any work",
    )
    add("--max-tensor-bytes", type=_positive_int, default=defaults.limits.max_tensor_bytes, help="largest tensor")
    add(
        "--max-tensor-elements",
        type=_positive_int,
        default=defaults.limits.max_tensor_elements,
        help="most elements in one tensor",
    )
    add(
        "--max-layer-state-bytes",
        type=_positive_int,
        default=defaults.max_layer_state_bytes,
        help="bytes of one layer's parameters and running statistics; a larger layer is refused at CreateLayer",
    )
    add(
        "--max-state-bytes",
        type=_positive_int,
        default=defaults.max_state_bytes,
        help="bytes of the state of all layers together; a CreateLayer past it is refused",
    )
    add(
        "--max-concurrent-rpcs",
        type=_positive_int,
        default=None,
        help="calls in progress at once; more answer RESOURCE_EXHAUSTED (default: no limit)",
    )
    add(
        "--default-deadline",
        type=_seconds,
        default=defaults.limits.default_deadline,
        help="seconds a call without a deadline may wait for a layer's earlier writes or a kernel thread, and "
        "that any stream may wait on a peer that sends or takes nothing",
    )
    add(
        "--grace-period",
        type=_number(float, 0),
        default=defaults.grace_period,
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT/SIGHUP",
    )
    add(
        "--forward-cache-bytes",
        type=_number(int, 0),
        default=defaults.forward_cache_bytes,
        help="bytes of Train inputs kept for Gradient by forward_id (least recently used out; 0: none)",
    )
    add(
        "--sync-timeout",
        type=_seconds,
        default=defaults.sync_timeout,
        help="seconds the first rank of a synchronized step (SyncBatchNorm) waits for the others before the "
        "step fails for all with DEADLINE_EXCEEDED",
    )
    add(
        "--max-connection-age",
        type=_connection_seconds,
        default=defaults.max_connection_age,
        help="seconds after which a client connection is asked to reconnect (clients do so by themselves); "
        "with the grace below, no call lives longer on one connection",
    )
    add(
        "--max-connection-age-grace",
        type=_number(float, 0, maximum=(2**31 - 1) // 1000),
        default=defaults.max_connection_age_grace,
        help="seconds calls on an aged connection get to finish before it is closed",
    )
    add(
        "--max-connection-idle",
        type=_connection_seconds,
        default=defaults.max_connection_idle,
        help="seconds a client connection without calls stays open (clients reconnect by themselves)",
    )
    add(
        "--max-connections",
        type=_positive_int,
        default=None,
        help="client connections open at once; more are closed as they arrive (default: what the open-files "
        "limit leaves, at most 4096)",
    )
    add(
        "--allow-compression",
        action="store_true",
        help="accept gzip/deflate-compressed requests; gRPC inflates them (up to --max-message-bytes) before "
        "any check, the token's included, so only with trusted clients",
    )
    add(
        "--max-world-size",
        type=_number(int, 1, maximum=1 << 20),
        default=defaults.max_world_size,
        help="most ranks in one synchronized step (SyncGroup.world_size)",
    )
    add(
        "--shared-memory",
        action="store_true",
        help="serve tensors in clients' POSIX shared memory (RegisterSharedMemory); any caller can then read "
        "and write the shared-memory objects this server's user can open: trusted clients on this host only",
    )
    add(
        "--max-shared-memory-regions",
        type=_positive_int,
        default=defaults.max_shared_memory_regions,
        help="shared-memory regions registered at once (each holds a file descriptor); registrations also "
        "stop while fewer than a quarter of RLIMIT_NOFILE (at least 256) descriptors are left for connections",
    )
    add(
        "--max-shared-memory-regions-per-client",
        type=_positive_int,
        default=defaults.max_shared_memory_regions_per_client,
        help="shared-memory regions one client (one connection) may hold registered",
    )
    # Layer-sharded replicas behind a proxy (deploy/nginx/, `normserve cluster`)
    add(
        "--peers",
        type=_peers,
        default=defaults.peers,
        help="the other replicas' HOST:PORT, comma-separated: ListLayers and health checks that the proxy marks "
        "(x-normserve-view: cluster) then answer for the whole cluster; calls made to this replica directly do not",
    )
    add(
        "--peer-timeout",
        type=_peer_seconds,
        default=defaults.peer_timeout,
        help="seconds each call to a peer may take (a whole-cluster view waits at most this long)",
    )
    # Security
    add("--tls-cert", type=Path, help="PEM certificate chain of the server; with --tls-key, serve TLS only")
    add("--tls-key", type=Path, help="PEM private key of --tls-cert")
    add("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    add(
        "--auth-token-file",
        type=Path,
        help="file of accepted bearer tokens, one per line, re-read when it changes; every RPC but health "
        "then needs 'authorization: Bearer <token>'",
    )
    # Observability
    add("--metrics-port", type=_port, default=defaults.metrics_port, help="Prometheus /metrics port; 0 turns it off")
    add("--metrics-host", help="address of the metrics endpoint (default: --host)")
    add("--log-level", choices=_LOG_LEVELS, default="info", help="log verbosity (debug logs every call)")
    add("--log-format", choices=logs.FORMATS, default="text", help="log lines as text or JSON (to stderr)")
    add(
        "--debug-libraries",
        action="store_true",
        help="with --log-level debug, the debug lines of asyncio, gRPC (its C core too) and numba as well",
    )


#: serve's wildcard addresses, and the address on this host that reaches a server listening on one.
_THIS_HOST = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def default_target(environ: Mapping[str, str]) -> str:
    """Where ``normserve serve`` listens by the same environment: NORMSERVE_HOST (127.0.0.1 when unset or a
    wildcard) and NORMSERVE_PORT (50051), so one setting points both the server and the client commands."""
    host = environ.get(env_name("--host"), "").strip()
    host = _THIS_HOST.get(host, host)
    port = environ.get(env_name("--port"), "").strip() or "50051"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _client_options(add: Callable[..., None], environ: Mapping[str, str]) -> None:
    add(
        "--target",
        default=default_target(environ),
        help="server HOST:PORT (default: serve's NORMSERVE_HOST, 127.0.0.1 when unset or a wildcard, and "
        "NORMSERVE_PORT, 50051 when unset)",
    )
    add("--timeout", type=_seconds, default=5.0, help="seconds to wait for the answer")
    add("--tls", action="store_true", help="use TLS (implied by the --tls-* options)")
    add("--tls-ca", type=Path, help="PEM CA bundle that signed the server's certificate (default: system roots)")
    add("--tls-client-cert", type=Path, help="PEM client certificate, for a server that requires mutual TLS")
    add("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    add("--tls-server-name", help="the name in the server's certificate, when it differs from the target host")
    add("--token-file", type=Path, help="file whose first line is the bearer token to send")


def _parser(environ: Mapping[str, str], only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the flags of those commands alone (the others keep their help line).

    Building serve's flags imports the server (its defaults), bench's the client: ``main`` builds only the
    command at hand, so ``normserve health`` and ``normserve --help`` load neither the server nor the kernels.
    """

    def wanted(name: str) -> bool:
        return only is None or name in only

    parser = argparse.ArgumentParser(
        prog="normserve",
        description=f"Normalization layers ({', '.join(_kind_names())}) served by name. "
        "Every flag can also be set by the environment variable shown in brackets; flags win.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server until SIGTERM/SIGINT/SIGHUP; layer state persists in --state-dir. "
        "Every flag can also be set by the environment variable shown in brackets; flags win.",
    )
    if wanted("serve"):
        _serve_options(_Options(serve, environ).add)

    bench = commands.add_parser(
        "bench",
        help="time the service against a bare gRPC echo (needs the bench extra)",
        description="Time Train/Infer/Gradient over bytes, streams and shared memory against a bare gRPC "
        "echo of the same bytes, for payloads from 4 KB to 64 MB and 8 concurrent clients; print a table "
        "(progress goes to stderr), write JSON and a PNG plot. Without --target it starts a server of its own.",
    )
    if wanted("bench"):
        from normserve.tools.bench import add_arguments as bench_options

        bench_options(_Options(bench, environ, "bench").add)

    _cluster_parser(commands, environ, wanted("cluster"))
    _rebalance_parser(commands, environ)
    nginx = commands.add_parser(
        "nginx-config",
        help="print the nginx config for replicas behind a front end",
        description="Print nginx's http-context config (an upstream over the replicas, routed by consistent "
        "hashing of x-normserve-layer, and a gRPC server in front) for a conf.d folder; deploy/nginx/normserve.conf "
        "is its output for the compose file's replicas.",
    )
    add = _Options(nginx, environ, "nginx-config").add
    add("--replicas", type=_replica_list, required=True, help="the replicas' HOST:PORT, comma-separated")
    add("--listen", type=_listen, default="50051", help="nginx's listen address: PORT or HOST:PORT")
    add("--proxy-timeout", **_PROXY_TIMEOUT)

    for name, (text, own_options) in _CLIENT_COMMANDS.items():
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _client_options(_Options(command, environ).add, environ)
        own_options(command, _Options(command, environ, name).add)
    _state_dir_parsers(commands, environ, wanted)
    return parser


def _kind_names() -> list[str]:
    """The kinds, as the wire names them (the proto's Kind enum: the one list of them)."""
    from normserve.v1 import kinds

    return kinds.kind_names()


def _health_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    own("--service", default="", help="service to check; empty (default) means the whole server")


def _layers_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    own("--prefix", default="", help="only names starting with this")
    own("--json", action="store_true", help="one JSON object per layer (64-bit integers as JSON numbers)")


def _describe_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    command.add_argument("name", help="the layer")
    own("--json", action="store_true", help="one JSON object (the layer's description and a summary of its state)")


def _delete_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    command.add_argument("name", help="the layer")
    _confirm(command, "delete the layer and its state for good")


def _export_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    from normserve.tools.state_files import FORMATS

    command.add_argument("name", help="the layer")
    command.add_argument("file", type=Path, help="where to write its state (.pt: torch.save; .npz: NumPy)")
    own("--format", choices=FORMATS, help="the file's format (default: by its extension)")


def _import_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    from normserve.tools.state_files import FORMATS

    command.add_argument("name", help="the layer (it must exist: create it with the config `describe` shows)")
    command.add_argument("file", type=Path, help="a state file: .pt (a torch state_dict) or .npz")
    own("--format", choices=FORMATS, help="the file's format (default: by its extension)")


def _rollback_options(command: argparse.ArgumentParser, own: Callable[..., None]) -> None:
    command.add_argument("name", help="the layer's name")
    command.add_argument(
        "version",
        type=_positive_int,
        help="the version to go back to: one of those the server keeps (the layer's oldest_version to version)",
    )


def _confirm(command: argparse.ArgumentParser, what: str) -> None:
    """--yes, from the command line only: a confirmation that an environment variable gave would confirm nothing."""
    command.add_argument("--yes", action="store_true", help=f"{what} (asked for: without it the command refuses)")


#: The commands that ask a server: (their help line, their own flags); every one takes the client flags too.
_CLIENT_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser, Callable[..., None]], None]]] = {
    "health": ("exit 0 when the server is SERVING", _health_options),
    "layers": ("list the server's layers", _layers_options),
    "describe": ("print one layer's config, version and a summary of its state", _describe_options),
    "delete": ("delete a layer and its state (needs --yes)", _delete_options),
    "export": ("write a layer's state to a file that torch.load (.pt) or NumPy (.npz) reads", _export_options),
    "import": ("replace a layer's state with a file's (.pt or .npz), all or nothing", _import_options),
    "rollback": ("make a kept version's state a layer's state again (as a new version)", _rollback_options),
}


def _state_dir_parsers(commands: Any, environ: Mapping[str, str], wanted: Callable[[str], bool]) -> None:
    """backup and restore work on a state directory's database file, on the server's host."""

    def state_dir(parser: argparse.ArgumentParser) -> None:
        if wanted(parser.prog.split()[-1]):
            from normserve.server.app import ServerOptions

            help_text = "the server's state folder (serve's --state-dir)"
            _Options(parser, environ).add("--state-dir", type=Path, default=ServerOptions().state_dir, help=help_text)

    backup = commands.add_parser(
        "backup",
        help="copy the state database to a file, consistently, while the server runs",
        description="Copy --state-dir's SQLite database to DEST with SQLite's online backup: a consistent "
        "snapshot (every layer as of one committed write) taken while the server serves, without stopping "
        "its writes. DEST is one self-contained file; `normserve restore` puts it back.",
    )
    backup.add_argument("dest", type=Path, help="the backup file to write (replaced atomically if it exists)")
    state_dir(backup)
    restore = commands.add_parser(
        "restore",
        help="put a backup back as a stopped server's state",
        description="Replace --state-dir's database with the backup SRC. Refuses while a server holds the "
        "state dir (stop it first) and, unless --yes, when the state dir holds layers already; the database "
        "it replaces is kept beside it as normserve.sqlite3.before-restore-<time>. The backup is checked "
        "(SQLite integrity, normserve schema) before anything changes.",
    )
    restore.add_argument("src", type=Path, help="a file `normserve backup` wrote")
    state_dir(restore)
    _confirm(restore, "replace a state dir that holds layers")


def _cluster_parser(commands: Any, environ: Mapping[str, str], wanted: bool) -> None:
    cluster = commands.add_parser(
        "cluster",
        help="run N replicas behind nginx on this host (layers sharded by name)",
        description="Run N `normserve serve` replicas (replica i on 127.0.0.1:PORT+i, state in STATE_DIR/replica-i) "
        "and nginx in front of them on HOST:PORT, routing each layer's calls to one replica by consistent hashing "
        "of its name (deploy/nginx/README.md). Waits until all are SERVING; restarts a replica that dies; SIGTERM "
        "stops nginx, then drains and stops the replicas. Any other flag is a `normserve serve` flag and goes to "
        "every replica (e.g. --workers 1 --sync normal). Needs nginx (apt-get install nginx-light).",
    )
    if not wanted:
        return
    from normserve.tools.cluster import MAX_REPLICAS

    add = _Options(cluster, environ, "cluster").add
    add("--replicas", type=_number(int, 1, maximum=MAX_REPLICAS), default=2, help="replicas to run")
    add("--port", type=_number(int, 1, maximum=65534), default=50051, help="nginx's port; replica i uses PORT+i")
    add("--host", default="127.0.0.1", help="nginx's address (0.0.0.0 or :: for all); replicas listen on 127.0.0.1")
    add("--state-dir", type=Path, default=Path("normserve-cluster"), help="folder of the replicas' state and logs")
    add("--metrics-port", type=_number(int, 0, maximum=65535), default=0, help="replica i's /metrics on M+i-1; 0: off")
    add(
        "--peer-timeout",
        type=_peer_seconds,
        default=2.0,
        help="seconds a replica waits for each other replica in a whole-cluster ListLayers or health check",
    )
    add("--proxy-timeout", **_PROXY_TIMEOUT)
    add(
        "--startup-timeout",
        type=_number(float, 0, inclusive=False, maximum=600),
        default=120.0,
        help="seconds to wait until every replica and nginx serve",
    )
    add("--nginx", help="the nginx executable (default: nginx on PATH, or in /usr/sbin)")


_PROXY_TIMEOUT = {
    "type": _number(int, 1, maximum=86400),
    "default": 600,
    "help": "seconds nginx waits for the next bytes of a call, either way (long streams, synchronized steps)",
}


def _rebalance_parser(commands: Any, environ: Mapping[str, str]) -> None:
    rebalance = commands.add_parser(
        "rebalance",
        help="move each layer to the replica that owns it after the replicas changed",
        description="Ask every replica (directly) for its layers and move each one that lies on a replica other "
        "than its owner on nginx's consistent-hash ring: GetState, CreateLayer and SetState (expected_version) "
        "on the owner, then DeleteLayer on the old replica. Run it once nginx routes by the new replica list. "
        "Safe to rerun; never overwrites a copy that took Trains of its own (reported as CONFLICT). Exits 1 "
        "when a layer could not be moved.",
    )
    add = _Options(rebalance, environ, "rebalance").add
    which = rebalance.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--replicas",
        type=_replica_list,
        help="the replicas' HOST:PORT, comma-separated, exactly as nginx's upstream names them",
    )
    which.add_argument("--nginx-config", type=Path, help="read the replicas from the upstream of this nginx config")
    add(
        "--drain",
        type=_peers,
        default=(),
        help="replicas leaving the ring (HOST:PORT, comma-separated): all their layers move to their owners",
    )
    add("--dry-run", action="store_true", help="print the moves without making them")
    add("--timeout", type=_seconds, default=30.0, help="seconds each call may take")
    add("--token-file", type=Path, help="file whose first line is the bearer token to send")


def _listen(text: str) -> str:
    port = text.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected PORT or HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def _replica_list(text: str) -> tuple[str, ...]:
    replicas = _peers(text)
    if not replicas:
        raise argparse.ArgumentTypeError("name at least one replica")
    return replicas


def _bench(args: argparse.Namespace) -> int:
    try:
        from normserve.tools import bench, children

        children.exit_on_signals()  # SIGTERM unwinds, stopping the servers it started
        bench.run(args)
    except ImportError as exc:
        print(f"normserve bench needs {exc.name}: from the clone, pip install -e '.[bench]'", file=sys.stderr)
        return 2
    return 0


def _server_options(args: argparse.Namespace) -> ServerOptions:
    from normserve.server.app import ServerOptions
    from normserve.server.security import TlsFiles
    from normserve.server.servicer import Limits

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both to serve TLS, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    return ServerOptions(
        host=args.host,
        port=args.port,
        device=args.device,
        state_dir=args.state_dir,
        workers=args.workers,
        limits=Limits(
            max_tensor_bytes=args.max_tensor_bytes,
            max_tensor_elements=args.max_tensor_elements,
            default_deadline=args.default_deadline,
            max_message_bytes=args.max_message_bytes,
        ),
        max_layer_state_bytes=args.max_layer_state_bytes,
        max_state_bytes=args.max_state_bytes,
        keep_versions=args.keep_versions,
        layers_file=args.layers_file,
        max_layers=args.max_layers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_period=args.grace_period,
        sqlite_synchronous=args.sync.upper(),
        tls=None if args.tls_cert is None else TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca),
        auth_token_file=args.auth_token_file,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        shared_memory=args.shared_memory,
        max_shared_memory_regions=args.max_shared_memory_regions,
        max_shared_memory_regions_per_client=args.max_shared_memory_regions_per_client,
        forward_cache_bytes=args.forward_cache_bytes,
        sync_timeout=args.sync_timeout,
        max_world_size=args.max_world_size,
        max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace,
        max_connection_idle=args.max_connection_idle,
        max_connections=args.max_connections,
        compression=args.allow_compression,
        peers=args.peers,
        peer_timeout=args.peer_timeout,
    )


def _serve(options: ServerOptions, args: argparse.Namespace) -> int:
    import asyncio

    from normserve.server import logs
    from normserve.server.app import run

    logs.configure(args.log_level, args.log_format, args.debug_libraries)
    try:
        asyncio.run(run(options))
    except Exception as exc:  # startup failures: one clear line, not a traceback
        logging.getLogger("normserve").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        return 1
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return None
    lines = args.token_file.read_text().split()
    return lines[0] if lines else None


def _client(args: argparse.Namespace) -> Any:
    """A client for one question: no retries, so a healthcheck answers within --timeout."""
    from normserve.client import NormClient, RetryPolicy

    return NormClient(
        args.target,
        timeout=args.timeout,
        retry=RetryPolicy(attempts=1),
        token=_token(args),
        tls=args.tls or None,
        ca_cert=args.tls_ca,
        client_cert=args.tls_client_cert,
        client_key=args.tls_client_key,
        server_name=args.tls_server_name,
    )


def _ask(args: argparse.Namespace, question: Callable[[Any], Any]) -> Any:
    """``question(client)``'s answer; a failure prints one line and exits 1."""
    from normserve.client import NormServeError

    try:
        with _client(args) as client:
            return question(client)
    except (NormServeError, OSError, ValueError) as error:
        print(f"{args.target}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _health(args: argparse.Namespace) -> int:
    status = _ask(args, lambda client: client.health(args.service))
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


def _message_dict(message: Any) -> dict[str, Any]:
    """A message as a JSON object, every field shown and 64-bit integers as numbers (proto3's JSON mapping
    writes them as strings, for JavaScript's sake; a person and ``jq`` read numbers)."""
    from google.protobuf import json_format

    plain = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, plain)


def _numbers(descriptor: Any, plain: dict[str, Any]) -> dict[str, Any]:
    for name, value in plain.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        values = value if isinstance(value, list) else [value]
        if field.message_type is not None:
            for item in values:
                if isinstance(item, dict):  # not a well-known type that JSON writes as a string
                    _numbers(field.message_type, item)
        elif field.cpp_type in _INT64_TYPES:
            plain[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return plain


#: protobuf's C++ types of the 64-bit integer fields (int64, uint64, sint64, fixed64, sfixed64).
_INT64_TYPES = (2, 4)  # FieldDescriptor.CPPTYPE_INT64, CPPTYPE_UINT64


def _layer_row(layer: Any) -> str:
    info = layer.info
    if info.restore_error:
        return f"{layer.name}\tUNRESTORABLE\t-\t-\t-\t-\t{info.restore_error}"
    shape = "x".join(map(str, info.param_shape)) or "-"
    return f"{layer.name}\t{layer.kind}\t{shape}\t{info.config.device}\t{layer.version}\t{info.num_batches_tracked}"


_LAYER_HEADER = "NAME\tKIND\tSHAPE\tDEVICE\tVERSION\tBATCHES"


def _layers(args: argparse.Namespace) -> int:
    layers = _ask(args, lambda client: client.list_layers(args.prefix))
    if args.json:
        for layer in layers:
            print(json.dumps(_message_dict(layer.info)))
        return 0
    if not layers:
        where = f" named {args.prefix}*" if args.prefix else ""
        print(f"{args.target}: no layers{where}", file=sys.stderr)  # stdout stays a (headerless) empty table
        return 0
    print(_LAYER_HEADER)
    for layer in layers:
        print(_layer_row(layer))
    return 0


def _state_summary(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    import numpy as np

    summary = {}
    for key, value in state.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
        if array.size and array.dtype.kind == "f":
            values = array.astype(np.float64)
            entry |= {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}
        elif array.size:
            entry["value"] = array.tolist()
        summary[key] = entry
    return summary


def _describe(args: argparse.Namespace) -> int:
    from normserve.client import DataLoss

    def question(client: Any) -> tuple[Any, dict[str, Any] | None]:
        layer = client.layer(args.name)
        try:
            return layer.info, _state_summary(layer.state_dict())
        except DataLoss:  # an unrestorable layer has no state to read; its description says why
            return layer.info, None

    info, state = _ask(args, question)
    described = {"layer": _message_dict(info), "state": state}
    if args.json:
        print(json.dumps(described))
        return 0
    layer = described["layer"]
    config = layer.pop("config")
    print(f"name: {layer.pop('name')}")
    print(f"kind: {config.pop('kind', 'kind_unspecified').lower()}")
    print("config: " + " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()))
    for key in ("version", "num_batches_tracked", "param_shape", "state_keys", "restore_error"):
        print(f"{key}: {json.dumps(layer.pop(key, None))}")
    print("stats: " + " ".join(f"{k}={json.dumps(v)}" for k, v in layer.pop("stats", {}).items()))
    if state is None:
        print("state: none (the layer could not be restored)")
    else:
        print("state:" + ("" if state else " empty (the layer keeps no tensors)"))
    for key, entry in (state or {}).items():
        shape = "x".join(map(str, entry.pop("shape"))) or "scalar"
        print(
            f"  {key}\t{entry.pop('dtype')}\t{shape}\t"
            + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
        )
    return 0


def _delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"normserve delete: refusing to delete {args.name!r} and its state without --yes", file=sys.stderr)
        return 2
    deleted = _ask(args, lambda client: client.delete_layer(args.name))
    print(f"deleted {deleted.name} (it was at version {deleted.version})")
    return 0


@contextlib.contextmanager
def _failing_with(args: argparse.Namespace, *errors: type[Exception]) -> Iterator[None]:
    """``errors`` raised in the block: one line on stderr and exit status 1."""
    try:
        yield
    except errors as exc:
        print(f"normserve {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _export(args: argparse.Namespace) -> int:
    from normserve.tools.state_files import StateFileError, file_format, write_state

    with _failing_with(args, StateFileError, OSError):
        file_format(args.file, args.format)  # a bad name fails before the server is asked
        state = _ask(args, lambda client: client.layer(args.name).state_dict())
        kind = write_state(args.file, state, args.format)
    print(f"wrote {args.name}'s state ({', '.join(state)}) to {args.file} ({kind})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from normserve.tools.state_files import StateFileError, read_state

    with _failing_with(args, StateFileError, OSError):
        state = read_state(args.file, args.format)
    info = _ask(args, lambda client: client.layer(args.name).load_state_dict(state))
    print(f"loaded {args.file} into {args.name}: now at version {info.version}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    from normserve.tools.backup import BackupError, backup

    with _failing_with(args, BackupError, OSError):
        copied = backup(args.state_dir, args.dest)
    print(f"backed up {copied.layers} layer(s) from {args.state_dir} to {copied.path}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from normserve.tools.backup import BackupError, restore

    with _failing_with(args, BackupError, OSError):
        copied = restore(args.src, args.state_dir, replace=args.yes)
    kept = f"; the database it replaced is {copied.kept}" if copied.kept else ""
    print(f"restored {copied.layers} layer(s) from {args.src} into {args.state_dir}{kept}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    layer = _ask(args, lambda client: client.rollback_layer(args.name, args.version))
    print(
        f"{layer.name}: version {layer.version} holds the state of version {args.version} "
        f"(kept: {layer.oldest_version} to {layer.version})"
    )
    return 0


def _replica_flags(extra: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    """``normserve cluster``'s flags for its replicas, checked as ``normserve serve`` checks them (a bad one
    exits 2 here, before anything starts); the ones the cluster sets itself are refused."""
    serve = argparse.ArgumentParser(prog="normserve cluster", description="replica flags")
    _serve_options(_Options(serve, environ).add)
    flags = serve.parse_args(extra)
    own = [f"--{dest.replace('_', '-')}" for dest in _CLUSTER_SETS if getattr(flags, dest) != serve.get_default(dest)]
    if own:
        serve.error(f"{', '.join(own)}: the cluster sets these for each replica; see normserve cluster --help")
    return flags


#: The serve flags `normserve cluster` gives each replica itself.
_CLUSTER_SETS = ("host", "port", "state_dir", "peers", "peer_timeout", "metrics_port")


def _cluster(args: argparse.Namespace, extra: Sequence[str], environ: Mapping[str, str]) -> int:
    from normserve.tools.cluster import Cluster
    from normserve.tools.nginx import NginxMissing

    grace = _replica_flags(extra, environ).grace_period
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    try:
        cluster = Cluster(
            args.replicas,
            args.port,
            args.state_dir,
            host=args.host,
            serve_args=extra,
            nginx=args.nginx,
            metrics_port=args.metrics_port,
            peer_timeout=args.peer_timeout,
            proxy_timeout=args.proxy_timeout,
        )
    except (NginxMissing, ValueError) as exc:
        print(f"normserve cluster: error: {exc}", file=sys.stderr)
        return 2
    try:
        cluster.start(args.startup_timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"normserve cluster: {exc}", file=sys.stderr)
        return 1
    print(f"normserve cluster: serving on {cluster.front} (nginx: {cluster.nginx.config})", flush=True)
    for replica in cluster.replicas:
        print(
            f"  replica {replica.index}: {replica.address}, pid {replica.process.pid}, state {replica.state_dir}, "
            f"log {replica.log_path}",
            flush=True,
        )
    for folder in cluster.left_behind():
        print(
            f"  warning: {folder} holds the state of a replica this cluster does not run, so its layers are not "
            "served: run `normserve serve --state-dir` on it and `normserve rebalance --drain` its address",
            flush=True,
        )
    code = cluster.supervise(stop)
    print("normserve cluster: stopping nginx, then the replicas (they drain in-flight calls)", flush=True)
    clean = cluster.stop(grace=grace + 10)
    return code or (0 if clean else 1)


def _nginx_config(args: argparse.Namespace) -> int:
    from normserve.tools.nginx import http_config

    print(http_config(args.replicas, args.listen, call_timeout=args.proxy_timeout), end="")
    return 0


def _rebalance(args: argparse.Namespace) -> int:
    from normserve.client import NormClient
    from normserve.tools.nginx import replicas_in_config
    from normserve.tools.rebalance import rebalance

    try:
        replicas = args.replicas or replicas_in_config(args.nginx_config.read_text())
    except (OSError, ValueError) as exc:
        print(f"normserve rebalance: error: {args.nginx_config}: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        clients = {
            r: stack.enter_context(NormClient(r, timeout=args.timeout, token=_token(args)))
            for r in (*replicas, *args.drain)
        }
        try:
            moves = rebalance(replicas, clients, drain=args.drain, dry_run=args.dry_run)
        except (RuntimeError, ValueError) as exc:
            print(f"normserve rebalance: {exc}", file=sys.stderr)
            return 1
    failed = sum(not move.ok for move in moves)
    done = "would move" if args.dry_run else "moved"
    print(f"{len(moves) - failed} of {len(moves)} misplaced layer(s) {done} over {len(replicas)} replica(s)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _parser(environ, only=[word for word in argv[:1] if not word.startswith("-")])
    except BadEnvironment as exc:
        print(f"normserve: error: {exc}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if args.command == "cluster":
        return _cluster(args, extra, environ)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        try:
            options = _server_options(args)
        except ValueError as exc:
            parser.error(str(exc))
        return _serve(options, args)
    return {
        "health": _health,
        "layers": _layers,
        "rollback": _rollback,
        "describe": _describe,
        "delete": _delete,
        "export": _export,
        "import": _import,
        "backup": _backup,
        "restore": _restore,
        "bench": _bench,
        "rebalance": _rebalance,
        "nginx-config": _nginx_config,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
