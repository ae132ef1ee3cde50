"""The normserve command: help, health (the container healthcheck) and layers."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from serverproc import NORMSERVE

from normserve.client import NormClient


def normserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([NORMSERVE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ((), ["serve", "health", "layers"]),
        (("serve",), ["--host", "--port", "--device", "--state-dir", "--log-level", "--max-message-bytes", "--sync"]),
        (("health",), ["--target", "SERVING"]),
        (("layers",), ["--target", "--prefix", "--json"]),
    ],
)
def test_help_describes_every_command(command, mentions) -> None:
    result = normserve(*command, "--help")
    assert result.returncode == 0
    for word in mentions:
        assert word in result.stdout, word


def test_health_exits_0_only_when_serving(server) -> None:
    result = normserve("health", "--target", server.target)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    result = normserve("health", "--target", f"127.0.0.1:{free}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_layers_lists_names_and_counts(server, layer_name) -> None:
    with NormClient(server.target) as nc:
        nc.create_layer(layer_name + ".a", "group_norm", num_groups=2, num_channels=6)
        nc.create_layer(layer_name + ".b", "rms_norm", normalized_shape=[4, 2])
    result = normserve("layers", "--target", server.target, "--prefix", layer_name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[:3] for line in lines] == [
        [layer_name + ".a", "group_norm", "6"],
        [layer_name + ".b", "rms_norm", "4x2"],
    ]
    result = normserve("layers", "--target", server.target, "--prefix", layer_name + ".a", "--json")
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["config"]["num_groups"] == "2"  # proto JSON writes int64 as strings
    assert record["version"] == "1"


def test_serve_refuses_a_busy_state_dir_and_a_bad_device(server, tmp_path) -> None:
    result = normserve("serve", "--port", "0", "--state-dir", str(server.state_dir), timeout=60)
    assert result.returncode == 1
    assert "in use by another normserve process" in result.stderr
    result = normserve("serve", "--port", "0", "--state-dir", str(tmp_path), "--device", "tpu:0")
    assert result.returncode == 1
    assert "unknown device" in result.stderr
