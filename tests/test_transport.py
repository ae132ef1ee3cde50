"""The transport, attacked as a party without a token would: raw HTTP/2 (h2), TLS, signals, the metrics port.

Each test starts the real server (``normserve serve`` in a subprocess) on loopback, and every attack is
bounded in count and time. The findings of issue 25 these guard are named in each test's docstring.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from certs import make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2client import RawConnection, grpc_frame
from serverproc import ServerProcess, patience, wait_for

from normserve.client import NormClient, RetryPolicy, Unavailable
from normserve.server import transport
from normserve.server.app import ServerOptions

MiB = 1 << 20
HEALTH = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
GET_LAYER = "/normserve.v1.Normalization/GetLayer"
LIST_LAYERS = "/normserve.v1.Normalization/ListLayers"
TRAIN = "/normserve.v1.Normalization/Train"
ONCE = RetryPolicy(attempts=1)
OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAUTHENTICATED = 0, 4, 8, 12, 16


class HonestProbe:
    """An honest client checking health every 0.1 s on its own connection; the slowest answer it saw."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._stop = threading.Event()
        self.slowest = 0.0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.1):
                start = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=patience(1))
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")
                self.slowest = max(self.slowest, time.monotonic() - start)

    def __enter__(self) -> HonestProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(patience(1.5))


def code_of(status: tuple[int, str] | None) -> int | None:
    return None if status is None else status[0]


def test_security_md_lists_every_transport_setting_with_its_default() -> None:
    """SECURITY.md's table is the module's: a setting added or changed there shows up here."""
    text = (Path(__file__).parent.parent / "SECURITY.md").read_text()
    start, end = text.index("<!-- transport table -->"), text.index("<!-- end transport table -->")
    assert text[start:end].split("\n", 1)[1].strip() == transport.markdown_table(ServerOptions()).strip(), (
        "SECURITY.md's transport table is out of date: paste `python -m normserve.server.transport`"
    )


def test_transport_attacks_without_a_token_leave_health_fast_and_memory_bounded(start_server) -> None:
    """Findings 1, 2, 3 and 9: compression bombs, header-only calls, too many streams and Watch streams, idle
    connections, and the memory they leave. An honest client's health checks stay fast throughout."""
    # A health check starved by the stalled calls below would wait for them to end (--default-deadline): that
    # deadline is made long, so that an honest check, fast, is told from a starved one on any machine.
    idle, deadline = patience(0.5), patience(0.4)  # connections with calls stalled until the deadline stay busy
    proc = start_server(
        *("--max-concurrent-rpcs", "8", "--default-deadline", str(deadline)),
        *("--max-connection-idle", str(idle), "--max-connections", "48"),
    )
    port = proc.port
    with NormClient(proc.target, retry=ONCE) as nc:
        nc.create_layer("bn", "batch_norm", num_features=8)
    time.sleep(1.5)
    baseline = proc.rss()
    peak = baseline
    with HonestProbe(proc.target) as probe:
        # 1. Compression bombs: 64 MiB of zeros in 65 KB of gzip, to health and to a layer method. Refused
        # before they are inflated: the server's memory does not move.
        bomb = grpc_frame(gzip.compress(os.urandom(16) + bytes(64 * MiB), 9), compressed=True)
        for encoding in ("gzip", "deflate"):
            raw = RawConnection(port)
            for path in (HEALTH, TRAIN):
                status = raw.call(path, bomb, [("grpc-encoding", encoding)])
                assert code_of(status) == UNIMPLEMENTED, (encoding, path, status)
            raw.close()
        peak = max(peak, proc.rss())
        assert peak < baseline + 32 * MiB, (baseline, peak)

        # A small request over its method's receive limit is refused unparsed.
        raw = RawConnection(port)
        status = raw.call(GET_LAYER, grpc_frame(b"\n" + bytes([0x80, 0x80, 0x80, 0x01]) + bytes(2 * MiB)))
        assert code_of(status) == RESOURCE_EXHAUSTED, status
        raw.close()

        # 2. Calls that send only their headers: they end after --default-deadline, health included, and
        # while they wait neither health nor (after they end) the slots are starved.
        raw = RawConnection(port)
        raw.ignore_stream_limit()
        stalled = [raw.start_call(GET_LAYER) for _ in range(8)] + [raw.start_call(HEALTH) for _ in range(8)]
        started = time.monotonic()
        with NormClient(proc.target, retry=ONCE) as nc:
            assert nc.health(timeout=patience(0.5)) == "SERVING"  # health takes no slot
        assert raw.pump(lambda: raw.ended(stalled) == len(stalled), deadline + patience(1.5)), raw.status
        waited = time.monotonic() - started
        assert deadline * 0.9 <= waited < deadline + patience(1.5), waited
        assert {raw.status[s][0] for s in stalled} == {DEADLINE_EXCEEDED}, raw.status
        with NormClient(proc.target, retry=ONCE) as nc:
            assert nc.layer("bn").refresh().name == "bn"  # the slots are free again

        raw.close()

        # Many streams on one connection: the server advertises its cap and refuses streams past it.
        raw = RawConnection(port)
        raw.ignore_stream_limit()
        assert raw.advertised_streams == transport.MAX_STREAMS_PER_CONNECTION
        # (header-only health checks: each stays open until --default-deadline, taking no slot)
        over = [raw.start_call(HEALTH) for _ in range(transport.MAX_STREAMS_PER_CONNECTION + 32)]
        assert raw.pump(lambda: raw.ended(over) == len(over), deadline + patience(1.5))
        served = [s for s in over if s in raw.status]
        assert len(served) == transport.MAX_STREAMS_PER_CONNECTION, (len(served), len(raw.reset))
        raw.close()
        # Floods of header-only calls over several connections (about 1500 each): memory stays bounded, and
        # comes back after each (finding 9: no handler counted their bytes), with no creep from one to the next.
        floors = []
        for _ in range(3):
            flood = [RawConnection(port) for _ in range(12)]
            floods = [[c.start_call(LIST_LAYERS) for _ in range(transport.MAX_STREAMS_PER_CONNECTION)] for c in flood]
            time.sleep(0.5)
            peak = max(peak, proc.rss())
            for connection, streams in zip(flood, floods, strict=True):
                assert connection.pump(lambda c=connection, s=streams: c.ended(s) == len(s), deadline + patience(2))
                connection.close()
            assert wait_for(lambda: proc.rss() < baseline + 48 * MiB, patience(1.5), 0.5), (baseline, peak, proc.rss())
            floors.append(proc.rss())
        assert floors[-1] < floors[0] + 16 * MiB, floors
        print(
            f"RSS MiB: baseline {baseline / MiB:.0f}, peak {peak / MiB:.0f}, after floods {[f // MiB for f in floors]}"
        )

        # Health/Watch streams take no --max-concurrent-rpcs slot, and have a cap of their own.
        watchers = [RawConnection(port) for _ in range(3)]
        watches = []
        for connection in watchers:
            for _ in range(transport.MAX_STREAMS_PER_CONNECTION - 30):
                stream = connection.start_call(WATCH)
                connection.send(stream, grpc_frame(b""), end=True)
                watches.append((connection, stream))
        with NormClient(proc.target, retry=ONCE) as nc:
            assert nc.layer("bn").refresh().name == "bn"
            assert nc.health(timeout=patience(0.5)) == "SERVING"
        over_cap = len(watches) - transport.MAX_WATCH_STREAMS

        def refused_watches() -> int:
            for connection in watchers:
                connection.is_open()  # reads what arrived
            return sum(c.status.get(s, (None,))[0] == RESOURCE_EXHAUSTED for c, s in watches)

        assert wait_for(lambda: refused_watches() >= over_cap, patience(1)), refused_watches()
        assert refused_watches() == over_cap
        for connection in watchers:
            connection.close()

        # 3. Idle connections: at most --max-connections at once, and each closed after --max-connection-idle.
        idlers = [RawConnection(port) for _ in range(60)]
        assert wait_for(lambda: sum(c.is_open() for c in idlers) <= 48, idle / 2), "over --max-connections"
        assert wait_for(lambda: not any(c.is_open() for c in idlers), idle + patience(1.5)), (
            "idle connections stay open"
        )
        for connection in idlers:
            connection.close()
        with NormClient(proc.target, retry=ONCE) as nc:
            assert nc.health(timeout=patience(0.5)) == "SERVING"
        peak = max(peak, proc.rss())
    assert probe.failures == [], probe.failures[:5]
    assert probe.slowest < deadline / 2, probe.slowest  # never starved until the stalled calls ended
    assert peak < baseline + 400 * MiB, (baseline, peak)
    # 9. Memory comes back once the attack is over, though no handler counted those calls' bytes.
    assert wait_for(lambda: proc.rss() < baseline + 48 * MiB, patience(1.5), 0.5), (baseline, peak, proc.rss())
    assert proc.process.poll() is None


def test_a_call_without_a_token_is_refused_before_its_request_is_read(tmp_path) -> None:
    """Finding 10: the token is checked on the headers; a body is neither waited for nor parsed."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-5d1e\n")
    proc = ServerProcess(tmp_path / "state", "--auth-token-file", str(tokens)).start()
    try:
        raw = RawConnection(proc.port)
        header_only = raw.start_call(GET_LAYER)  # no body at all: answered at once
        assert raw.pump(lambda: header_only in raw.status, patience(0.5)), (
            "waited for the body of an unauthenticated call"
        )
        assert raw.status[header_only][0] == UNAUTHENTICATED
        malformed = grpc_frame(b"\xff\xff\xff")
        for path in (GET_LAYER, TRAIN, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
            status = raw.call(path, malformed)
            assert code_of(status) == UNAUTHENTICATED, (path, status)
        bearer = [("authorization", "Bearer a-token-5d1e")]
        assert raw.call(GET_LAYER, malformed, bearer)[0] == 3  # INVALID_ARGUMENT: the token is good
        assert raw.call(HEALTH, grpc_frame(b""))[0] == OK  # health needs no token
        raw.close()
    finally:
        assert proc.stop() == 0


def test_sighup_shuts_down_gracefully(tmp_path) -> None:
    """Finding 12: SIGHUP (a closed terminal) turns health NOT_SERVING, lets an in-flight call finish, logs."""
    proc = ServerProcess(tmp_path / "state", "--grace-period", "20").start()
    with NormClient(proc.target, retry=ONCE) as nc:
        nc.create_layer("kept", "layer_norm", normalized_shape=[4])
    with grpc.insecure_channel(proc.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=patience(3))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        raw = RawConnection(proc.port)
        in_flight = raw.start_call(GET_LAYER)  # its request is still to come when the signal arrives
        # Let the server take the call up first: one whose headers gRPC holds but no handler has taken yet when
        # the shutdown starts is cancelled by gRPC itself (then it was not in flight, and CANCELLED is right).
        time.sleep(patience(0.05))
        proc.process.send_signal(signal.SIGHUP)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        from normserve.v1 import normalization_pb2 as pb

        raw.send(in_flight, grpc_frame(pb.GetLayerRequest(name="kept").SerializeToString()))
        assert raw.pump(lambda: in_flight in raw.status, patience(2))
        assert raw.status[in_flight][0] == OK  # finished within the grace period
        raw.close()
    assert proc.process.wait(patience(6)) == 0
    log = proc.log()
    for line in ("SIGHUP received", "shutting down", "stopped; state is in"):
        assert line in log, log[-2000:]
    proc.start()
    with NormClient(proc.target, retry=ONCE) as nc:
        assert [layer.name for layer in nc.list_layers()] == ["kept"]
    assert proc.stop() == 0


def test_the_open_files_soft_limit_is_raised_to_the_hard_one(tmp_path) -> None:
    """Finding 3: a server started under the usual soft limit (1024) raises it to the hard limit."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-files limit here is {hard}: nothing to raise")
    low = 512
    launcher = (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", launcher, str(Path(sys.executable).with_name("normserve")), "serve"]
    command += ["--port", "0", "--state-dir", str(tmp_path / "state")]
    proc = ServerProcess(tmp_path / "state", command=command).start()
    try:
        limits = Path(f"/proc/{proc.process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == line.split()[4], line  # soft == hard
        assert f"raised from {low} to" in proc.log()
    finally:
        assert proc.stop() == 0


def test_silent_metrics_connections_hold_no_thread_for_long(tmp_path) -> None:
    """Finding 13: each silent connection to the metrics port kept a thread and a descriptor for good."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    proc = ServerProcess(tmp_path / "state", "--metrics-port", str(metrics_port)).start()
    try:
        threads = lambda: len(os.listdir(f"/proc/{proc.process.pid}/task"))  # noqa: E731
        before = threads()
        silent = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(200)]
        time.sleep(1)
        assert threads() <= before + 8 + 2, (before, threads())
        gone = lambda: all(s.recv(1) == b"" for s in silent)  # noqa: E731
        for s in silent:
            s.settimeout(patience(3))
        assert gone(), "silent metrics connections stay open"
        for s in silent:
            s.close()
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=patience(1)) as scrape:
            scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := scrape.recv(1 << 16):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200")
        assert b"normserve_layers" in answer
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_client(pki, **extra) -> dict:
    return {"ca_cert": pki["ca"].ca, **extra}


def _refused(target: str, **client) -> None:
    with NormClient(target, retry=ONCE, timeout=patience(0.5), **client) as nc, pytest.raises(Unavailable):
        nc.list_layers()


def _still_open(s: socket.socket) -> bool:
    """Whether the peer keeps ``s`` open: nothing to read, and no end of the stream (read nothing of it)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        s.setblocking(True)


def test_tls_and_mutual_tls_attack_round(tmp_path, pki) -> None:
    """Finding 13: plaintext against TLS and back, half-finished handshakes held open, wrong-CA and expired
    certificates; with mutual TLS a health check needs a client certificate too (SECURITY.md says so)."""
    server, client = pki["server"], pki["client"]
    mtls = ("--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(pki["ca"].ca))
    good = _tls_client(pki, client_cert=client.cert, client_key=client.key)
    proc = ServerProcess(tmp_path / "state", *mtls, client=good).start()
    try:
        # Half-finished handshakes: connections that send part of a ClientHello, or nothing, and hold.
        held = []
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", proc.port))
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
            held.append(s)
        with NormClient(proc.target, retry=ONCE, **good) as nc:
            assert nc.health(timeout=patience(0.5)) == "SERVING"
            nc.create_layer("tls", "batch_norm", num_features=3)
        # Served while they are held, not once the handshake timeout (10 s) has closed them: they are still open.
        assert all(_still_open(s) for s in held), "an honest client waited for the half-finished handshakes"
        # ... and closed once the handshake timeout passes.
        for s in held:
            s.settimeout(transport.HANDSHAKE_SECONDS + patience(2))
        assert all(s.recv(1) == b"" for s in held), "half-finished handshakes stay open"
        for s in held:
            s.close()
        # Plaintext against TLS: refused, and the server carries on.
        raw = RawConnection(proc.port)
        assert raw.call(HEALTH, grpc_frame(b""), timeout=5) is None
        assert not raw.is_open(patience(0.2))
        raw.close()
        _refused(proc.target)
        # No certificate, a certificate from another CA, an expired one: refused, health included.
        _refused(proc.target, **_tls_client(pki))
        expired = pki["expired_client"]
        for cert, key in ((pki["rogue_client"].cert, pki["rogue_client"].key), (expired.cert, expired.key)):
            _refused(proc.target, **_tls_client(pki, client_cert=cert, client_key=key))
        with (
            NormClient(proc.target, retry=ONCE, timeout=patience(0.5), **_tls_client(pki)) as anonymous,
            pytest.raises(Unavailable),
        ):
            anonymous.health(timeout=patience(0.5))
        # A raw TLS handshake without a certificate fails at the handshake, not later.
        context = ssl.create_default_context(cafile=str(pki["ca"].ca))
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", proc.port), timeout=patience(1)) as s:
            try:
                with context.wrap_socket(s, server_hostname="localhost") as tls:
                    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    answer = tls.recv(1)  # TLS 1.3: the server refuses the missing certificate after the hello
            except (ssl.SSLError, ConnectionError):
                answer = b""
            assert answer == b""
        with NormClient(proc.target, retry=ONCE, **good) as nc:
            assert nc.health(timeout=patience(0.5)) == "SERVING"
            assert [layer.name for layer in nc.list_layers()] == ["tls"]
    finally:
        assert proc.stop() == 0

    # TLS against plaintext: the client's handshake fails, the server carries on.
    plain = ServerProcess(tmp_path / "plain").start()
    try:
        _refused(plain.target, **_tls_client(pki))
        with NormClient(plain.target, retry=ONCE) as nc:
            assert nc.health(timeout=patience(0.5)) == "SERVING"
    finally:
        assert plain.stop() == 0

    # An expired server certificate: clients refuse the server.
    old = pki["expired_server"]
    stale = ServerProcess(tmp_path / "stale", "--tls-cert", str(old.cert), "--tls-key", str(old.key))
    stale.client = _tls_client(pki)
    with pytest.raises(TimeoutError):
        stale.start(timeout=patience(0.8))  # never SERVING to a client that checks the certificate
    try:
        _refused(stale.target, **_tls_client(pki))
    finally:
        stale.stop()


def test_transport_settings_are_what_the_server_uses() -> None:
    """Every option has a reason; --allow-compression is the only way to accept compressed requests."""
    settings = transport.server_settings(
        max_message_bytes=1 << 20,
        max_connection_age=60,
        max_connection_age_grace=5,
        max_connection_idle=30,
        max_connections=100,
        compression=False,
    )
    by_option = {s.option: s for s in settings}
    assert len(by_option) == len(settings)
    assert all(s.why for s in settings)
    assert by_option["grpc.compression_enabled_algorithms_bitset"].value == 1
    assert by_option["grpc.max_allowed_incoming_connections"].value == 100
    assert transport.receive_limit(GET_LAYER, 1 << 30) == transport.SMALL_REQUEST_BYTES
    assert transport.receive_limit(TRAIN, 1 << 30) == 1 << 30
    assert transport.receive_limit(HEALTH, 1 << 30) == transport.SMALL_REQUEST_BYTES
    assert transport.connection_budget(1024) == 1024 - transport.RESERVED_DESCRIPTORS
