"""``normserve backup`` and ``normserve restore``: a state directory's database, copied out and put back.

A backup is SQLite's online backup of ``STATE_DIR/normserve.sqlite3`` in one
step: one read transaction, so a consistent snapshot (every layer as of one
committed write), taken beside a running server without holding up its
writes (the store runs in WAL mode, where readers and the writer do not
block each other). It runs on the server's host, on its state directory;
the result is one self-contained file (rollback journal mode, no -wal).

A restore replaces a *stopped* server's database with a backup:

- it holds the state directory's LOCK throughout, so it refuses while a
  server runs on it, and no server starts on it halfway;
- it checks the backup first (SQLite's integrity check, then the store opens
  it and reads every layer) on a copy inside the state directory;
- a database that holds layers is replaced only with ``--yes``, and is kept
  beside the new one as ``normserve.sqlite3.before-restore-<time>``;
- the checked copy then takes the database's place by one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from normserve.server.store import DATABASE_NAME, StateStore, StoreLocked, lock_directory

__all__ = ["BackupError", "Copied", "backup", "restore"]

#: Seconds a read may wait for SQLite locks (a checkpoint or WAL recovery in progress).
_BUSY_SECONDS = 30.0


class BackupError(RuntimeError):
    """A backup or restore that could not be done; nothing was changed."""


@dataclass(frozen=True)
class Copied:
    path: Path  # the file written: the backup, or the restored database
    layers: int
    kept: Path | None = None  # restore: where the database it replaced was kept


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise BackupError(f"{path} does not exist")
    try:
        return sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=_BUSY_SECONDS)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {path}: {exc}") from None


def _copy(source: sqlite3.Connection, target: Path) -> int | None:
    """SQLite's backup of ``source`` into a new single-file database at ``target``; its layer count (None: it
    has no layers table, so it is no normserve state)."""
    target.unlink(missing_ok=True)
    copy = sqlite3.connect(target, isolation_level=None)
    try:
        source.backup(copy)  # pages=-1: every page in one step, under one read transaction: one snapshot
        copy.execute("PRAGMA journal_mode=DELETE")  # one file, whatever mode the source ran in
        if (verdict := copy.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
            raise BackupError(f"the copy fails SQLite's integrity check: {verdict}")
        try:
            return copy.execute("SELECT count(*) FROM layers").fetchone()[0]
        except sqlite3.OperationalError:
            return None
    finally:
        copy.close()


def _durable(path: Path) -> None:
    """fsync ``path`` and its folder: the file survives a power loss once this returns."""
    for name, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
        fd = os.open(name, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def backup(state_dir: Path, dest: Path) -> Copied:
    """Copy ``state_dir``'s database to ``dest`` (replaced by one rename when it exists), while a server runs."""
    source = _read_only(state_dir / DATABASE_NAME)
    scratch = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            layers = _copy(source, scratch)
        except sqlite3.Error as exc:
            raise BackupError(f"backup of {state_dir / DATABASE_NAME} failed: {exc}") from None
        if layers is None:
            raise BackupError(f"{state_dir / DATABASE_NAME} is not a normserve state database (no layers table)")
        _durable(scratch)
        os.replace(scratch, dest)
        _durable(dest)
    finally:
        source.close()
        scratch.unlink(missing_ok=True)
    return Copied(dest, layers)


@contextlib.contextmanager
def _held(state_dir: Path) -> Iterator[None]:
    try:
        lock = lock_directory(state_dir)
    except StoreLocked:
        raise BackupError(
            f"a normserve server holds {state_dir}: stop it first (restore replaces the state of a stopped server)"
        ) from None
    try:
        yield
    finally:
        lock.close()


def _check(staging: Path) -> int:
    """Open the staged database as the server would (schema version, every layer read): its layer count."""
    try:
        store = StateStore(staging)
    except (RuntimeError, sqlite3.Error) as exc:
        raise BackupError(f"the backup cannot be served: {exc}") from None
    try:
        return len(store.load_all())
    finally:
        store.close()  # folds its WAL: the staged file is whole by itself


def restore(src: Path, state_dir: Path, replace: bool = False) -> Copied:
    """Make the backup ``src`` the database of the stopped server's ``state_dir`` (see the module doc)."""
    source = _read_only(src)
    state_dir.mkdir(parents=True, exist_ok=True)
    database = state_dir / DATABASE_NAME
    staging = state_dir / f".restore-{os.getpid()}"
    try:
        with _held(state_dir):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                copied = _copy(source, staging / DATABASE_NAME)
            except (sqlite3.Error, BackupError) as exc:
                raise BackupError(f"{src} is not a usable backup: {exc}") from None
            if copied is None:
                raise BackupError(f"{src} is not a normserve backup (it has no layers table)")
            layers = _check(staging)
            kept = _keep_current(database, replace)
            for leftover in (database.with_name(DATABASE_NAME + "-wal"), database.with_name(DATABASE_NAME + "-shm")):
                leftover.unlink(missing_ok=True)  # folded into the kept copy; a stale WAL must not meet the new file
            os.replace(staging / DATABASE_NAME, database)
            _durable(database)
    finally:
        source.close()
        shutil.rmtree(staging, ignore_errors=True)
    return Copied(database, layers, kept)


def _keep_current(database: Path, replace: bool) -> Path | None:
    """Copy the database a restore is about to replace beside it (WAL included); refuse one with layers
    unless ``replace``. None when there is none."""
    if not database.exists():
        return None
    current = _read_only(database)  # reads a WAL a killed server left too, and changes nothing
    try:
        try:
            held = current.execute("SELECT count(*) FROM layers").fetchone()[0]
        except sqlite3.Error:
            held = 0  # no layers table: nothing a server ever stored
        if held and not replace:
            raise BackupError(f"{database} holds {held} layer(s); pass --yes to replace them (they are kept beside it)")
        kept = database.with_name(f"{DATABASE_NAME}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
        _copy(current, kept)
        _durable(kept)
        return kept
    except sqlite3.Error as exc:
        raise BackupError(f"cannot keep a copy of {database} before replacing it: {exc}") from None
    finally:
        current.close()
