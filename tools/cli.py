"""``normserve``: the command line (serve, health, layers, bench).

Every flag can also come from an environment variable named after it,
``--max-layers`` from ``NORMSERVE_MAX_LAYERS``; a flag on the command line
wins over the variable. ``normserve <command> --help`` lists both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from normserve.server import logs
from normserve.server.app import ServerOptions, run
from normserve.server.security import TlsFiles
from normserve.server.servicer import Limits

__all__ = ["ENV_PREFIX", "env_name", "main"]

ENV_PREFIX = "NORMSERVE_"
_LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(flag: str) -> str:
    """The environment variable of a flag: ``--max-layers`` -> ``NORMSERVE_MAX_LAYERS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


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


class _Options:
    """Adds flags to a parser, each with its environment variable as the default when set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def add(self, flag: str, **kwargs: Any) -> None:
        name = env_name(flag)
        kwargs["help"] = f"{kwargs.get('help', '')} [env {name}]".strip()
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


def _serve_options(add: Callable[..., None], defaults: ServerOptions) -> None:
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
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT",
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
        "--max-world-size",
        type=_positive_int,
        default=defaults.max_world_size,
        help="most ranks in one synchronized step (SyncGroup.world_size)",
    )
    add(
        "--shared-memory",
        action="store_true",
        help="serve tensors in clients' POSIX shared memory (RegisterSharedMemory); any caller can then read "
        "and write the shared-memory objects this server's user can open: trusted clients on this host only",
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


def _client_options(add: Callable[..., None], environ: Mapping[str, str]) -> None:
    default_target = f"127.0.0.1:{environ.get(env_name('--port'), '50051')}"
    add("--target", default=default_target, help="server HOST:PORT (default: 127.0.0.1 and NORMSERVE_PORT or 50051)")
    add("--timeout", type=_seconds, default=5.0, help="seconds to wait for the answer")
    add("--tls", action="store_true", help="use TLS (implied by the --tls-* options)")
    add("--tls-ca", type=Path, help="PEM CA bundle that signed the server's certificate (default: system roots)")
    add("--tls-client-cert", type=Path, help="PEM client certificate, for a server that requires mutual TLS")
    add("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    add("--tls-server-name", help="the name in the server's certificate, when it differs from the target host")
    add("--token-file", type=Path, help="file whose first line is the bearer token to send")


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normserve",
        description="Normalization layers (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm) served by name. "
        "Every flag can also be set by the environment variable shown in brackets; flags win.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server until SIGTERM/SIGINT; layer state persists in --state-dir. "
        "Every flag can also be set by the environment variable shown in brackets; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _serve_options(_Options(serve, environ).add, ServerOptions())

    bench = commands.add_parser(
        "bench",
        help="time the service against a bare gRPC echo (needs normserve[bench])",
        description="Time Train/Infer/Gradient over bytes, streams and shared memory against a bare gRPC "
        "echo of the same bytes, for payloads from 4 KB to 64 MB and 8 concurrent clients; print a table, "
        "write JSON and a PNG plot. Without --target it starts a server of its own.",
    )
    from normserve.tools.bench import add_arguments as bench_options

    bench_options(_Options(bench, environ).add)

    for name, text in (("health", "exit 0 when the server is SERVING"), ("layers", "list the server's layers")):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        options = _Options(command, environ)
        _client_options(options.add, environ)
        if name == "health":
            options.add("--service", default="", help="service to check; empty (default) means the whole server")
        else:
            options.add("--prefix", default="", help="only names starting with this")
            options.add("--json", action="store_true", help="one JSON object per layer")
    return parser


def _bench(args: argparse.Namespace) -> int:
    try:
        from normserve.tools import bench

        bench.run(args)
    except ImportError as exc:
        print(f"normserve bench needs {exc.name}: pip install 'normserve[bench]'", file=sys.stderr)
        return 2
    return 0


def _server_options(args: argparse.Namespace) -> ServerOptions:
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
        max_layers=args.max_layers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_period=args.grace_period,
        sqlite_synchronous=args.sync.upper(),
        tls=None if args.tls_cert is None else TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca),
        auth_token_file=args.auth_token_file,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        shared_memory=args.shared_memory,
        forward_cache_bytes=args.forward_cache_bytes,
        sync_timeout=args.sync_timeout,
        max_world_size=args.max_world_size,
        max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace,
    )


def _serve(options: ServerOptions, args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    try:
        asyncio.run(run(options))
    except Exception as exc:  # startup failures: one clear line, not a traceback
        logging.getLogger("normserve").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        return 1
    return 0


def _client(args: argparse.Namespace) -> Any:
    """A client for one question: no retries, so a healthcheck answers within --timeout."""
    from normserve.client import NormClient, RetryPolicy

    token = None
    if args.token_file is not None:
        lines = args.token_file.read_text().split()
        token = lines[0] if lines else None
    return NormClient(
        args.target,
        timeout=args.timeout,
        retry=RetryPolicy(attempts=1),
        token=token,
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


def _layers(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    layers = _ask(args, lambda client: client.list_layers(args.prefix))
    for layer in layers:
        if args.json:
            print(json.dumps(json_format.MessageToDict(layer.info, preserving_proto_field_name=True)))
        elif layer.info.restore_error:
            print(f"{layer.name}\tUNRESTORABLE\t{layer.info.restore_error}")
        else:
            config = layer.info.config
            shape = "x".join(map(str, layer.info.param_shape))
            print(
                f"{layer.name}\t{layer.kind}\t{shape}\t{config.device}\tversion={layer.version}"
                f"\tbatches={layer.info.num_batches_tracked}"
            )
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        parser = _parser(environ)
    except BadEnvironment as exc:
        print(f"normserve: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            options = _server_options(args)
        except ValueError as exc:
            parser.error(str(exc))
        return _serve(options, args)
    return {"health": _health, "layers": _layers, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
