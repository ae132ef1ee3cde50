"""Assemble and run the server: store, registry, servicer, health, reflection, security, metrics, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from normkernels import compiled, parse_device
from normserve.server import layers_file, transport
from normserve.server.cluster_views import ClusterViews
from normserve.server.interceptors import CallSlots, Gate, GuardCalls
from normserve.server.memory import Trimmer
from normserve.server.metrics import Metrics
from normserve.server.registry import Registry
from normserve.server.security import TlsFiles, TokenSet
from normserve.server.servicer import SERVICE_NAME, Limits, NormalizationServicer
from normserve.server.shared_memory import SharedMemoryRegions
from normserve.server.store import DEFAULT_KEEP_VERSIONS, StateStore

__all__ = ["LIVENESS_SERVICE", "SERVICE_NAME", "ServerOptions", "run"]

log = logging.getLogger("normserve")
#: The health service that answers SERVING as soon as the server listens (liveness: the process is up), while
#: "" and SERVICE_NAME (readiness) answer NOT_SERVING until the kernels are warm, as Triton's /v2/health/live
#: and /v2/health/ready.
LIVENESS_SERVICE = "liveness"
_WARMING_UP = (
    "the server is starting: its CPU kernels are compiling (a first start on a machine takes minutes, later "
    "starts a few seconds); health answers NOT_SERVING until it is ready. Retry, or wait for SERVING"
)


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    state_dir: Path = Path("normserve-state")
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    limits: Limits = field(default_factory=Limits)
    max_layers: int = 10_000
    max_layer_state_bytes: int = 64 << 20  # parameters and running statistics of one layer
    max_state_bytes: int = 4 << 30  # of all layers together
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # states of each layer kept to read or roll back to, the current one too
    layers_file: Path | None = None  # JSON of the layers to create at start (server.layers_file)
    max_concurrent_rpcs: int | None = None  # None: no limit; more answer RESOURCE_EXHAUSTED
    grace_period: float = 30.0
    sqlite_synchronous: str = "FULL"
    tls: TlsFiles | None = None
    auth_token_file: Path | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str | None = None  # None: the same as host
    shared_memory: bool = False  # serve tensors in clients' POSIX shared memory (same host, trusted clients)
    max_shared_memory_regions: int = 1024  # registered at once, each holding a file descriptor ...
    max_shared_memory_regions_per_client: int = 256  # ... and by one client (its connection)
    forward_cache_bytes: int = 1 << 30  # budget of forwards kept for Gradient by forward_id
    sync_timeout: float = 60.0  # seconds the first rank of a synchronized step waits for the last
    max_world_size: int = 1024  # ranks of one synchronized step
    max_connection_age: float = 1800.0  # seconds before a client connection is asked to reconnect (GOAWAY) ...
    max_connection_age_grace: float = 300.0  # ... and then closed, ending what is still open on it
    max_connection_idle: float = 300.0  # seconds a connection without calls stays open
    max_connections: int | None = None  # None: what the open-files limit leaves (transport.connection_budget)
    compression: bool = False  # accept gzip/deflate requests (gRPC inflates them before any check)
    # The other replicas of a layer-sharded cluster, for the whole-cluster views the proxy asks for (cluster_views)
    peers: tuple[str, ...] = ()
    peer_timeout: float = 2.0  # seconds each fan-out call to a peer may take


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True)
class _Assembled:
    """A server built from its options: its state restored, its services added, not yet listening."""

    options: ServerOptions
    device: str
    credentials: grpc.ServerCredentials | None  # None: plaintext
    store: StateStore
    registry: Registry
    restored: int  # layers loaded from the store
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    shared_memory: SharedMemoryRegions
    metrics: Metrics | None
    trimmer: Trimmer
    token_auth: bool
    views: ClusterViews | None  # None: no peers, every call answered for this server alone
    gate: Gate  # refuses layer calls until the kernels are warm


def _open_registry(options: ServerOptions, device: str) -> tuple[StateStore, Registry, int]:
    """The store under ``state_dir``, and a registry holding every layer it could restore (how many: the int)."""
    store = StateStore(options.state_dir, options.sqlite_synchronous, options.keep_versions)
    registry = Registry(
        store,
        default_device=device,
        workers=options.workers,
        max_layers=options.max_layers,
        forward_cache_bytes=options.forward_cache_bytes,
        sync_timeout=options.sync_timeout,
        max_world_size=options.max_world_size,
        max_layer_state_bytes=options.max_layer_state_bytes,
        max_state_bytes=options.max_state_bytes,
    )
    try:
        restored = registry.load()
    except Exception:
        store.close()
        raise
    if restored >= options.max_layers:
        log.warning("%d layers restored, --max-layers is %d: no new layer fits", restored, options.max_layers)
    return store, registry, restored


def _build(options: ServerOptions) -> _Assembled:
    """Open the store, restore its layers, and assemble the gRPC server with its services and guards."""
    device = str(parse_device(options.device))
    if options.peers and options.tls is not None:
        raise ValueError(
            "--peers calls the peers in plaintext, so it cannot go with --tls-cert: terminate TLS at the proxy "
            "and keep the replicas on a private network (deploy/nginx/README.md)"
        )
    descriptors = transport.raise_descriptor_limit()
    credentials = None if options.tls is None else options.tls.credentials()
    tokens = None if options.auth_token_file is None else TokenSet(options.auth_token_file)
    store, registry, restored = _open_registry(options, device)
    gauges = {
        "normserve_forward_cache_bytes": lambda: registry.forwards.held_bytes,
        "normserve_state_bytes": lambda: registry.state_bytes,
        "normserve_state_store_bytes": store.disk_bytes,
    }
    metrics = Metrics(registry.list, gauges) if options.metrics_port else None
    trimmer = Trimmer()
    gate = Gate((SERVICE_NAME,), _WARMING_UP)
    # outermost: guards and sees every call, refusals included
    interceptors: list[grpc.aio.ServerInterceptor] = [
        GuardCalls(
            metrics,
            options.limits.default_deadline,
            trimmer,
            max_message_bytes=options.limits.max_message_bytes,
            slots=CallSlots(options.max_concurrent_rpcs),  # counted there so that health never waits for one
            tokens=tokens,
            gate=gate,
        )
    ]
    views = (
        ClusterViews(options.peers, options.peer_timeout, options.limits.max_message_bytes) if options.peers else None
    )
    if views is not None:  # innermost: only calls that passed the guards and the token check fan out
        interceptors.append(views)
    settings = transport.server_settings(
        max_message_bytes=options.limits.max_message_bytes,
        max_connection_age=options.max_connection_age,
        max_connection_age_grace=options.max_connection_age_grace,
        max_connection_idle=options.max_connection_idle,
        max_connections=options.max_connections or transport.connection_budget(descriptors),
        compression=options.compression,
    )
    server = grpc.aio.server(interceptors=interceptors, options=[(s.option, s.value) for s in settings])
    shared_memory = SharedMemoryRegions(
        enabled=options.shared_memory,
        max_regions=options.max_shared_memory_regions,
        max_regions_per_client=options.max_shared_memory_regions_per_client,
    )
    server.add_generic_rpc_handlers([NormalizationServicer(registry, options.limits, shared_memory).generic_handler()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    return _Assembled(
        options=options,
        device=device,
        credentials=credentials,
        store=store,
        registry=registry,
        restored=restored,
        server=server,
        health=health_servicer,
        shared_memory=shared_memory,
        metrics=metrics,
        trimmer=trimmer,
        token_auth=tokens is not None,
        views=views,
        gate=gate,
    )


async def _listen(assembled: _Assembled, stop: asyncio.Event) -> str:
    """Bind the gRPC and metrics ports, let SIGTERM/SIGINT/SIGHUP set ``stop``, and start serving; returns the
    address it listens on.

    A port that cannot be bound closes the registry (and so the store) before the error goes up.
    """
    options = assembled.options
    address = _address(options.host, options.port)
    metrics_host = options.metrics_host or options.host
    try:
        if assembled.credentials is None:
            port = assembled.server.add_insecure_port(address)
        else:
            port = assembled.server.add_secure_port(address, assembled.credentials)
    except RuntimeError as exc:
        await assembled.registry.close()
        raise OSError(f"cannot listen on {address}: {exc} (is another server using the port?)") from None
    try:
        metrics_port = 0 if assembled.metrics is None else assembled.metrics.serve(metrics_host, options.metrics_port)
    except OSError as exc:
        await assembled.registry.close()
        where = _address(metrics_host, options.metrics_port)
        raise OSError(f"cannot serve metrics on {where}: {exc.strerror or exc} (--metrics-port)") from None

    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal or ssh session shuts down as gracefully as a deployment's SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, _stopping, stop, signal.Signals(signum).name)

    await assembled.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    for service in ("", SERVICE_NAME):  # ready once the kernels are warm (_become_ready)
        await assembled.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await assembled.server.start()
    security = "plaintext" if options.tls is None else options.tls.describe()
    listening = _address(options.host, port)
    log.info(
        "normserve listening on %s (%s%s, device %s, %d layer(s) restored from %s)",
        listening,
        security,
        " + token auth" if assembled.token_auth else "",
        assembled.device,
        assembled.restored,
        assembled.store.path,
    )
    if assembled.token_auth and options.tls is None:
        log.warning("token auth without TLS: tokens cross the network in plaintext; use --tls-cert/--tls-key")
    if assembled.views is not None:
        log.info(
            "whole-cluster views: ListLayers and health checks the proxy marks also ask %d peer(s): %s",
            len(options.peers),
            ", ".join(options.peers),
        )
    if assembled.metrics is not None:
        log.info("metrics on http://%s/metrics", _address(metrics_host, metrics_port))
    if options.shared_memory:
        log.warning(
            "shared memory on: every client that may call this server can read and write the shared-memory "
            "objects this server's user can open; allow only trusted clients on this host"
        )
    return listening


def _in_daemon_thread(work: Callable[[], object]) -> asyncio.Future:
    """``work()`` on a thread of its own, as a future of the running loop. A daemon thread: a server told to
    stop while it works (compiling kernels, minutes) exits without waiting for it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="normserve-warm-up", daemon=True).start()
    return future


async def _become_ready(assembled: _Assembled, listening: str) -> None:
    """Warm the CPU kernels (compiled, or loaded from numba's cache: none compiles inside a request), then
    open the layer calls and turn health SERVING."""
    log.info(
        "warming up the CPU kernels: health answers NOT_SERVING (%r: SERVING) and layer calls UNAVAILABLE "
        "until they are ready",
        LIVENESS_SERVICE,
    )
    started = time.perf_counter()
    await _in_daemon_thread(compiled.warm_up)
    assembled.gate.ready()
    for service in ("", SERVICE_NAME):
        await assembled.health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: SERVING on %s (kernels warm after %.1f s)", listening, time.perf_counter() - started)


def _stopping(stop: asyncio.Event, signame: str) -> None:
    log.info("%s received", signame)
    stop.set()


async def _shutdown(assembled: _Assembled) -> None:
    """Health turns NOT_SERVING, the server stops accepting calls and gives in-flight ones ``grace_period``
    seconds, started writes finish, and the store is checkpointed and closed."""
    grace_period = assembled.options.grace_period
    log.info("shutting down: refusing new calls, finishing in-flight ones (up to %.0f s)", grace_period)
    await assembled.health.enter_graceful_shutdown()
    await assembled.server.stop(grace_period)
    assembled.shared_memory.close()
    if assembled.views is not None:
        await assembled.views.close()
    await assembled.registry.close()
    if assembled.metrics is not None:
        assembled.metrics.close()
    log.info("stopped; state is in %s", assembled.store.path)


async def run(options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP (or ``stop``), then shut down gracefully (see :func:`_shutdown`)."""
    declared = None if options.layers_file is None else layers_file.read(options.layers_file)
    assembled = _build(options)
    if declared is not None:
        try:
            await layers_file.apply(assembled.registry, declared, options.layers_file)
        except BaseException:
            await assembled.registry.close()
            raise
    stop = stop or asyncio.Event()
    listening = await _listen(assembled, stop)
    trimming = asyncio.ensure_future(assembled.trimmer.run())
    warming = asyncio.ensure_future(_become_ready(assembled, listening))
    warming.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
    await stop.wait()
    trimming.cancel()
    failure = warming.exception() if warming.done() and not warming.cancelled() else None
    warming.cancel()
    await _shutdown(assembled)
    if failure is not None:
        raise failure  # the kernels could not be readied: the server stops, saying why
