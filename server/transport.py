"""Every gRPC transport setting the server and its peer channels use, each with the reason for its value.

This module is the one place they are declared: :func:`server_settings` is
what ``grpc.aio.server`` gets, :data:`PEER_CHANNEL` what the channels to
``--peers`` get, :func:`receive_limit` the message size each method may
receive, and the other constants bound calls that gRPC's options cannot.
SECURITY.md's *Transport limits* table is checked against
:func:`server_settings` (tests/test_transport.py), so the two cannot drift.

Why these matter: gRPC does all of this *before* any interceptor runs, so
before the token check. Unbounded, a party without a token could make the
server inflate a compressed request (0.5 MB became 512 MiB), keep calls that
sent only their headers forever, or hold connections until descriptors ran
out.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import wire

__all__ = [
    "HANDSHAKE_SECONDS",
    "MAX_STREAMS_PER_CONNECTION",
    "MAX_WATCH_STREAMS",
    "PEER_CHANNEL",
    "SMALL_REQUEST_BYTES",
    "Setting",
    "connection_budget",
    "markdown_table",
    "peer_channel_options",
    "raise_descriptor_limit",
    "receive_limit",
    "server_settings",
]

log = logging.getLogger(__name__)

#: Streams (calls) one HTTP/2 connection may have open at once; more are refused by HTTP/2 itself
#: (REFUSED_STREAM) and honest gRPC clients queue them. 128 is nginx's default too.
MAX_STREAMS_PER_CONNECTION = 128
#: Seconds a new connection has to finish its TLS handshake and HTTP/2 preface (gRPC's default: 120).
HANDSHAKE_SECONDS = 10
#: Largest request of a method whose request carries no tensor (health, reflection, GetLayer, ListLayers,
#: CreateLayer, ...): its names and config fit many times over.
SMALL_REQUEST_BYTES = 1 << 20
#: Health/Watch streams open at once, server-wide. They take no --max-concurrent-rpcs slot (health must stay
#: answerable when calls fill the slots), so they are bounded here; more answer RESOURCE_EXHAUSTED.
MAX_WATCH_STREAMS = 256
#: Descriptors kept out of the connection budget: SQLite and its journal, shared-memory regions, the metrics
#: port and its connections, log files, CUDA and numba.
RESERVED_DESCRIPTORS = 256
#: Connections when the descriptor limit allows more: enough for many training jobs and a load balancer.
DEFAULT_MAX_CONNECTIONS = 4096

_IDENTITY_ONLY = 1  # bit 0: the identity "compression" (none)
_IDENTITY_DEFLATE_GZIP = 0b111

#: Channels to the other replicas (--peers): they answer ListLayers and health for the cluster views.
PEER_CHANNEL: tuple[tuple[str, int], ...] = (
    # A restarted peer is asked again within a second, not after gRPC's default backoff (up to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def peer_channel_options(max_message_bytes: int) -> tuple[tuple[str, int], ...]:
    """What a channel to a ``--peers`` replica gets: :data:`PEER_CHANNEL`, and the server's own message limit
    both ways (gRPC's default 4 MiB receive limit made a large peer answer UNAVAILABLE)."""
    return (
        *PEER_CHANNEL,
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    )


@dataclass(frozen=True)
class Setting:
    """One gRPC channel argument: its value, the flag that sets it (if any) and why it has that value."""

    option: str
    value: int
    flag: str | None
    why: str


def server_settings(
    *,
    max_message_bytes: int,
    max_connection_age: float,
    max_connection_age_grace: float,
    max_connection_idle: float,
    max_connections: int,
    compression: bool,
) -> list[Setting]:
    """The channel arguments of the gRPC server, in the order SECURITY.md's table lists them."""
    return [
        Setting(
            "grpc.max_receive_message_length",
            max_message_bytes,
            "--max-message-bytes",
            "largest message a call may send; gRPC holds a message whole before any handler sees it, so this "
            "bounds what one request pins before it is checked (methods without tensors: 1 MiB, checked before "
            "parsing)",
        ),
        Setting(
            "grpc.max_send_message_length",
            max_message_bytes,
            "--max-message-bytes",
            "largest answer; unary answers that would not fit are refused before the work",
        ),
        Setting(
            "grpc.compression_enabled_algorithms_bitset",
            _IDENTITY_DEFLATE_GZIP if compression else _IDENTITY_ONLY,
            "--allow-compression",
            "gRPC inflates a compressed message before any interceptor or token check (0.5 MB inflated to "
            "512 MiB); off, a gzip or deflate request answers UNIMPLEMENTED before its body is read. The Python "
            "client never compresses",
        ),
        Setting(
            "grpc.max_concurrent_streams",
            MAX_STREAMS_PER_CONNECTION,
            None,
            "calls one connection may have open: each pending call holds memory in gRPC (400,000 on one "
            "connection held 600 MB)",
        ),
        Setting(
            "grpc.max_allowed_incoming_connections",
            max_connections,
            "--max-connections",
            "connections open at once; each holds a descriptor, and without a cap idle connections used up the "
            "descriptors (1100 locked every client out). Default: what the descriptor limit leaves",
        ),
        Setting(
            "grpc.server_handshake_timeout_ms",
            HANDSHAKE_SECONDS * 1000,
            None,
            "a connection that does not finish its TLS handshake and HTTP/2 preface in time is closed",
        ),
        Setting(
            "grpc.max_connection_idle_ms",
            int(max_connection_idle * 1000),
            "--max-connection-idle",
            "a connection without calls for this long is closed (GOAWAY); clients reconnect by themselves",
        ),
        Setting(
            "grpc.max_connection_age_ms",
            int(max_connection_age * 1000),
            "--max-connection-age",
            "no call outlives its connection: even one whose client stopped reading frees its slot",
        ),
        Setting(
            "grpc.max_connection_age_grace_ms",
            int(max_connection_age_grace * 1000),
            "--max-connection-age-grace",
            "calls on an aged connection get this long to finish before it is closed",
        ),
        Setting(
            "grpc.keepalive_time_ms",
            60_000,
            None,
            "the server pings a connection silent this long, so a peer that vanished (no FIN) is noticed",
        ),
        Setting(
            "grpc.keepalive_timeout_ms",
            20_000,
            None,
            "... and closes it when the ping is not answered in this time, ending its calls",
        ),
        Setting(
            "grpc.http2.min_ping_interval_without_data_ms",
            300_000,
            None,
            "pings a client may send without data at most this often ...",
        ),
        Setting(
            "grpc.http2.max_ping_strikes",
            2,
            None,
            "... and a client that pings more often than that this many times is disconnected (ping flood)",
        ),
        Setting("grpc.so_reuseport", 0, None, "a port in use is an error, not a silently shared socket"),
    ]


_BULK = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


def _holds_bulk(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold bulk data at any depth: bytes (tensors, state) or repeated
    floats (per-channel statistics)."""
    if descriptor.full_name in seen:
        return False
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_BYTES or (field.type in _BULK and field.is_repeated):
            return True
        if field.message_type is not None and _holds_bulk(field.message_type, seen | {descriptor.full_name}):
            return True
    return False


_TENSOR_REQUESTS = frozenset(
    method.path
    for method in wire.methods(pb.DESCRIPTOR.services_by_name["Normalization"])
    if method.streaming or _holds_bulk(method.request_type.DESCRIPTOR)
)


def receive_limit(method: str, max_message_bytes: int) -> int:
    """Bytes a request of ``method`` (its full path) may have: --max-message-bytes for requests that carry
    tensors, :data:`SMALL_REQUEST_BYTES` for the others (health and reflection included)."""
    return max_message_bytes if method in _TENSOR_REQUESTS else min(SMALL_REQUEST_BYTES, max_message_bytes)


def raise_descriptor_limit() -> int:
    """Raise the soft limit of open files to the hard one (the usual soft limit, 1024, is few for a server);
    returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps lower
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("open-files limit raised from %d to %d (the hard limit)", soft, hard)
    return hard


def connection_budget(descriptors: int) -> int:
    """Connections the descriptor limit leaves room for, after :data:`RESERVED_DESCRIPTORS`."""
    if descriptors == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, descriptors - RESERVED_DESCRIPTORS))


def _shown(setting: Setting) -> str:
    value = setting.value
    if setting.option.endswith("_ms"):
        return f"{value / 1000:g} s"
    if setting.option.endswith("message_length"):
        return f"{value} bytes"
    if setting.option == "grpc.compression_enabled_algorithms_bitset":
        return "identity only" if value == _IDENTITY_ONLY else "identity, deflate, gzip"
    if setting.option == "grpc.max_allowed_incoming_connections":
        return f"open-files limit - {RESERVED_DESCRIPTORS}, at most {DEFAULT_MAX_CONNECTIONS}"
    return str(value)


def markdown_table(defaults: Any) -> str:
    """SECURITY.md's table of the server's settings at ``defaults`` (a ServerOptions)."""
    settings = server_settings(
        max_message_bytes=defaults.limits.max_message_bytes,
        max_connection_age=defaults.max_connection_age,
        max_connection_age_grace=defaults.max_connection_age_grace,
        max_connection_idle=defaults.max_connection_idle,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        compression=defaults.compression,
    )
    rows = ["| gRPC option | default | flag | why |", "|---|---|---|---|"]
    for setting in settings:
        flag = f"`{setting.flag}`" if setting.flag else "fixed"
        rows.append(f"| `{setting.option}` | {_shown(setting)} | {flag} | {setting.why} |")
    rows.append(
        f"| per-method receive limit | {SMALL_REQUEST_BYTES} bytes | fixed | requests without tensors (health, "
        "reflection, GetLayer, ListLayers, CreateLayer, ...) larger than this answer RESOURCE_EXHAUSTED unparsed |"
    )
    rows.append(
        f"| Health/Watch streams | {MAX_WATCH_STREAMS} | fixed | they take no `--max-concurrent-rpcs` slot (health "
        "stays answerable when calls fill the slots), so they have a cap of their own |"
    )
    rows.append(
        "| unary request wait | `--default-deadline` | `--default-deadline` | a unary call's message must arrive "
        "within it of the call's headers (gRPC itself waits forever), else DEADLINE_EXCEEDED |"
    )
    for option, value in PEER_CHANNEL:
        rows.append(
            f"| peers: `{option}` | {value / 1000:g} s | fixed | channels to `--peers`: a restarted peer "
            "is asked again within a second |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # python -m normserve.server.transport: the table SECURITY.md holds
    from normserve.server.app import ServerOptions

    print(markdown_table(ServerOptions()))
