"""TLS credentials and bearer tokens.

Tokens live in a file, one per line (blank lines and ``#`` comments are
ignored). The file is re-read when it changes (checked at most once a
second), so tokens rotate without a restart; a file that becomes unreadable
or empty keeps the previous tokens and logs an error. Tokens are compared as
SHA-256 digests with :func:`hmac.compare_digest`, so neither timing nor
length reveals them, and they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["TlsFiles", "TokenSet"]

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate chain and key, and (for mutual TLS) the CA of client certificates."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials; with ``client_ca``, clients must present a certificate it signed."""
        client_ca = None if self.client_ca is None else _read(self.client_ca, "client CA file (--tls-client-ca)")
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key file (--tls-key)"), _read(self.cert, "TLS certificate file (--tls-cert)"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def describe(self) -> str:
        return "mutual TLS" if self.client_ca is not None else "TLS"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenSet:
    """The bearer tokens in a file, re-read when the file changes."""

    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._digests, self._signature = self._load()
        if not self._digests:
            raise ValueError(f"the token file {self.path} holds no tokens (one per line; # starts a comment)")
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> tuple[tuple[bytes, ...], tuple[int, int, int]]:
        text = _read(self.path, "token file (--auth-token-file)").decode("utf-8", "replace")
        signature = self._stat()
        tokens = (line.strip() for line in text.splitlines())
        return tuple(_digest(t) for t in tokens if t and not t.startswith("#")), signature

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RECHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            try:
                if self._stat() == self._signature:
                    return
                digests, signature = self._load()
            except (OSError, ValueError) as exc:
                log.error("keeping the previous tokens: %s", exc)
                return
            if not digests:
                log.error("keeping the previous tokens: %s now holds none", self.path)
                return
            self._digests, self._signature = digests, signature
            log.info("reloaded %d token(s) from %s", len(digests), self.path)

    def problem(self, authorization: str | None) -> str | None:
        """None when ``authorization`` is ``Bearer <a known token>``; otherwise what is wrong, for the client."""
        if not authorization:
            return "this server requires a token: send the metadata 'authorization: Bearer <token>'"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must read 'Bearer <token>'"
        self._refresh()
        candidate = _digest(token.strip())
        known = False
        for digest in self._digests:  # no early exit: the time taken does not say which token matched
            known |= hmac.compare_digest(candidate, digest)
        return None if known else "the token is not valid for this server"
