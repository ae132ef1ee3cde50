"""Declarative layers (--layers-file) on the real server: created at start with their initial state, kept as
they are on the next start, a conflicting config or a bad file refused at start with a line that says why."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from serverproc import NORMSERVE, ServerProcess, patience

from normserve.client import NormClient


def _write(path, layers) -> str:
    path.write_text(json.dumps({"layers": layers}))
    return str(path)


def _refused(tmp_path, layers_file: str, state_dir) -> str:
    result = subprocess.run(
        [NORMSERVE, "serve", "--port", "0", "--state-dir", str(state_dir), "--layers-file", layers_file],
        capture_output=True,
        text=True,
        timeout=patience(12),
    )
    assert result.returncode == 1, result.stderr
    assert "listening" not in result.stderr
    return result.stderr


def test_declared_layers_are_created_once_and_kept(tmp_path) -> None:
    rng = np.random.default_rng(60)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    layers = [
        {"name": "enc.norm1", "kind": "layer_norm", "config": {"normalized_shape": [6], "eps": 1e-6}},
        {
            "name": "enc.bn",
            "kind": "batch_norm",
            "config": {"num_features": 4, "momentum": 0.01},
            "state": {"running_mean": mean.tolist(), "running_var": var.tolist(), "num_batches_tracked": 100},
        },
    ]
    path = _write(tmp_path / "layers.json", layers)
    proc = ServerProcess(tmp_path / "state", "--layers-file", path).start()
    try:
        assert "--layers-file" in proc.log_lines("2 layer(s) created, 0 kept")[0]
        with NormClient(proc.target) as nc:
            assert [layer.name for layer in nc.list_layers()] == ["enc.bn", "enc.norm1"]
            bn = nc.layer("enc.bn")
            assert bn.kind == "batch_norm"
            assert bn.info.config.momentum == pytest.approx(0.01)
            state = bn.state_dict()
            np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-6)
            np.testing.assert_allclose(state["running_var"], var, rtol=1e-6)
            assert int(state["num_batches_tracked"]) == 100
            assert nc.layer("enc.norm1").info.config.eps == pytest.approx(1e-6)
            bn.train(rng.normal(size=(8, 4)).astype(np.float32))  # the layer lives on: its state is its own
            trained = bn.state_dict()
        proc.stop()
        proc.start()  # the same file again: nothing created, the trained state kept
        assert proc.log_lines("0 layer(s) created, 2 kept")
        with NormClient(proc.target) as nc:
            again = nc.layer("enc.bn").state_dict()
            assert all(np.array_equal(again[k], trained[k]) for k in trained)
    finally:
        proc.stop()

    conflicting = [{**layers[0], "config": {"normalized_shape": [7]}}]
    stderr = _refused(tmp_path, _write(tmp_path / "conflict.json", conflicting), tmp_path / "state")
    assert "layer 'enc.norm1' exists with a different config" in stderr
    assert "The file and the state directory disagree" in stderr


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ("{not json", "cannot read it as JSON"),
        (json.dumps([]), 'expected an object with one key, "layers"'),
        (
            json.dumps({"layers": [{"name": "a", "kind": "bogus_norm"}]}),
            "layer 0 ('a') unknown layer kind 'bogus_norm'",
        ),
        (json.dumps({"layers": [{"name": "a b", "kind": "rms_norm"}]}), "is not a valid layer name"),
        (
            json.dumps({"layers": [{"name": "a", "kind": "rms_norm", "config": {"normalized_shape": 3}, "stat": {}}]}),
            "unknown keys ['stat']",
        ),
        (
            json.dumps(
                {
                    "layers": [
                        {"name": "a", "kind": "rms_norm", "config": {"normalized_shape": 3}, "state": {"weight": [1]}}
                    ]
                }
            ),
            "layer 0 ('a')",
        ),
        (
            json.dumps({"layers": [{"name": "a", "kind": "rms_norm", "config": {"normalized_shape": 3}}] * 2}),
            "declared twice",
        ),
    ],
)
def test_a_bad_layers_file_stops_the_start_and_creates_nothing(tmp_path, document, says) -> None:
    path = tmp_path / "layers.json"
    path.write_text(document)
    stderr = _refused(tmp_path, str(path), tmp_path / "state")
    assert f"--layers-file {path}" in stderr
    assert says in stderr
    assert len(stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not (tmp_path / "state").exists()  # read and checked before the state directory is even opened
