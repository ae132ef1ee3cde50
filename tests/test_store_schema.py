"""Each state is stored once, and a database of the earlier schema opens with nothing lost.

Schema 2 writes a change's tensors as rows of their version: the current state and the kept versions read the
same rows, so a Train writes its two running tensors once (schema 1 wrote them, then copied all four). These
tests pin that a kept version reads exactly what it held at every keep window, that rows no kept version
reads are forgotten, and that a schema 1 file (written here with schema 1's own statements) is migrated
whole: on the store, and by a real server that starts on it.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from serverproc import ServerProcess

from normserve.client import NormClient, NotFound
from normserve.server.store import DATABASE_NAME, StateStore, StateUpdate
from normserve.v1 import normalization_pb2 as pb

# Schema 1 as its server created it: the current state in ``tensors``, each kept version copied whole.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE layers (name TEXT PRIMARY KEY, config BLOB NOT NULL, version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL);
CREATE TABLE tensors (layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE, key TEXT NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (layer, key)) WITHOUT ROWID;
CREATE TABLE versions (layer TEXT NOT NULL REFERENCES layers(name) ON DELETE CASCADE, version INTEGER NOT NULL,
    num_batches_tracked INTEGER NOT NULL, PRIMARY KEY (layer, version)) WITHOUT ROWID;
CREATE TABLE version_tensors (layer TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (layer, version, key),
    FOREIGN KEY (layer, version) REFERENCES versions(layer, version) ON DELETE CASCADE) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
"""
KEYS = ("weight", "bias", "running_mean", "running_var")


def bn_state(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    state = {key: rng.normal(size=channels).astype(np.float32) for key in KEYS}
    state["running_var"] = np.abs(state["running_var"]) + np.float32(0.1)  # a variance the layer accepts
    return state


def rows(tensors: dict[str, np.ndarray]) -> list[tuple[str, str, str, bytes]]:
    return [(key, a.dtype.name, json.dumps(list(a.shape)), a.tobytes()) for key, a in tensors.items()]


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a)


def tensor_rows(store: StateStore, layer: str) -> int:
    return store._db.execute("SELECT COUNT(*) FROM tensors WHERE layer = ?", (layer,)).fetchone()[0]


@pytest.mark.parametrize("keep", [1, 2, 3, 5])
def test_every_kept_version_reads_what_it_held_and_unread_rows_are_forgotten(tmp_path, rng, keep) -> None:
    """Random changes (running statistics alone, or parameters too, versions with gaps as a message of several
    updates makes them) against a replay that remembers every state: at each step every kept version reads
    bit for bit what it held, the current state too, across a reopen; the rows stay within what the kept
    versions need."""
    store = StateStore(tmp_path, keep_versions=keep)
    state = bn_state(rng, 5)
    store.create_layer("bn", b"config", 1, 0, state)
    held = {1: (0, dict(state))}
    version = 1
    for step in range(1, 25):
        changed = ["running_mean", "running_var"] + (["weight", "bias"] if rng.random() < 0.3 else [])
        update = {key: rng.normal(size=5).astype(np.float32) for key in changed}
        state = state | update
        version += int(rng.integers(1, 3))
        store.update_state("bn", version, step, update)
        held[version] = (step, dict(state))
        kept = sorted(v for v in held if v > version - keep)  # the versions of the last ``keep`` numbers
        assert store.oldest_versions() == {"bn": kept[0]}
        for v in kept:
            read = store.load_version("bn", v)
            assert (read.version, read.num_batches_tracked) == (v, held[v][0])
            assert same(read.tensors, held[v][1])
        for v in set(held) - set(kept):
            assert store.load_version("bn", v) is None
        # The newest row of each key at or below the oldest kept version, and the rows after it: no more.
        assert tensor_rows(store, "bn") <= len(KEYS) + 4 * (keep - 1) + 2
    store.close()
    reopened = StateStore(tmp_path, keep_versions=keep)
    (layer,) = reopened.load_all()
    assert (layer.version, layer.num_batches_tracked, layer.problem) == (version, 24, "")
    assert same(layer.tensors, state)
    reopened.close()


def test_a_train_writes_only_its_running_statistics_once(tmp_path, rng) -> None:
    store = StateStore(tmp_path, keep_versions=10)
    store.create_layer("bn", b"config", 1, 0, bn_state(rng, 512))
    before = tensor_rows(store, "bn")
    store.update_state("bn", 2, 1, {k: rng.normal(size=512).astype(np.float32) for k in KEYS[2:]})
    assert tensor_rows(store, "bn") == before + 2  # schema 1 wrote 2 current rows and copied 4
    store.delete_layer("bn")
    assert tensor_rows(store, "bn") == 0
    assert store._db.execute("SELECT COUNT(*) FROM versions").fetchone() == (0,)
    store.close()


def test_a_message_naming_a_missing_layer_stores_nothing_and_names_it(tmp_path, rng) -> None:
    """The message's updates are written by one statement of each kind: one missing layer among them rolls
    back the others, and the refusal names it."""
    store = StateStore(tmp_path, keep_versions=2)
    held = {name: bn_state(rng, 8) for name in ("a", "b")}
    for name, state in held.items():
        store.create_layer(name, b"config", 1, 0, state)
    rows_before = store._db.execute("SELECT COUNT(*) FROM tensors").fetchone()
    new = {k: rng.normal(size=8).astype(np.float32) for k in KEYS[2:]}
    updates = [StateUpdate("a", 2, 1, new), StateUpdate("gone", 2, 1, new), StateUpdate("b", 2, 1, new)]
    with pytest.raises(KeyError, match="gone"):
        store.update_states(updates)
    assert store._db.execute("SELECT COUNT(*) FROM tensors").fetchone() == rows_before
    for layer in store.load_all():
        assert (layer.version, layer.num_batches_tracked) == (1, 0)
        assert all(np.array_equal(layer.tensors[k], v) for k, v in held[layer.name].items())
    store.update_states([u for u in updates if u.name != "gone"])  # the same message without it: stored
    assert {layer.name: layer.version for layer in store.load_all()} == {"a": 2, "b": 2}
    store.close()


def schema_1_database(directory, rng) -> dict:
    """A schema 1 file: ``bn`` at version 3 with versions 2 and 3 kept whole, and ``ln`` from before versions
    were kept (its current state alone). Returns what each held."""
    directory.mkdir(parents=True, exist_ok=True)
    config = pb.LayerConfig(kind=pb.BATCH_NORM, num_features=4).SerializeToString()
    ln_config = pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[4]).SerializeToString()
    bn = {2: bn_state(rng, 4), 3: bn_state(rng, 4)}
    ln = {key: rng.normal(size=4).astype(np.float32) for key in KEYS[:2]}
    with sqlite3.connect(directory / DATABASE_NAME) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO layers VALUES ('bn', ?, 3, 7)", (config,))
        db.execute("INSERT INTO layers VALUES ('ln', ?, 5, 0)", (ln_config,))
        db.executemany("INSERT INTO tensors VALUES ('bn', ?, ?, ?, ?)", rows(bn[3]))
        db.executemany("INSERT INTO tensors VALUES ('ln', ?, ?, ?, ?)", rows(ln))
        for version, count in ((2, 6), (3, 7)):
            db.execute("INSERT INTO versions VALUES ('bn', ?, ?)", (version, count))
            db.executemany(f"INSERT INTO version_tensors VALUES ('bn', {version}, ?, ?, ?, ?)", rows(bn[version]))
    return {"bn": bn, "ln": ln}


def test_a_schema_1_database_is_migrated_whole(tmp_path, rng) -> None:
    held = schema_1_database(tmp_path, rng)
    store = StateStore(tmp_path, keep_versions=3)
    bn, ln = store.load_all()
    assert (bn.name, bn.version, bn.num_batches_tracked, bn.problem) == ("bn", 3, 7, "")
    assert same(bn.tensors, held["bn"][3])
    assert (ln.name, ln.version, ln.problem) == ("ln", 5, "")
    assert same(ln.tensors, held["ln"])
    assert same(store.load_version("bn", 2).tensors, held["bn"][2])
    assert store.load_version("bn", 2).num_batches_tracked == 6
    assert same(store.load_version("ln", 5).tensors, held["ln"])  # recorded when migrated
    assert store.oldest_versions() == {"bn": 2, "ln": 5}
    tables = {name for (name,) in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"meta", "layers", "tensors", "versions"}
    assert store._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    # Migrated rows age out like new ones.
    later = {key: bn_state(rng, 4)[key] for key in KEYS[2:]}
    for version in (4, 5):
        store.update_state("bn", version, version + 4, later)
    assert store.load_version("bn", 2) is None
    assert same(store.load_version("bn", 3).tensors, held["bn"][3])
    store.close()
    reopened = StateStore(tmp_path, keep_versions=3)  # migrated once: the second open finds schema 2
    assert [layer.version for layer in reopened.load_all()] == [5, 5]
    assert same(reopened.load_version("bn", 3).tensors, held["bn"][3])
    reopened.close()


def test_a_server_starts_on_a_schema_1_state_dir_with_every_layer_and_kept_version(tmp_path, rng) -> None:
    held = schema_1_database(tmp_path / "state", rng)
    proc = ServerProcess(tmp_path / "state").start()
    try:
        with NormClient(proc.target) as nc:
            assert [layer.info.restore_error for layer in nc.list_layers()] == ["", ""]
            assert same(nc.layer("ln").state_dict(), held["ln"])
            bn = nc.layer("bn")
            assert (bn.info.version, bn.info.oldest_version) == (3, 2)
            assert same({k: v for k, v in bn.state_dict(version=2).items() if k in KEYS}, held["bn"][2])
            current = bn.state_dict()
            assert same({k: v for k, v in current.items() if k in KEYS}, held["bn"][3])
            assert int(current["num_batches_tracked"]) == 7
            bn.train(rng.normal(size=(8, 4)).astype(np.float32))
            assert bn.refresh().version == 4
            assert same({k: v for k, v in bn.state_dict(version=3).items() if k in KEYS}, held["bn"][3])
            with pytest.raises(NotFound, match="has no version 1: the server keeps versions 2 to 4"):
                bn.state_dict(version=1)
    finally:
        proc.stop()
