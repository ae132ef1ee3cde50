"""Assemble and run the server: store, registry, servicer, health, reflection, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from normkernels import parse_device
from normserve.server.registry import Registry
from normserve.server.servicer import Limits, NormalizationServicer
from normserve.server.store import StateStore
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAME", "ServerOptions", "run"]

log = logging.getLogger("normserve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Normalization"].full_name


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    state_dir: Path = Path("normserve-state")
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_message_bytes: int = (1 << 31) - 1  # gRPC's own ceiling
    limits: Limits = field(default_factory=Limits)
    grace_period: float = 30.0
    sqlite_synchronous: str = "FULL"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def run(options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    Shutdown order: health turns NOT_SERVING, the server stops accepting
    calls and gives in-flight ones ``grace_period`` seconds, started writes
    finish, and the store is checkpointed and closed.
    """
    device = str(parse_device(options.device))
    store = StateStore(options.state_dir, options.sqlite_synchronous)
    registry = Registry(store, default_device=device, workers=options.workers)
    try:
        restored = registry.load()
    except Exception:
        store.close()
        raise

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared socket
        ]
    )
    pb_grpc.add_NormalizationServicer_to_server(NormalizationServicer(registry, options.limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = _address(options.host, options.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        await registry.close()
        raise OSError(f"cannot listen on {address}: {exc} (is another server using the port?)") from None

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "normserve listening on %s (device %s, %d layer(s) restored from %s)",
        _address(options.host, port),
        device,
        restored,
        store.path,
    )
    await stop.wait()

    log.info("shutting down: refusing new calls, finishing in-flight ones (up to %.0f s)", options.grace_period)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(options.grace_period)
    await registry.close()
    log.info("stopped; state is in %s", store.path)
