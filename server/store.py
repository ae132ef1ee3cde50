"""Durable layer state in an embedded SQLite database (WAL mode).

Every write is one transaction that is committed (and, with
``synchronous=FULL``, fsynced) before the method returns, so an update the
server has acknowledged survives ``kill -9`` and power loss. Tensors are
stored as raw bytes with their dtype and shape, so a restart restores them
bit for bit. A write that finds the filesystem full raises
:class:`StateDirFull` and leaves the database as it was; the next write
after space returns goes through.

Each state is stored once. A tensor row holds the value a version gave one
key (``tensors``: layer, key, version), so a Train writes only what it
changed (running_mean, running_var, the counters) and that write is at once
the current state and a kept version: the state at version V is each key's
newest row at or below V, the current state each key's newest row. The last
``keep_versions`` versions of each layer (``versions``; the current one
included) stay readable, and rolled back to, after a restart; a write
forgets the rows no kept version reads. Writing the state once, not a
current copy and a kept copy, is what makes a statistics update cheap.

A database of schema 1 (the current state in ``tensors``, kept copies in
``version_tensors``) is migrated when it is opened, in one transaction.

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
_SCHEMA_VERSION = 2
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    name TEXT PRIMARY KEY,
    config BLOB NOT NULL,               -- the CreateLayer LayerConfig message, serialized
    version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tensors (  -- the value ``version`` gave ``key``, until the key's next row
    layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE,
    key TEXT NOT NULL,                  -- weight, bias, running_mean, running_var
    version INTEGER NOT NULL,
    dtype TEXT NOT NULL,                -- NumPy dtype name
    shape TEXT NOT NULL,                -- JSON list
    data BLOB NOT NULL,                 -- C order, native (little-endian) bytes
    UNIQUE (layer, key, version)        -- a rowid table: a state tensor's bytes sit in its leaf page, where
);                                      -- WITHOUT ROWID spills them to overflow pages (2.3x the write)
CREATE TABLE IF NOT EXISTS versions (  -- the kept versions of each layer, its current one included
    layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL,
    PRIMARY KEY (layer, version)
) WITHOUT ROWID;
"""
# Schema 1 kept the current state in ``tensors`` (no version column) and a copy of each kept version in
# ``version_tensors``; both become rows of the new ``tensors``. The current state's rows win over a copy.
_MIGRATE_FROM_1 = f"""
ALTER TABLE tensors RENAME TO tensors_1;
{_SCHEMA}
INSERT INTO versions SELECT name, version, num_batches_tracked FROM layers WHERE {{recordable}} AND NOT EXISTS
    (SELECT 1 FROM versions WHERE versions.layer = layers.name AND versions.version = layers.version);
INSERT OR IGNORE INTO tensors SELECT tensors_1.layer, key,
    CASE WHEN typeof(layers.version) = 'integer' THEN layers.version ELSE 1 END, dtype, shape, data
    FROM tensors_1 LEFT JOIN layers ON layers.name = tensors_1.layer;
INSERT OR IGNORE INTO tensors SELECT layer, key, version, dtype, shape, data FROM version_tensors
    WHERE EXISTS (SELECT 1 FROM layers WHERE layers.name = version_tensors.layer);
DROP TABLE tensors_1;
DROP TABLE version_tensors;
UPDATE meta SET value = '{_SCHEMA_VERSION}' WHERE key = 'schema_version';
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
        self._open_schema()

    def _acquire_directory_lock(self):
        return lock_directory(self.directory)

    def _open_schema(self) -> None:
        """Create the tables of a new database, migrate one of schema 1, refuse any other schema."""
        self._db.execute(_META)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] == "1":
            self._migrate_from_1()
        elif row is None:
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
        elif row[0] != str(_SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path} has schema version {row[0]}; this normserve reads version {_SCHEMA_VERSION}"
            )

    def _migrate_from_1(self) -> None:
        """Rewrite a schema 1 database as schema 2 in one transaction: all of it, or nothing (a full disk
        answers :class:`StateDirFull` and leaves the file for the next start to migrate)."""
        log.info("migrating %s from schema 1 to %d (each state stored once)", self.path, _SCHEMA_VERSION)
        self._db.execute("PRAGMA foreign_keys=OFF")  # the rename must not rewrite references; restored below
        try:
            self._db.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_FROM_1.format(recordable=_RECORDABLE)} COMMIT;")
        except sqlite3.Error as exc:
            self._rollback()
            if _out_of_space(exc, self.directory):
                raise StateDirFull(self.directory) from exc
            raise
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

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
        # Each key's newest row (SQLite takes a bare column from the row that MAX chose).
        current = "SELECT layer, key, dtype, shape, data, MAX(version) FROM tensors GROUP BY layer, key"
        for layer, key, dtype, shape, data, _ in self._db.execute(current):
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
        rows = self._db.execute(  # each key's newest row at or below the version
            "SELECT key, dtype, shape, data, MAX(version) FROM tensors WHERE layer = ? AND version <= ? GROUP BY key",
            (name, version),
        )
        try:  # kept rows are trusted no more than current ones
            if not _counter(row[0], 0):
                raise ValueError(f"its stored num_batches_tracked {str(row[0])[:40]!r} is not an integer in range")
            tensors = {key: _stored_tensor(key, dtype, shape, data) for key, dtype, shape, data, _ in rows}
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
            self._put_tensors(db, name, version, tensors)
            self._keep_version(db, name, version, num_batches_tracked)

    def update_state(
        self, name: str, version: int, num_batches_tracked: int, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Write the given tensors (those the change made) and the counters as the layer's new version."""
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
                self._put_tensors(db, name, version, tensors)
                self._keep_version(db, name, version, num_batches_tracked)

    def _keep_version(self, db: sqlite3.Connection, name: str, version: int, num_batches_tracked: int) -> None:
        """Record ``version`` (its changed tensors just written); forget versions past the last
        ``keep_versions`` and the tensor rows that no kept version reads any more."""
        db.execute("INSERT INTO versions VALUES (?, ?, ?)", (name, version, num_batches_tracked))
        oldest = version - self.keep_versions + 1  # every kept version is at least this one
        if oldest <= 1:
            return
        db.execute("DELETE FROM versions WHERE layer = ? AND version < ?", (name, oldest))
        # A row older than ``oldest`` with a newer row of its key at or below ``oldest`` is read by no kept
        # version. The few rows older than ``oldest`` are all this looks at (the primary key's order).
        db.execute(
            "DELETE FROM tensors WHERE layer = :name AND version < :oldest AND EXISTS (SELECT 1 FROM tensors AS "
            "newer WHERE newer.layer = :name AND newer.key = tensors.key AND newer.version > tensors.version "
            "AND newer.version <= :oldest)",
            {"name": name, "oldest": oldest},
        )

    def delete_layer(self, name: str, rowid: int | None = None) -> None:
        """Delete layer ``name`` (with its tensors), or the damaged row ``rowid`` its placeholder name stands for."""
        with self._transaction() as db:
            if rowid is None:
                db.execute("DELETE FROM layers WHERE name = ?", (name,))
            else:
                db.execute("DELETE FROM layers WHERE rowid = ?", (rowid,))

    @staticmethod
    def _put_tensors(db: sqlite3.Connection, name: str, version: int, tensors: Mapping[str, np.ndarray]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?, ?, ?)",
            [
                (name, key, version, array.dtype.name, json.dumps(list(array.shape)), array.tobytes())  # C order
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
