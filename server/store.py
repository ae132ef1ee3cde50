"""Durable layer state in an embedded SQLite database (WAL mode).

Every write is one transaction that is committed (and, with
``synchronous=FULL``, fsynced) before the method returns, so an update the
server has acknowledged survives ``kill -9`` and power loss. Tensors are
stored as raw bytes with their dtype and shape, so a restart restores them
bit for bit. A Train rewrites only what it changed (running_mean,
running_var, the counters): two small rows. A write that finds the
filesystem full raises :class:`StateDirFull` and leaves the database as it
was; the next write after space returns goes through.

Besides the current state, the store keeps the whole state of each layer's
last ``keep_versions`` versions (``versions`` and ``version_tensors``; the
current one included), written in the same transaction as the change that
made the version, so that a layer can be read at, and rolled back to, any of
them after a restart too. A database from before versions were kept gets
its layers' current versions recorded when it is opened.

Reading trusts nothing of the file: every column of every row is type- and
range-checked (:meth:`StateStore.load_all`), and a row that fails says why in
its :class:`StoredLayer`'s ``problem``, spoiling that layer alone. A row whose
name is not a layer name (NULL, a BLOB, a newline) is given a placeholder
name, ``damaged-row-<rowid>``, so it can be listed and deleted like any other.

The store is synchronous and not thread-safe; the registry calls it from one
dedicated thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from normserve.server.errors import StateDirFull, VersionDamaged
from normserve.server.layer_config import NAME_PATTERN

try:  # an exclusive lock keeps two servers off one state dir (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "DATABASE_NAME",
    "DEFAULT_KEEP_VERSIONS",
    "KeptVersion",
    "StateStore",
    "StateUpdate",
    "StoreLocked",
    "StoredLayer",
    "lock_directory",
]

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
CREATE TABLE IF NOT EXISTS versions (  -- the kept versions of each layer, its current one included
    layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL,
    PRIMARY KEY (layer, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS version_tensors (  -- a kept version's whole state, as in tensors
    layer TEXT NOT NULL,
    version INTEGER NOT NULL,
    key TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (layer, version, key),
    FOREIGN KEY (layer, version) REFERENCES versions(layer, version) ON DELETE CASCADE
) WITHOUT ROWID;
"""
#: Kept versions of each layer when the server is not told (--keep-versions).
DEFAULT_KEEP_VERSIONS = 10

# SQLite's primary result codes for a write that found no room. Python 3.10 has no
# ``sqlite_errorcode``: there the message (SQLite's fixed text for the code) tells.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_MESSAGE_CODES = {"disk I/O error": _SQLITE_IOERR, "database or disk is full": _SQLITE_FULL}
#: Largest version or num_batches_tracked a stored row may hold: far beyond any count a server reaches
#: (2**62 Trains at a billion a second take 146 years), and every later +1 still fits SQLite's int64.
MAX_COUNTER = 2**62
#: The dtypes layer state is stored in (a layer's param dtype).
_STATE_DTYPES = frozenset({"float32", "float64"})
#: Dimensions of a stored state tensor (a layer's param_shape), and the largest of each.
_MAX_STORED_RANK, _MAX_STORED_DIMENSION = 32, 2**31
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
    config: bytes | None  # None when the stored config is not even bytes
    version: int
    num_batches_tracked: int
    tensors: dict[str, np.ndarray]
    problem: str = ""  # why the row or a stored tensor cannot be used (the layer is then not restorable)
    rowid: int | None = None  # set when ``name`` is a placeholder for a stored name that is not a layer name


@dataclass(frozen=True)
class KeptVersion:
    """A layer's whole state at one of its kept versions."""

    version: int
    num_batches_tracked: int
    tensors: dict[str, np.ndarray]


class StateUpdate(NamedTuple):
    """One layer's new version: its counters and the tensors that changed."""

    name: str
    version: int
    num_batches_tracked: int
    tensors: Mapping[str, np.ndarray]


class StateStore:
    """Layer configs, versions and state tensors under ``directory``; the last ``keep_versions`` states of
    each layer besides."""

    def __init__(
        self, directory: str | Path, synchronous: str = "FULL", keep_versions: int = DEFAULT_KEEP_VERSIONS
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1 (the current version), got {keep_versions}")
        self.keep_versions = keep_versions
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
        self._record_current_versions()

    def _acquire_directory_lock(self):
        return lock_directory(self.directory)

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
        elif row[0] != str(_SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path} has schema version {row[0]}; this normserve reads version {_SCHEMA_VERSION}"
            )

    def _record_current_versions(self) -> None:
        """Keep every layer's current version that is not kept yet (a database from before versions were kept,
        or written by such a server since). Without room it stays unrecorded until the layer's next change.

        Only rows that can be a layer's version are copied: a damaged row (a NULL name, a version that is no
        integer) must not stop the start with a constraint error; load_all reports it instead."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO versions SELECT name, version, num_batches_tracked FROM layers WHERE "
                    f"{_RECORDABLE} AND NOT EXISTS "
                    "(SELECT 1 FROM versions WHERE versions.layer = layers.name AND versions.version = layers.version)"
                )
                db.execute(
                    "INSERT OR IGNORE INTO version_tensors SELECT tensors.layer, layers.version, key, dtype, shape, "
                    f"data FROM tensors JOIN layers ON layers.name = tensors.layer WHERE {_RECORDABLE}"
                )
        except StateDirFull:
            log.warning("the state directory %s is full: current versions are kept from their next change", self.path)

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
        """Every stored layer, sorted by name; one whose row or tensors cannot be used says why in ``problem``
        (its counters then read 0 where they are not in range)."""
        tensors: dict[Any, dict[str, np.ndarray]] = {}
        problems: dict[Any, str] = {}
        for layer, key, dtype, shape, data in self._db.execute("SELECT layer, key, dtype, shape, data FROM tensors"):
            try:
                array = _stored_tensor(key, dtype, shape, data)
            except Exception as exc:  # whatever a damaged row holds, it spoils its layer only
                shown = key if isinstance(key, str) else type(key).__name__
                problems.setdefault(layer, f"stored tensor {shown!r} is unreadable ({type(exc).__name__}: {exc})")
                continue
            tensors.setdefault(layer, {})[key] = array
        rows = list(self._db.execute("SELECT rowid, name, config, version, num_batches_tracked FROM layers"))
        names = {row[1] for row in rows if _is_name(row[1])}
        layers = []
        for rowid, name, config, version, count in rows:
            problem = problems.get(name, "") if _is_name(name) else ""
            problem = "; ".join(p for p in (_row_problem(name, config, version, count), problem) if p)
            placeholder = None if _is_name(name) else _placeholder(rowid, names)
            layers.append(
                StoredLayer(
                    name if placeholder is None else placeholder,
                    config if isinstance(config, bytes) else None,
                    version if _counter(version, 1) else 0,
                    count if _counter(count, 0) else 0,
                    tensors.get(name, {}) if placeholder is None else {},
                    problem,
                    None if placeholder is None else rowid,
                )
            )
        return sorted(layers, key=lambda layer: layer.name)

    def oldest_versions(self) -> dict[str, int]:
        """Each layer's oldest kept version (layers with none kept are left out)."""
        return dict(
            self._db.execute(
                "SELECT layer, MIN(version) FROM versions WHERE typeof(layer) = 'text' AND typeof(version) = 'integer' "
                "AND version >= 1 GROUP BY layer"
            )
        )

    def load_version(self, name: str, version: int) -> KeptVersion | None:
        """Layer ``name``'s whole state at ``version``; None when that version is not kept."""
        row = self._db.execute(
            "SELECT num_batches_tracked FROM versions WHERE layer = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            return None
        rows = self._db.execute(
            "SELECT key, dtype, shape, data FROM version_tensors WHERE layer = ? AND version = ?", (name, version)
        )
        try:  # kept rows are trusted no more than current ones
            if not _counter(row[0], 0):
                raise ValueError(f"its stored num_batches_tracked {str(row[0])[:40]!r} is not an integer in range")
            tensors = {key: _stored_tensor(key, dtype, shape, data) for key, dtype, shape, data in rows}
        except ValueError as exc:
            raise VersionDamaged(name, version, str(exc)) from None
        return KeptVersion(version, row[0], tensors)

    def disk_bytes(self) -> int:
        """Bytes of the database and its WAL on disk (any thread may ask)."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    # ----------------------------------------------------------------- writes
    def create_layer(
        self, name: str, config: bytes, version: int, num_batches_tracked: int, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Insert a new layer with its full state."""
        with self._transaction() as db:
            db.execute("INSERT INTO layers VALUES (?, ?, ?, ?)", (name, config, version, num_batches_tracked))
            self._put_tensors(db, name, tensors)
            self._keep_version(db, name, version, num_batches_tracked)

    def update_state(
        self, name: str, version: int, num_batches_tracked: int, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Overwrite the given tensors and the counters of an existing layer."""
        self.update_states([StateUpdate(name, version, num_batches_tracked, tensors)])

    def update_states(self, updates: Sequence[StateUpdate]) -> None:
        """:meth:`update_state` of each, in order, in one transaction: all are stored or none is (one
        commit, so one sync to disk, for a message of many updates)."""
        with self._transaction() as db:
            for name, version, num_batches_tracked, tensors in updates:
                cursor = db.execute(
                    "UPDATE layers SET version = ?, num_batches_tracked = ? WHERE name = ?",
                    (version, num_batches_tracked, name),
                )
                if cursor.rowcount != 1:
                    raise KeyError(name)
                self._put_tensors(db, name, tensors)
                self._keep_version(db, name, version, num_batches_tracked)

    def _keep_version(self, db: sqlite3.Connection, name: str, version: int, num_batches_tracked: int) -> None:
        """Keep the layer's whole state (just written) as ``version``; forget versions past the last
        ``keep_versions``."""
        db.execute("INSERT INTO versions VALUES (?, ?, ?)", (name, version, num_batches_tracked))
        db.execute(
            "INSERT INTO version_tensors SELECT layer, ?, key, dtype, shape, data FROM tensors WHERE layer = ?",
            (version, name),
        )
        db.execute("DELETE FROM versions WHERE layer = ? AND version <= ?", (name, version - self.keep_versions))

    def delete_layer(self, name: str, rowid: int | None = None) -> None:
        """Delete layer ``name`` (with its tensors), or the damaged row ``rowid`` its placeholder name stands for."""
        with self._transaction() as db:
            if rowid is None:
                db.execute("DELETE FROM layers WHERE name = ?", (name,))
            else:
                db.execute("DELETE FROM layers WHERE rowid = ?", (rowid,))

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


def _is_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


_RECORDABLE = "typeof(layers.name) = 'text' AND typeof(layers.version) = 'integer' AND layers.version >= 1"


def _counter(value: Any, minimum: int) -> bool:
    """Whether ``value`` is a stored counter in range (an INTEGER; SQLite may hand back any type)."""
    return type(value) is int and minimum <= value <= MAX_COUNTER


def _placeholder(rowid: int, taken: set[str]) -> str:
    """A layer name for the damaged row ``rowid`` that no stored layer has."""
    name = f"damaged-row-{rowid}"
    while name in taken:
        name += "_"
    return name


def _row_problem(name: Any, config: Any, version: Any, count: Any) -> str:
    """Why a row of the layers table cannot be a layer, or ""."""
    problems = []
    if not _is_name(name):
        shown = repr(name)[:80] if isinstance(name, (str, bytes)) else type(name).__name__
        problems.append(f"its stored name {shown} is not a layer name")
    if not isinstance(config, bytes):
        problems.append(f"its stored config is {type(config).__name__}, not a serialized LayerConfig (BLOB)")
    if not _counter(version, 1):
        problems.append(f"its stored version {str(version)[:40]!r} is not an integer in [1, 2**62]")
    if not _counter(count, 0):
        problems.append(f"its stored num_batches_tracked {str(count)[:40]!r} is not an integer in [0, 2**62]")
    return "; ".join(problems)


def _stored_tensor(key: Any, dtype: Any, shape: Any, data: Any) -> np.ndarray:
    """A row of the tensors table as a read-only array, every column checked (ValueError says which is bad)."""
    if not isinstance(key, str):
        raise ValueError(f"its key is {type(key).__name__}, not TEXT")
    if dtype not in _STATE_DTYPES:
        raise ValueError(f"its dtype {str(dtype)[:40]!r} is not one of {sorted(_STATE_DTYPES)}")
    dims = json.loads(shape) if isinstance(shape, str) and len(shape) < 1024 else None
    if not (
        isinstance(dims, list)
        and len(dims) <= _MAX_STORED_RANK
        and all(type(d) is int and 0 <= d <= _MAX_STORED_DIMENSION for d in dims)
    ):
        raise ValueError(f"its shape {str(shape)[:80]!r} is not a JSON list of dimensions")
    if not isinstance(data, bytes):
        raise ValueError(f"its data is {type(data).__name__}, not a BLOB")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims)  # a view: no copy
