"""Prometheus metrics: per-call counters, latencies split by phase, calls in flight, per-layer and server
gauges read at scrape time, the process and Python collectors, and build info.

Each server has its own :class:`prometheus_client.CollectorRegistry`, so
nothing is global and several servers can live in one process (tests).
Layer metrics come from a collector that reads the registry of layers when
Prometheus scrapes: a deleted layer's series disappear by themselves. The
endpoint answers ``/metrics`` and 404 elsewhere.

The endpoint is served by :class:`_MetricsServer`, not prometheus_client's
own: that one gives every connection a thread with no timeout, so silent
connections each kept a thread and a descriptor for as long as they stayed
open (400 connections: 412 threads).
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "Metrics"]

log = logging.getLogger(__name__)

#: Seconds: from a small cached Infer (~0.3 ms) to a large Train of several hundred MB.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_CALL_LABELS = ("service", "method")
#: The server-wide gauges read at scrape time: name -> help (their values come from Metrics' ``gauges``).
SERVER_GAUGES = {
    "normserve_forward_cache_bytes": "Bytes the forwards kept for Gradient hold (--forward-cache-bytes)",
    "normserve_state_bytes": "Bytes of every layer's state in memory (--max-state-bytes)",
    "normserve_state_store_bytes": "Bytes of the state directory's SQLite database and its WAL on disk",
}


class _ServerCollector(Collector):
    def __init__(self, gauges: Mapping[str, Callable[[], float]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, value in self._gauges.items():
            gauge = GaugeMetricFamily(name, SERVER_GAUGES[name])
            gauge.add_metric([], value())
            yield gauge


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


#: Connections the metrics endpoint serves at once (one thread each); more are closed at once.
METRICS_CONNECTIONS = 8
#: Seconds a metrics connection may stay silent (while sending its request or taking the answer).
METRICS_TIMEOUT = 5.0


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT  # socketserver applies it to the connection's socket

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most METRICS_CONNECTIONS of them, each connection timed out."""

    daemon_threads = True
    block_on_close = False
    # socketserver's backlog is 5: a burst of silent connections filled it, and the kernel then dropped a
    # scrape's SYN until the client's retransmit (a second or more) instead of accepting and closing it.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed now, not queued behind silent connections
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _LayerCollector(Collector):
    """The layers gauge and each layer's Train count, covariate shift and entropies."""

    def __init__(self, snapshots: Callable[[], Iterable[Any]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snapshots = list(self._snapshots())
        layers = GaugeMetricFamily("normserve_layers", "Layers the server holds")
        layers.add_metric([], len(snapshots))
        calls = CounterMetricFamily(
            "normserve_layer_train_calls", "Train calls answered per layer since the server started", labels=["layer"]
        )
        mean_shift = GaugeMetricFamily(
            "normserve_layer_mean_shift",
            "Last training batch: mean over channels of |mu_B - mu_running| / sigma_running (running stats only)",
            labels=["layer"],
        )
        log_var_shift = GaugeMetricFamily(
            "normserve_layer_log_var_shift",
            "Last training batch: mean over channels of |log(var_B / var_running)| (running stats only)",
            labels=["layer"],
        )
        entropy = GaugeMetricFamily(
            "normserve_layer_entropy_nats",
            "Last training batch: Gaussian entropy 0.5*log(2*pi*e*sigma^2) averaged over normalization groups",
            labels=["layer", "tensor"],
        )
        for snapshot in snapshots:
            name, stats = snapshot.name, snapshot.stats
            calls.add_metric([name], stats.train_calls)
            report = stats.last
            if report is None:
                continue
            entropy.add_metric([name, "input"], report.input_entropy)
            entropy.add_metric([name, "output"], report.output_entropy)
            if report.mean_shift is not None:
                mean_shift.add_metric([name], report.mean_shift)
                log_var_shift.add_metric([name], report.log_var_shift)
        yield from (layers, calls, mean_shift, log_var_shift, entropy)


class _MethodMetrics(NamedTuple):
    """One method's children of the call metrics (``by_code``: its request counters, made per code as seen)."""

    by_code: dict[str, Any]
    in_flight: Any
    latency: Any
    received: Any
    sent: Any


class Metrics:
    """The server's metrics; :meth:`begin` and :meth:`observe` record one call, :meth:`serve` exposes
    ``/metrics``. ``gauges`` reads each of :data:`SERVER_GAUGES` at scrape time."""

    def __init__(
        self, snapshots: Callable[[], Iterable[Any]], gauges: Mapping[str, Callable[[], float]] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "normserve_requests", "RPCs answered, by status code", [*_CALL_LABELS, "code"], registry=self.registry
        )
        self._latency = Histogram(
            "normserve_request_duration_seconds",
            "Time from a request's arrival to its answer",
            _CALL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._received = Counter(
            "normserve_received_bytes", "Request message bytes received", _CALL_LABELS, registry=self.registry
        )
        self._sent = Counter(
            "normserve_sent_bytes", "Response message bytes sent", _CALL_LABELS, registry=self.registry
        )
        self._phases = Histogram(
            "normserve_request_phase_seconds",
            "Time a call spent per phase: queue (waiting for a layer's earlier writes or a free thread), compute "
            "(kernels), store (SQLite), sync (waiting for the other ranks of a synchronized step)",
            [*_CALL_LABELS, "phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "normserve_calls_in_flight", "Calls started and not yet answered", _CALL_LABELS, registry=self.registry
        )
        Info("normserve_build", "The versions this server runs", registry=self.registry).info(
            {
                "version": _version("normserve"),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "numpy": np.__version__,
                "numba": _version("numba"),
            }
        )
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # memory, CPU, fds; Python; GC
            self.registry.register(collector)
        self.registry.register(_LayerCollector(snapshots))
        self.registry.register(_ServerCollector(gauges or {}))
        self._http: Any = None
        self._methods: dict[tuple[str, str], _MethodMetrics] = {}

    def _of(self, service: str, method: str) -> _MethodMetrics:
        """The metrics of one method: looked up by label once, not on every call (bounded: a call reaches
        the metrics only for a method the server has)."""
        found = self._methods.get((service, method))
        if found is None:
            found = _MethodMetrics(
                {},
                self._in_flight.labels(service, method),
                self._latency.labels(service, method),
                self._received.labels(service, method),
                self._sent.labels(service, method),
            )
            self._methods[(service, method)] = found
        return found

    def begin(self, service: str, method: str) -> None:
        """A call started (the in-flight gauge; :meth:`observe` ends it)."""
        self._of(service, method).in_flight.inc()

    def observe(
        self,
        service: str,
        method: str,
        code: str,
        seconds: float,
        received: int,
        sent: int,
        phases: Mapping[str, float] | None = None,
    ) -> None:
        """A call that :meth:`begin` started ended, after ``seconds``; ``phases``: where that time went."""
        of = self._of(service, method)
        of.in_flight.dec()
        counted = of.by_code.get(code)
        if counted is None:
            counted = of.by_code[code] = self._requests.labels(service, method, code)
        counted.inc()
        of.latency.observe(seconds)
        of.received.inc(received)
        of.sent.inc(sent)
        for phase, spent in (phases or {}).items():
            self._phases.labels(service, method, phase).observe(spent)

    def serve(self, host: str, port: int) -> int:
        """Serve ``http://host:port/metrics`` (404 elsewhere) from a daemon thread; returns the port (``port`` 0
        picks one)."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/metrics":
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]

        server_class = type("_Server", (_MetricsServer,), {"address_family": _family(host)})
        self._http = make_server(host, port, app, server_class, _QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="normserve-metrics", daemon=True).start()
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
