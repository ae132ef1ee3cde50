"""The CLI's commands that change or copy state, on the real server: describe, delete, export, import,
backup (while Trains run) and restore."""

from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pytest
from serverproc import ServerProcess, patience
from test_cli import normserve

from normserve.client import NormClient, NotFound

torch = pytest.importorskip("torch")


def _trained(client: NormClient, name: str, rng: np.random.Generator, steps: int = 3):
    layer = client.create_layer(name, "batch_norm", num_features=5, momentum=0.3)
    layer.load_state_dict({"weight": rng.normal(1, 0.3, 5), "bias": rng.normal(0, 0.3, 5)}, strict=False)
    for _ in range(steps):
        layer.train(rng.normal(0.5, 2.0, (6, 5, 3)).astype(np.float32))
    return layer


def test_describe_prints_config_version_and_state(server, client, layer_name, rng) -> None:
    layer = _trained(client, layer_name, rng)
    state = layer.state_dict()
    result = normserve("describe", layer_name, "--target", server.target, "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["layer"]["name"] == layer_name
    assert described["layer"]["config"]["num_features"] == 5
    assert described["layer"]["config"]["momentum"] == pytest.approx(0.3)
    assert described["layer"]["version"] == layer.refresh().version
    assert described["layer"]["num_batches_tracked"] == 3
    mean = described["state"]["running_mean"]
    assert mean["shape"] == [5]
    assert mean["dtype"] == "float32"
    assert mean["min"] == pytest.approx(float(state["running_mean"].min()))
    assert mean["max"] == pytest.approx(float(state["running_mean"].max()))
    assert described["state"]["num_batches_tracked"]["value"] == 3
    text = normserve("describe", layer_name, "--target", server.target)
    assert text.returncode == 0, text.stderr
    assert "kind: batch_norm" in text.stdout
    assert "num_features=5" in text.stdout
    assert f"version: {layer.version}" in text.stdout
    missing = normserve("describe", layer_name + ".none", "--target", server.target)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr


def test_delete_needs_yes(server, client, layer_name, rng) -> None:
    _trained(client, layer_name, rng, steps=1)
    refused = normserve("delete", layer_name, "--target", server.target)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert client.layer(layer_name).name == layer_name  # still there
    deleted = normserve("delete", layer_name, "--yes", "--target", server.target)
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted {layer_name}" in deleted.stdout
    with pytest.raises(NotFound):
        client.layer(layer_name)
    again = normserve("delete", layer_name, "--yes", "--target", server.target)
    assert again.returncode == 1
    assert "NOT_FOUND" in again.stderr


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_export_writes_what_torch_loads_and_import_reads_it_back(server, client, layer_name, rng, tmp_path, suffix):
    layer = _trained(client, layer_name, rng)
    state = layer.state_dict()
    path = tmp_path / f"bn{suffix}"
    result = normserve("export", layer_name, str(path), "--target", server.target)
    assert result.returncode == 0, result.stderr
    module = torch.nn.BatchNorm2d(5, momentum=0.3)
    if suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
    else:
        loaded = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    module.load_state_dict(loaded)  # strict: the same keys, shapes and dtypes as torch's own
    for key, value in state.items():
        assert np.array_equal(module.state_dict()[key].numpy(), value), key
    x = rng.normal(size=(4, 5, 2, 2)).astype(np.float32)
    module.eval()
    np.testing.assert_allclose(layer.infer(x), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)

    # Import: a torch module's own saved state replaces the layer's, all of it.
    module.train()
    module(torch.from_numpy(rng.normal(3.0, 0.5, (8, 5, 2, 2)).astype(np.float32)))
    theirs = tmp_path / f"theirs{suffix}"
    if suffix == ".pt":
        torch.save(module.state_dict(), theirs)
    else:
        np.savez(theirs, **{k: v.numpy() for k, v in module.state_dict().items()})
    before = layer.refresh().version
    imported = normserve("import", layer_name, str(theirs), "--target", server.target)
    assert imported.returncode == 0, imported.stderr
    now = layer.state_dict()
    for key, value in module.state_dict().items():
        assert np.array_equal(now[key], value.numpy()), key
    assert layer.refresh().version == before + 1


def test_import_refuses_a_bad_file_and_changes_nothing(server, client, layer_name, rng, tmp_path) -> None:
    layer = _trained(client, layer_name, rng)
    state = layer.state_dict()
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.BatchNorm2d(7).state_dict(), wrong)  # 7 channels, not 5
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(rng.bytes(100))
    for path, message in ((wrong, "INVALID_ARGUMENT"), (garbage, "not a readable npz state file")):
        result = normserve("import", layer_name, str(path), "--target", server.target)
        assert result.returncode == 1
        assert message in result.stderr
    unnamed = normserve("import", layer_name, str(tmp_path / "state.bin"), "--target", server.target)
    assert unnamed.returncode == 1
    assert "--format" in unnamed.stderr
    after = layer.state_dict()
    assert all(np.array_equal(after[k], v) for k, v in state.items())


def test_backup_is_consistent_while_trains_run_and_restore_serves_it(tmp_path, rng) -> None:
    """Trains run on several layers during `normserve backup`; the restored copy holds, for every layer, exactly
    the state it had at one of its versions (parameters and counters from the same write)."""
    proc = ServerProcess(tmp_path / "state", "--sync", "normal").start()
    names = [f"backup.bn{i}" for i in range(3)]
    seen: dict[str, dict[int, dict[str, np.ndarray]]] = {name: {} for name in names}
    stop = threading.Event()
    errors: list[BaseException] = []

    def train(name: str, seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            with NormClient(proc.target, timeout=patience(6)) as nc:
                layer = nc.layer(name)
                for _ in range(500):  # bounded; stopped as soon as the backups are done
                    if stop.is_set():
                        return
                    layer.train(local.normal(local.uniform(-2, 2), 1.5, (16, 4, 8)).astype(np.float32))
                    seen[name][layer.info.version] = layer.state_dict()  # no other writer: still this version
        except BaseException as exc:
            errors.append(exc)

    try:
        with NormClient(proc.target, timeout=patience(6)) as nc:
            for name in names:
                nc.create_layer(name, "batch_norm", num_features=4)
        workers = [threading.Thread(target=train, args=(n, i)) for i, n in enumerate(names)]
        for worker in workers:
            worker.start()
        backups = []
        for i in range(3):
            dest = tmp_path / f"backup-{i}.sqlite3"
            result = normserve("backup", str(dest), "--state-dir", str(proc.state_dir))
            assert result.returncode == 0, result.stderr
            assert "backed up 3 layer(s)" in result.stdout
            backups.append(dest)
        stop.set()
        for worker in workers:
            worker.join(patience(30))
        assert errors == []
        busy = normserve("restore", str(backups[-1]), "--state-dir", str(proc.state_dir))
        assert busy.returncode == 1
        assert "stop it first" in busy.stderr
    finally:
        stop.set()
        assert proc.stop() == 0

    assert not (tmp_path / "backup-0.sqlite3-wal").exists()  # each backup is one file
    for i, backup in enumerate(backups):
        state_dir = tmp_path / f"restored-{i}"
        result = normserve("restore", str(backup), "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        restored = ServerProcess(state_dir).start()
        try:
            with NormClient(restored.target) as nc:
                assert sorted(layer.name for layer in nc.list_layers()) == names
                for name in names:
                    layer = nc.layer(name)
                    state = layer.state_dict()
                    if layer.version == 1:
                        assert int(state["num_batches_tracked"]) == 0
                        continue
                    expected = seen[name][layer.version]  # a version some Train answered with
                    assert set(state) == set(expected)
                    for key, value in expected.items():
                        assert np.array_equal(state[key], value), (name, layer.version, key)
        finally:
            assert restored.stop() == 0
    assert sum(len(v) for v in seen.values()) > 0


def test_restore_keeps_what_it_replaces_and_refuses_bad_backups(tmp_path, rng) -> None:
    proc = ServerProcess(tmp_path / "a").start()
    try:
        with NormClient(proc.target) as nc:
            _trained(nc, "kept.bn", rng, steps=2)
        assert normserve("backup", str(tmp_path / "a.backup"), "--state-dir", str(proc.state_dir)).returncode == 0
    finally:
        assert proc.stop() == 0
    proc = ServerProcess(tmp_path / "b").start()
    try:
        with NormClient(proc.target) as nc:
            nc.create_layer("other.ln", "layer_norm", normalized_shape=[3])
    finally:
        proc.kill()  # a crash: its last writes are in the WAL, which a restore must keep in the copy it keeps
    database = tmp_path / "b" / "normserve.sqlite3"
    original = database.read_bytes()

    not_sqlite = tmp_path / "junk.backup"
    not_sqlite.write_bytes(rng.bytes(4096))
    empty = tmp_path / "empty.backup"
    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    for bad in (not_sqlite, empty, tmp_path / "missing.backup"):
        result = normserve("restore", str(bad), "--state-dir", str(tmp_path / "b"), "--yes")
        assert result.returncode == 1, bad
        assert "error" in result.stderr
    refused = normserve("restore", str(tmp_path / "a.backup"), "--state-dir", str(tmp_path / "b"))
    assert refused.returncode == 1
    assert "holds 1 layer(s); pass --yes" in refused.stderr
    assert database.read_bytes() == original  # nothing changed
    assert list((tmp_path / "b").glob("*.before-restore-*")) == []

    done = normserve("restore", str(tmp_path / "a.backup"), "--state-dir", str(tmp_path / "b"), "--yes")
    assert done.returncode == 0, done.stderr
    (kept,) = (tmp_path / "b").glob("normserve.sqlite3.before-restore-*")
    assert "restored 1 layer(s)" in done.stdout
    assert str(kept) in done.stdout
    with sqlite3.connect(kept) as db:
        assert [row[0] for row in db.execute("SELECT name FROM layers")] == ["other.ln"]
    restored = ServerProcess(tmp_path / "b").start()
    try:
        with NormClient(restored.target) as nc:
            layer = nc.layer("kept.bn")
            assert [x.name for x in nc.list_layers()] == ["kept.bn"]
            assert int(layer.state_dict()["num_batches_tracked"]) == 2
    finally:
        assert restored.stop() == 0
