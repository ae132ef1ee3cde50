"""Prometheus metrics scraped from the real server, the per-layer monitoring numbers, and the logs."""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from conftest import reference_report
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, patience

import normkernels as nk
from normserve.client import NormClient, NotFound
from normserve.client.protocol import forward_request
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import wire

SERVICE = "normserve.v1.Normalization"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=patience(1)) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("observed")
    proc = ServerProcess(folder / "state", "--metrics-port", str(port), "--log-level", "debug").start()
    yield proc, port
    assert proc.stop() == 0


def test_requests_latency_and_bytes_by_method_and_code(observed) -> None:
    proc, port = observed
    before = scrape(port)
    rng = np.random.default_rng(7)
    with NormClient(proc.target) as nc:
        layer = nc.create_layer("requests", "layer_norm", normalized_shape=16)
        batches = [rng.normal(size=(32, 16)).astype(np.float32) for _ in range(4)]
        for x in batches:
            layer.train(x)
        with pytest.raises(NotFound):
            nc.layer("no-such-layer")
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return (sample(after, name, **labels) or 0.0) - (sample(before, name, **labels) or 0.0)

    train = {"service": SERVICE, "method": "Train"}
    assert delta("normserve_requests_total", **train, code="OK") == 4
    assert delta("normserve_requests_total", service=SERVICE, method="GetLayer", code="NOT_FOUND") == 1
    assert delta("normserve_requests_total", service=SERVICE, method="CreateLayer", code="OK") == 1
    assert delta("normserve_request_duration_seconds_count", **train) == 4
    assert 0 < delta("normserve_request_duration_seconds_sum", **train) < patience(6)
    assert delta("normserve_request_duration_seconds_bucket", **train, le="+Inf") == 4
    # Bytes are the serialized messages: exactly what the client sent and got.
    sent = sum(len(wire.serialize(forward_request("Train", "requests", x, None).message)) for x in batches)
    assert delta("normserve_received_bytes_total", **train) == sent
    y_bytes = 32 * 16 * 4
    assert delta("normserve_sent_bytes_total", **train) >= 4 * y_bytes
    assert delta("normserve_sent_bytes_total", **train) < 4 * (y_bytes + 64)
    # Health checks are counted too (the test harness polled it while starting).
    assert sample(after, "normserve_requests_total", service="grpc.health.v1.Health", method="Check", code="OK") >= 1


@pytest.mark.parametrize(
    ("kind", "config", "shape"),
    [
        ("batch_norm", {"num_features": 4, "momentum": 0.3}, (16, 4, 6)),
        ("instance_norm", {"num_features": 3, "track_running_stats": True}, (5, 3, 8)),
        ("group_norm", {"num_groups": 2, "num_channels": 4}, (6, 4, 5)),
        ("rms_norm", {"normalized_shape": 12}, (7, 12)),
    ],
)
def test_layer_monitoring_matches_numpy(observed, kind, config, shape) -> None:
    proc, port = observed
    name = f"monitored-{kind}"
    twin = nk.make_layer(kind, **config)  # its config only: the numbers come from NumPy
    rng = np.random.default_rng(11)
    with NormClient(proc.target) as nc:
        layer = nc.create_layer(name, kind, **config)
        for step in range(3):  # the input drifts: later batches sit away from the running statistics
            prior = layer.state_dict()
            x = rng.normal(1.0 + step, 1.0 + step, shape).astype(np.float32)
            y = layer.train(x)
        info = layer.refresh()
    expected = reference_report(twin, x, y, prior)
    stats = info.stats
    assert stats.train_calls == 3
    samples = scrape(port)
    assert sample(samples, "normserve_layer_train_calls_total", layer=name) == 3
    for tensor in ("input", "output"):
        value = expected[f"{tensor}_entropy"]
        assert getattr(stats, f"{tensor}_entropy") == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert sample(samples, "normserve_layer_entropy_nats", layer=name, tensor=tensor) == pytest.approx(
            value, rel=1e-5, abs=1e-6
        )
    for key, metric in (
        ("mean_shift", "normserve_layer_mean_shift"),
        ("log_var_shift", "normserve_layer_log_var_shift"),
    ):
        if twin.track_running_stats:
            assert getattr(stats, key) == pytest.approx(expected[key], rel=1e-5)
            assert sample(samples, metric, layer=name) == pytest.approx(expected[key], rel=1e-5)
        else:
            assert not stats.HasField(key)
            assert sample(samples, metric, layer=name) is None


def test_layers_gauge_and_deleted_layers_leave_the_metrics(observed) -> None:
    proc, port = observed
    with NormClient(proc.target) as nc:
        count = len(nc.list_layers())
        assert sample(scrape(port), "normserve_layers") == count
        layer = nc.create_layer("short-lived", "batch_norm", num_features=2)
        layer.train(np.random.default_rng(1).normal(size=(4, 2)))
        samples = scrape(port)
        assert sample(samples, "normserve_layers") == count + 1
        assert sample(samples, "normserve_layer_train_calls_total", layer="short-lived") == 1
        layer.delete()
        samples = scrape(port)
        assert sample(samples, "normserve_layers") == count
        assert not [key for key in samples if ("layer", "short-lived") in key[1]]


def test_one_log_line_per_call_and_warnings_name_layer_and_code(observed) -> None:
    proc, _ = observed
    with NormClient(proc.target) as nc:
        nc.create_layer("logged", "batch_norm", num_features=2).infer(np.ones((3, 2), np.float32) * [[1], [2], [4]])
        with pytest.raises(NotFound):
            nc.layer("logged-missing").state_dict()
    infer = proc.log_lines("normserve.access: Infer ok")
    assert len(infer) == 1
    assert "DEBUG" in infer[0]
    assert "layer=logged " in infer[0]
    assert "code=OK" in infer[0]
    (failed,) = proc.log_lines("layer=logged-missing")
    assert " INFO " in failed  # a probe for a layer before creating it is no warning
    assert "GetLayer failed: NOT_FOUND" in failed
    assert "code=NOT_FOUND" in failed
    assert "details=\"no layer named 'logged-missing'" in failed


def test_json_logs_carry_the_fields(tmp_path) -> None:
    proc = ServerProcess(tmp_path / "state", "--log-format", "json", "--log-level", "debug").start()
    try:
        with NormClient(proc.target) as nc, pytest.raises(NotFound):
            nc.call("Train", pb.TrainRequest(layer="absent", x=pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4)))
    finally:
        assert proc.stop() == 0
    entries = [json.loads(line) for line in proc.log().splitlines()]  # every line is one JSON object
    for entry in entries:  # ISO 8601 with the time zone's offset: comparable across hosts and zones
        stamp = datetime.fromisoformat(entry["time"])
        assert stamp.utcoffset() is not None, entry["time"]
        assert abs(stamp - datetime.now(timezone.utc)) < timedelta(hours=1)
    assert {e["logger"].partition(".")[0] for e in entries} <= {"normserve", "normkernels"}  # no library's debug
    (failed,) = [e for e in entries if e.get("method") == "Train"]
    assert failed["level"] == "INFO"  # NOT_FOUND: below WARNING
    assert failed["layer"] == "absent"
    assert failed["code"] == "NOT_FOUND"
    assert failed["bytes_in"] > 0
    assert any(e["message"].startswith("normserve listening on") for e in entries)


def test_library_debug_lines_only_when_asked(tmp_path) -> None:
    proc = ServerProcess(tmp_path / "state", "--log-level", "debug", "--debug-libraries").start()
    try:
        with NormClient(proc.target) as nc:
            nc.create_layer("asked", "rms_norm", normalized_shape=3)
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert " DEBUG asyncio: Using selector" in log  # the event loop's own debug line
    assert " DEBUG normserve.access: CreateLayer ok" in log


def test_metrics_port_zero_serves_no_metrics(server) -> None:
    assert "metrics on" not in server.log()


def test_a_busy_metrics_port_stops_startup_with_a_clear_line(tmp_path) -> None:
    import subprocess

    from serverproc import NORMSERVE

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [NORMSERVE, "serve", "--port", "0", "--state-dir", str(tmp_path), "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=patience(6),
        )
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_phases_in_flight_server_gauges_process_and_build_info(observed) -> None:
    import threading
    import urllib.error

    from normserve.client import SyncGroup

    proc, port = observed
    rng = np.random.default_rng(70)
    with NormClient(proc.target) as nc:
        layer = nc.create_layer("phased", "batch_norm", num_features=8)
        x = rng.normal(size=(64, 8, 64)).astype(np.float32)  # over the inline size: computed on a kernel thread
        layer.train(x, keep_forward=True)
        samples = scrape(port)
        assert sample(samples, "normserve_forward_cache_bytes") >= x.nbytes  # the kept forward
        synced = nc.create_layer("phased.sync", "batch_norm", num_features=4)
        halves = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2)]
        errors: list[BaseException] = []

        def rank(r: int) -> None:
            try:
                synced.train(halves[r], sync=SyncGroup("phased", world_size=2, rank=r).at(1))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(patience(12))
        assert not errors
    samples = scrape(port)

    def phase_count(method: str, phase: str) -> float:
        return sample(samples, "normserve_request_phase_seconds_count", service=SERVICE, method=method, phase=phase)

    assert phase_count("Train", "compute") >= 1
    assert phase_count("Train", "store") >= 1  # running statistics committed before the answer
    assert phase_count("CreateLayer", "store") >= 2
    assert phase_count("Train", "sync") >= 2  # each rank waited for the step
    total = sample(samples, "normserve_request_duration_seconds_sum", service=SERVICE, method="Train")
    parts = sum(
        sample(samples, "normserve_request_phase_seconds_sum", service=SERVICE, method="Train", phase=phase) or 0
        for phase in ("queue", "compute", "store", "sync")
    )
    assert 0 < parts <= total * 1.01 + 1e-3  # the phases are parts of the calls' time
    assert sample(samples, "normserve_calls_in_flight", service=SERVICE, method="Train") == 0
    assert sample(samples, "normserve_calls_in_flight", service=SERVICE, method="Train") is not None
    state = sample(samples, "normserve_state_bytes")
    assert state >= (8 * 4 + 4 * 4) * 4  # at least these two layers' four float32 tensors
    assert sample(samples, "normserve_state_store_bytes") > 0
    assert sample(samples, "process_resident_memory_bytes") > 0
    assert sample(samples, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_collections_total" for name, _ in samples)
    ((labels, value),) = [(dict(key), v) for (name, key), v in samples.items() if name == "normserve_build_info"]
    assert value == 1
    assert labels["version"]
    assert labels["grpcio"]
    assert labels["numpy"] == np.__version__
    for path in ("/", "/metrics/extra", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=patience(1))
        assert caught.value.code == 404
