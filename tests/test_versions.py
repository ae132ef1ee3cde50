"""Kept versions and rollback on the real server: read a layer at a version, roll a polluted layer back, and
find the rolled-back state again after a restart."""

from __future__ import annotations

import sqlite3
import subprocess

import numpy as np
import pytest
from serverproc import NORMSERVE, ServerProcess, patience

from normserve.client import DataLoss, NormClient, NotFound


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_bad_batch_is_rolled_back_and_the_rollback_survives_a_restart(tmp_path) -> None:
    rng = np.random.default_rng(30)
    proc = ServerProcess(tmp_path / "state", "--keep-versions", "4").start()
    try:
        with NormClient(proc.target) as nc:
            layer = nc.create_layer("bn", "batch_norm", num_features=3)
            first = layer.state_dict()
            for _ in range(3):
                layer.train(rng.normal(1.5, 2.0, size=(16, 3, 5)).astype(np.float32))
            assert layer.version == 4
            good = layer.state_dict()
            probe = rng.normal(1.5, 2.0, size=(4, 3, 5)).astype(np.float32)
            good_output = layer.infer(probe)
            layer.train(rng.normal(300.0, 50.0, size=(16, 3, 5)).astype(np.float32))  # a polluting batch
            polluted = layer.state_dict()
            assert not np.allclose(polluted["running_mean"], good["running_mean"])
            layer.refresh()
            assert (layer.info.version, layer.info.oldest_version) == (5, 2)  # the last 4, this one included

            assert _equal(layer.state_dict(version=4), good)
            assert _equal(layer.state_dict(version=5), polluted)
            with pytest.raises(NotFound, match=r"no version 1: the server keeps versions 2 to 5"):
                layer.state_dict(version=1)  # forgotten: past --keep-versions
            with pytest.raises(NotFound, match="no version 9"):
                layer.state_dict(version=9)  # not reached
            assert _equal(nc.layer("bn").state_dict(version=5), polluted)  # reads change nothing

            rolled = layer.rollback(4)
            assert (rolled.version, rolled.oldest_version, rolled.num_batches_tracked) == (6, 3, 3)
            assert _equal(layer.state_dict(), good)
            np.testing.assert_array_equal(layer.infer(probe), good_output)
            with pytest.raises(NotFound, match="no version 2"):
                layer.rollback(2)  # forgotten by now: 3 to 6 are kept
            with pytest.raises(NotFound, match="no layer named 'absent'"):
                nc.rollback_layer("absent", 1)
        assert proc.kill() != 0  # a crash: what was acknowledged is on disk
        proc.start()
        with NormClient(proc.target) as nc:
            layer = nc.layer("bn")
            assert (layer.info.version, layer.info.oldest_version) == (6, 3)
            assert _equal(layer.state_dict(), good)
            assert _equal(layer.state_dict(version=5), polluted)  # older versions are kept across restarts
            assert not _equal(first, good)
        cli = subprocess.run(
            [NORMSERVE, "rollback", "bn", "5", "--target", proc.target],
            capture_output=True,
            text=True,
            timeout=patience(6),
        )
        assert cli.returncode == 0, cli.stderr
        assert "bn: version 7 holds the state of version 5 (kept: 4 to 7)" in cli.stdout
        with NormClient(proc.target) as nc:
            assert _equal(nc.layer("bn").state_dict(), polluted)
        missing = subprocess.run(
            [NORMSERVE, "rollback", "bn", "1", "--target", proc.target],
            capture_output=True,
            text=True,
            timeout=patience(6),
        )
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr
        assert "keeps versions 4 to 7" in missing.stderr
    finally:
        proc.stop()


def test_layers_without_running_statistics_keep_their_set_states(tmp_path) -> None:
    rng = np.random.default_rng(31)
    proc = ServerProcess(tmp_path / "state").start()
    try:
        with NormClient(proc.target) as nc:
            layer = nc.create_layer("ln", "layer_norm", normalized_shape=6)
            states = [layer.state_dict()]
            for _ in range(12):  # past the default of 10 kept versions
                state = {k: rng.normal(size=6).astype(np.float32) for k in ("weight", "bias")}
                layer.load_state_dict(state)
                states.append(state)
            layer.refresh()
            assert (layer.info.version, layer.info.oldest_version) == (13, 4)
            for version in range(4, 14):
                assert _equal(layer.state_dict(version=version), states[version - 1])
            layer.train(rng.normal(size=(2, 6)).astype(np.float32))  # changes no state: no new version
            assert layer.version == 13
            layer.rollback(4)
            assert _equal(layer.state_dict(), states[3])
            layer.delete()
            layer = nc.create_layer("ln", "layer_norm", normalized_shape=6)  # a new layer: no old versions
            assert (layer.version, layer.info.oldest_version) == (1, 1)
            with pytest.raises(NotFound):
                layer.state_dict(version=4)
    finally:
        proc.stop()


def test_a_damaged_kept_version_answers_data_loss_and_changes_nothing(tmp_path) -> None:
    """Kept versions are read back as warily as the current state: a version whose stored rows were damaged
    answers DATA_LOSS (reason VERSION_DAMAGED) when read or rolled back to, the current state stays as it was,
    and so do the other kept versions."""
    rng = np.random.default_rng(31)
    proc = ServerProcess(tmp_path / "state", "--keep-versions", "4").start()
    try:
        with NormClient(proc.target) as nc:
            layer = nc.create_layer("bn", "batch_norm", num_features=3)
            for _ in range(3):
                layer.train(rng.normal(size=(8, 3)).astype(np.float32))
            current, kept = layer.state_dict(), layer.state_dict(version=3)
        proc.stop()
        with sqlite3.connect(tmp_path / "state" / "normserve.sqlite3") as db:
            db.execute("UPDATE tensors SET data = x'00' WHERE layer = 'bn' AND version = 2")
            db.execute("UPDATE versions SET num_batches_tracked = 'many' WHERE layer = 'bn' AND version = 1")
        proc.start()
        with NormClient(proc.target) as nc:
            layer = nc.layer("bn")
            for version in (1, 2):
                with pytest.raises(DataLoss, match=f"kept version {version} cannot be read") as caught:
                    layer.state_dict(version=version)
                assert caught.value.reason == "VERSION_DAMAGED"
                with pytest.raises(DataLoss, match="current state is unchanged"):
                    layer.rollback(version)
            assert layer.refresh().version == 4
            assert _equal(layer.state_dict(), current)
            assert _equal(layer.state_dict(version=3), kept)
    finally:
        proc.stop()
