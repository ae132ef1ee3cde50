"""``normserve``: the command line (serve, health, layers)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.server.app import ServerOptions, run
from normserve.server.servicer import Limits

__all__ = ["main"]

DEFAULT_TARGET = "127.0.0.1:50051"
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normserve",
        description="Normalization layers (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm) served by name.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = ServerOptions()

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server until SIGTERM/SIGINT; layer state persists in --state-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default=defaults.host, help="address to listen on (0.0.0.0 or :: for all)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port to listen on; 0 picks a free one")
    serve.add_argument(
        "--device", default=defaults.device, help="default device of new layers: auto, cpu, cuda or cuda:<k>"
    )
    serve.add_argument("--state-dir", type=Path, default=defaults.state_dir, help="folder of the SQLite state")
    serve.add_argument("--workers", type=_positive(int), default=defaults.workers, help="kernel threads")
    serve.add_argument(
        "--max-message-bytes", type=_positive(int), default=defaults.max_message_bytes, help="largest gRPC message"
    )
    serve.add_argument(
        "--max-tensor-bytes", type=_positive(int), default=defaults.limits.max_tensor_bytes, help="largest tensor"
    )
    serve.add_argument(
        "--max-tensor-elements",
        type=_positive(int),
        default=defaults.limits.max_tensor_elements,
        help="most elements in one tensor",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=defaults.grace_period,
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT",
    )
    serve.add_argument(
        "--sync",
        choices=("full", "normal"),
        default=defaults.sqlite_synchronous.lower(),
        help="SQLite synchronous mode: full survives power loss; normal survives a killed process only",
    )
    serve.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="log verbosity (to stderr)")

    for name, text in (("health", "exit 0 when the server is SERVING"), ("layers", "list the server's layers")):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("--target", default=DEFAULT_TARGET, help=f"server HOST:PORT (default {DEFAULT_TARGET})")
        command.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    commands.choices["health"].add_argument(
        "--service", default="", help="service to check; empty (default) means the whole server"
    )
    commands.choices["layers"].add_argument("--prefix", default="", help="only names starting with this")
    commands.choices["layers"].add_argument("--json", action="store_true", help="one JSON object per layer")
    return parser


def _serve(args: argparse.Namespace) -> int:
    options = ServerOptions(
        host=args.host,
        port=args.port,
        device=args.device,
        state_dir=args.state_dir,
        workers=args.workers,
        max_message_bytes=args.max_message_bytes,
        limits=Limits(max_tensor_bytes=args.max_tensor_bytes, max_tensor_elements=args.max_tensor_elements),
        grace_period=args.grace_period,
        sqlite_synchronous=args.sync.upper(),
    )
    try:
        asyncio.run(run(options))
    except Exception as exc:  # startup failures: one clear line, not a traceback
        logging.getLogger("normserve").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _layers(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from normserve.client import NormClient, NormServeError

    try:
        with NormClient(args.target, timeout=args.timeout) as client:
            layers = client.list_layers(args.prefix)
    except NormServeError as error:
        print(f"{args.target}: {error}", file=sys.stderr)
        return 1
    for layer in layers:
        if args.json:
            print(json.dumps(json_format.MessageToDict(layer.info, preserving_proto_field_name=True)))
        else:
            config = layer.info.config
            shape = "x".join(map(str, layer.info.param_shape))
            print(
                f"{layer.name}\t{layer.kind}\t{shape}\t{config.device}\tversion={layer.version}"
                f"\tbatches={layer.info.num_batches_tracked}"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return _serve(args)
    return {"health": _health, "layers": _layers}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
