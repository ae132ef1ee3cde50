"""A raw HTTP/2 gRPC client (the ``h2`` package) that sends what a real client never would.

It speaks just enough gRPC over HTTP/2 to attack the transport: compressed
messages, calls that send only their headers, more streams than the server
allows, connections that stay idle. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from serverproc import patience

#: Headers of a gRPC call besides its path.
_CALL = (("content-type", "application/grpc"), ("te", "trailers"))


def grpc_frame(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">BI", int(compressed), len(payload)) + payload


def _bound(timeout: float | None) -> float:
    """``timeout``, or by default what catches a hang of a call or a read that takes milliseconds alone."""
    return patience(1) if timeout is None else timeout


class RawConnection:
    """One HTTP/2 connection to ``127.0.0.1:port``; ``status[stream]`` is each ended call's (code, message)."""

    def __init__(self, port: int, timeout: float | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=_bound(timeout))
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self._keep_open_after_goaway()
        self.conn.initiate_connection()
        self.status: dict[int, tuple[int, str]] = {}
        self.reset: set[int] = set()  # streams the server reset (RST_STREAM)
        self.closed = False  # the server closed the connection or sent GOAWAY
        self.goaway = False  # the server sent a graceful GOAWAY (shutting down, or the connection idled or aged)
        self.advertised_streams: int | None = None  # the server's SETTINGS_MAX_CONCURRENT_STREAMS, once known
        self._flush()

    def _keep_open_after_goaway(self) -> None:
        """A graceful GOAWAY lets the streams it names finish (RFC 9113, 6.8); h2 would close the connection
        at once, so its state machine stays open after one (a real client's calls finish too)."""
        machine = self.conn.state_machine
        process = machine.process_input

        def process_input(input_: h2.connection.ConnectionInputs) -> list:
            state = machine.state
            result = process(input_)
            if input_ is h2.connection.ConnectionInputs.RECV_GOAWAY:
                machine.state = state
            return result

        machine.process_input = process_input

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def ignore_stream_limit(self) -> None:
        """Open streams past the server's SETTINGS_MAX_CONCURRENT_STREAMS (h2 itself would refuse to)."""
        self.pump(lambda: self.advertised_streams is not None, _bound(None))
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1 << 30
        self.conn.remote_settings.acknowledge()

    def start_call(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send a call's headers only; returns its stream id."""
        stream = self.conn.get_next_available_stream_id()
        request = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "normserve")]
        self.conn.send_headers(stream, [*request, *_CALL, *headers])
        self._flush()
        return stream

    def send(self, stream: int, data: bytes, end: bool = True, timeout: float | None = None) -> bool:
        """Send ``data`` on ``stream`` as flow control allows; False if the stream or connection ended first."""
        view, timeout = memoryview(data), _bound(timeout)
        while True:
            if not self.pump(lambda: self.conn.local_flow_control_window(stream) > 0 or self._ended(stream), timeout):
                return False
            if self._ended(stream):
                return False
            n = min(len(view), self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
            last = n == len(view)
            self.conn.send_data(stream, view[:n].tobytes(), end_stream=end and last)
            self._flush()
            view = view[n:]
            if last:
                return True

    def call(self, path: str, data: bytes, headers: Sequence[tuple[str, str]] = (), timeout: float | None = None):
        """A whole unary call: its (code, message), or None if no status came within ``timeout``."""
        stream, timeout = self.start_call(path, headers), _bound(timeout)
        self.send(stream, data, timeout=timeout)
        self.pump(lambda: self._ended(stream), timeout)
        return self.status.get(stream)

    def _ended(self, stream: int) -> bool:
        return stream in self.status or stream in self.reset or self.closed

    def ended(self, streams: Sequence[int]) -> int:
        return sum(self._ended(stream) for stream in streams)

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Read and handle what the server sends until ``until()`` holds (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return until()
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            for event in self.conn.receive_data(data):
                self._handle(event)
            self._flush()
        return True

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            headers = dict(event.headers)
            if "grpc-status" in headers:
                self.status[event.stream_id] = (int(headers["grpc-status"]), headers.get("grpc-message", ""))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None and self.advertised_streams is None:
                self.advertised_streams = changed.new_value
        elif isinstance(event, h2.events.StreamReset):
            self.reset.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                self.closed = True
            else:
                self.goaway = True
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def is_open(self, wait: float = 0.0) -> bool:
        """Whether the server still keeps this connection (read what it sent for up to ``wait`` seconds)."""
        self.pump(lambda: False, wait) if wait else self.pump(lambda: True, 0)
        if self.closed:
            return False
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(1 << 16):
                for event in self.conn.receive_data(data):
                    self._handle(event)
            self.closed = True  # b"": closed
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(True)
        return not self.closed

    def close(self) -> None:
        self.sock.close()
