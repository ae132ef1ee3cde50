"""Durable layer state in an embedded SQLite database (WAL mode).

Every write is one transaction that is committed (and, with
``synchronous=FULL``, fsynced) before the method returns, so an update the
server has acknowledged survives ``kill -9`` and power loss. Tensors are
stored as raw bytes with their dtype and shape, so a restart restores them
bit for bit. A Train rewrites only what it changed (running_mean,
running_var, the counters): two small rows. A write that finds the
filesystem full raises :class:`StateDirFull` and leaves the database as it
was; the next write after space returns goes through.

The store is synchronous and not thread-safe; the registry calls it from one
dedicated thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from normserve.server.errors import StateDirFull

try:  # an exclusive lock keeps two servers off one state dir (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["DATABASE_NAME", "StateStore", "StoreLocked", "StoredLayer", "lock_directory"]

log = logging.getLogger(__name__)

DATABASE_NAME = "normserve.sqlite3"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    name TEXT PRIMARY KEY,
    config BLOB NOT NULL,               -- the CreateLayer LayerConfig message, serialized
    version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tensors (
    layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE,
    key TEXT NOT NULL,                  -- weight, bias, running_mean, running_var
    dtype TEXT NOT NULL,                -- NumPy dtype name
    shape TEXT NOT NULL,                -- JSON list
    data BLOB NOT NULL,                 -- C order, native (little-endian) bytes
    PRIMARY KEY (layer, key)
) WITHOUT ROWID;
"""

# SQLite's primary result codes for a write that found no room. Python 3.10 has no
# ``sqlite_errorcode``: there the message (SQLite's fixed text for the code) tells.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_MESSAGE_CODES = {"disk I/O error": _SQLITE_IOERR, "database or disk is full": _SQLITE_FULL}
#: An I/O error with less free space than this is taken for ENOSPC/EDQUOT that SQLite reported
#: as IOERR (e.g. found late, at fsync), which it does not tell apart from a failing disk.
_NEARLY_FULL_BYTES = 1 << 20


def _out_of_space(exc: sqlite3.Error, directory: Path) -> bool:
    """Whether SQLite failed for want of room in ``directory``'s filesystem."""
    code = getattr(exc, "sqlite_errorcode", None)
    code = _MESSAGE_CODES.get(str(exc)) if code is None else code & 0xFF
    if code == _SQLITE_IOERR:
        try:
            return shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES
        except OSError:
            return False
    return code == _SQLITE_FULL


class StoreLocked(RuntimeError):
    """Another process holds the state directory."""


def lock_directory(directory: Path) -> IO[str]:
    """Hold ``directory``'s LOCK exclusively (StoreLocked when another process does) until the file is closed."""
    handle = open(directory / "LOCK", "a+")  # noqa: SIM115 - held open for as long as the lock is
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreLocked(
                f"state dir {directory} is in use by another normserve process; stop it or pass a different --state-dir"
            ) from None
    return handle


@dataclass(frozen=True)
class StoredLayer:
    name: str
    config: bytes
    version: int
    num_batches_tracked: int
    tensors: dict[str, np.ndarray]
    problem: str = ""  # why a stored tensor cannot be read (the layer is then not restorable)


class StateStore:
    """Layer configs, versions and state tensors under ``directory``."""

    def __init__(self, directory: str | Path, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DATABASE_NAME
        self._lock_file = self._acquire_directory_lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._check_schema_version()

    def _acquire_directory_lock(self):
        return lock_directory(self.directory)

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
        elif int(row[0]) != _SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {row[0]}; this normserve reads version {_SCHEMA_VERSION}"
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed, or the database is left as it was.

        A full disk answers :class:`StateDirFull`; any other SQLite error surfaces as it is.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            if _out_of_space(exc, self.directory):
                raise StateDirFull(self.directory) from exc
            raise

    def _rollback(self) -> None:
        """Roll back the open transaction, if any, without masking the error that caused it.

        SQLite itself rolls back after some errors (SQLITE_FULL, IOERR), so there may be none.
        """
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed in %s", self.path)

    # ------------------------------------------------------------------ reads
    def load_all(self) -> list[StoredLayer]:
        """Every stored layer, sorted by name; one whose tensors cannot be read says why in ``problem``."""
        tensors: dict[str, dict[str, np.ndarray]] = {}
        problems: dict[str, str] = {}
        for layer, key, dtype, shape, data in self._db.execute("SELECT layer, key, dtype, shape, data FROM tensors"):
            try:
                array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))  # read-only view
            except Exception as exc:  # whatever a damaged row holds, it spoils its layer only
                problems.setdefault(layer, f"stored tensor {key!r} is unreadable ({type(exc).__name__}: {exc})")
                continue
            tensors.setdefault(layer, {})[key] = array
        rows = self._db.execute("SELECT name, config, version, num_batches_tracked FROM layers ORDER BY name")
        return [
            StoredLayer(name, bytes(config), v, nbt, tensors.get(name, {}), problems.get(name, ""))
            for name, config, v, nbt in rows
        ]

    # ----------------------------------------------------------------- writes
    def create_layer(
        self, name: str, config: bytes, version: int, num_batches_tracked: int, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Insert a new layer with its full state."""
        with self._transaction() as db:
            db.execute("INSERT INTO layers VALUES (?, ?, ?, ?)", (name, config, version, num_batches_tracked))
            self._put_tensors(db, name, tensors)

    def update_state(
        self, name: str, version: int, num_batches_tracked: int, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Overwrite the given tensors and the counters of an existing layer."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE layers SET version = ?, num_batches_tracked = ? WHERE name = ?",
                (version, num_batches_tracked, name),
            )
            if cursor.rowcount != 1:
                raise KeyError(name)
            self._put_tensors(db, name, tensors)

    def delete_layer(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM layers WHERE name = ?", (name,))

    @staticmethod
    def _put_tensors(db: sqlite3.Connection, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?, ?)",
            [
                (name, key, array.dtype.name, json.dumps(list(array.shape)), array.tobytes())  # C order
                for key, array in tensors.items()
            ],
        )

    def close(self) -> None:
        """Fold the WAL into the database file and release the directory.

        Folding needs room; without it the WAL stays, still valid, and the next open replays it,
        so a failed checkpoint is logged and the store closes all the same.
        """
        if self._db is None:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            if _out_of_space(exc, self.directory):
                log.warning(
                    "the state directory %s is full: the WAL stays and is replayed at the next start", self.directory
                )
            else:
                log.exception("checkpoint of %s failed: the WAL stays and is replayed at the next start", self.path)
        try:
            self._db.close()
        finally:
            self._db = None
            self._lock_file.close()
