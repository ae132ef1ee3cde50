"""The normserve command: help, health (the container healthcheck), layers, and configuration by environment."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from serverproc import NORMSERVE, ServerProcess, env_variables, patience

from normserve.client import NormClient, ResourceExhausted


def normserve(
    *args: str, timeout: float | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")} | (env or {})
    timeout = patience(6) if timeout is None else timeout  # a client command takes about a second alone
    return subprocess.run([NORMSERVE, *args], capture_output=True, text=True, timeout=timeout, env=environ)


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ((), ["serve", "health", "layers", "cluster", "rebalance", "nginx-config", "describe", "delete", "export"]),
        ((), ["import", "backup", "restore"]),
        (("cluster",), ["--replicas", "--port", "--state-dir", "--peer-timeout", "--proxy-timeout", "nginx-light"]),
        (("rebalance",), ["--replicas", "--nginx-config", "--drain", "--dry-run", "expected_version"]),
        (("serve",), ["--peers", "--peer-timeout"]),
        (("serve",), ["--host", "--port", "--device", "--state-dir", "--log-level", "--max-message-bytes", "--sync"]),
        (("serve",), ["--tls-cert", "--auth-token-file", "--max-layers", "--default-deadline", "--metrics-port"]),
        (("health",), ["--target", "SERVING", "--tls-ca", "--token-file"]),
        (("layers",), ["--target", "--prefix", "--json", "--tls-client-cert"]),
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
    header, *lines = result.stdout.strip().splitlines()
    assert header.split("\t") == ["NAME", "KIND", "SHAPE", "DEVICE", "VERSION", "BATCHES"]
    assert [line.split("\t") for line in lines] == [
        [layer_name + ".a", "group_norm", "6", "cpu", "1", "0"],
        [layer_name + ".b", "rms_norm", "4x2", "cpu", "1", "0"],
    ]
    result = normserve("layers", "--target", server.target, "--prefix", layer_name + ".a", "--json")
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["config"]["num_groups"] == 2  # numbers, though proto3's JSON writes 64-bit integers as strings
    assert record["version"] == 1
    assert record["num_batches_tracked"] == 0  # shown though it is proto3's default
    assert record["param_shape"] == [6]
    empty = normserve("layers", "--target", server.target, "--prefix", layer_name + ".none")
    assert empty.returncode == 0
    assert empty.stdout == ""
    assert f"no layers named {layer_name}.none*" in empty.stderr
    assert normserve("layers", "--target", server.target, "--prefix", layer_name + ".none", "--json").stdout == ""


#: What a client command must not load: the server, the kernels (numba), bfloat16 (ml_dtypes), torch.
_SERVER_SIDE = ("normserve.server", "normkernels", "numba", "ml_dtypes", "torch")


def _imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``normserve ARGS`` run under ``python -X importtime``, and every module it imported."""
    command = [sys.executable, "-X", "importtime", "-m", "normserve.tools", *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=patience(6), env=environ)
    modules = {
        line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "normserve.tools.cli" in modules, result.stderr[-2000:]
    return result, modules


@pytest.mark.parametrize("command", [(), ("health",), ("layers",), ("describe",), ("export",), ("delete",)])
def test_help_loads_neither_the_server_nor_the_kernels(command) -> None:
    """`normserve --help` and a client command's --help answer without the server stack (it took seconds)."""
    result, modules = _imported(*command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(m for m in modules if m.startswith(_SERVER_SIDE)) == []


def test_health_and_layers_load_neither_the_server_nor_the_kernels(server) -> None:
    """What a container HEALTHCHECK runs: the client, grpc and the messages; no numba, ml_dtypes or server."""
    for command in ("health", "layers"):
        result, modules = _imported(command, "--target", server.target)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "normserve.client" in modules
        assert sorted(m for m in modules if m.startswith(_SERVER_SIDE)) == [], command
    _, served = _imported("serve", "--help")  # the same measure sees the server where it is needed
    assert "normserve.server.app" in served


def test_one_port_setting_reaches_the_server_and_the_client_commands(tmp_path) -> None:
    """NORMSERVE_PORT (what `make serve PORT=...` and `make health PORT=...` set) points serve and every client
    command at one port, with no --port or --target given."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"NORMSERVE_PORT": str(port), "NORMSERVE_HOST": "0.0.0.0"}  # a wildcard: the clients use 127.0.0.1
    command = [NORMSERVE, "serve", "--state-dir", str(tmp_path / "state")]
    proc = ServerProcess(tmp_path / "state", env=env, command=command).start()
    try:
        assert proc.port == port
        for args in (("health",), ("layers",)):
            result = normserve(*args, env=env)
            assert result.returncode == 0, (args, result.stderr)
        assert f"127.0.0.1:{port}: SERVING" in normserve("health", env=env).stdout
        root = Path(__file__).resolve().parents[1]
        venv = Path(sys.executable).parent.parent
        make = ["make", "-s", "-C", str(root), f"VENV={venv}", "-o", f"{venv}/.installed-serve"]
        made = subprocess.run([*make, "health", f"PORT={port}"], capture_output=True, text=True, timeout=patience(6))
        assert made.returncode == 0, made.stderr
        assert f":{port}: SERVING" in made.stdout
        other = subprocess.run(
            [*make, "health", f"PORT={port + 1}"], capture_output=True, text=True, timeout=patience(6)
        )
        assert other.returncode != 0  # the setting is what reaches the command: another port finds no server
    finally:
        assert proc.stop() == 0


def test_serve_refuses_a_busy_state_dir_and_a_bad_device(server, tmp_path) -> None:
    result = normserve("serve", "--port", "0", "--state-dir", str(server.state_dir))
    assert result.returncode == 1
    assert "in use by another normserve process" in result.stderr
    result = normserve("serve", "--port", "0", "--state-dir", str(tmp_path), "--device", "tpu:0")
    assert result.returncode == 1
    assert "unknown device" in result.stderr


@pytest.mark.parametrize("command", ["serve", "health", "layers"])
def test_every_flag_names_its_environment_variable(command) -> None:
    """`--help` shows each flag's variable, NORMSERVE_ plus the flag in capitals."""
    from normserve.tools.cli import env_name

    text = " ".join(normserve(command, "--help").stdout.split())  # undo the help's line wrapping
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*[a-z])", text)) - {"--help"}
    assert len(flags) >= 4
    names = env_variables(command)
    assert len(names) == len(flags)
    for flag in flags:  # serve's and the shared client flags plain, a command's own flags under its name
        assert names & {env_name(flag), env_name(flag, command)}, flag


def _commands() -> dict[str, Any]:
    from normserve.tools.cli import _parser

    (subparsers,) = (a for a in _parser({})._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_environment_variable_means_one_thing() -> None:
    """Two commands reading one variable read it the same way (NORMSERVE_JSON was once a flag and a path)."""
    meanings: dict[str, set[tuple]] = {}
    for parser in _commands().values():
        for action in parser._actions:
            found = re.search(r"\[env (NORMSERVE_[A-Z_]+)\]", action.help or "")
            if found:
                meaning = (type(action).__name__, action.type, tuple(action.choices or ()), action.nargs)
                meanings.setdefault(found[1], set()).add(meaning)
    assert len(meanings) > 40
    assert {name: kinds for name, kinds in meanings.items() if len(kinds) > 1} == {}


def test_every_default_is_shown_once() -> None:
    for command, parser in _commands().items():
        for action in parser._actions:
            text = action.help or ""
            assert text.count("(default") <= 1, (command, action.option_strings)
            if action.default not in (None, "", (), False, argparse.SUPPRESS) and action.option_strings:
                assert "(default" in text, (command, action.option_strings)


def test_environment_configures_the_server_and_flags_win(tmp_path) -> None:
    env = {
        "NORMSERVE_MAX_LAYERS": "1",
        "NORMSERVE_LOG_FORMAT": "json",
        "NORMSERVE_PORT": "1",  # ServerProcess passes --port 0: the flag wins
        "NORMSERVE_STATE_DIR": str(tmp_path / "ignored"),  # and --state-dir
    }
    proc = ServerProcess(tmp_path / "state", env=env).start()
    try:
        assert proc.port not in (0, 1)
        assert not (tmp_path / "ignored").exists()
        assert all(line.startswith("{") for line in proc.log().splitlines())  # NORMSERVE_LOG_FORMAT=json
        with NormClient(proc.target) as nc:
            nc.create_layer("only", "layer_norm", normalized_shape=3)
            with pytest.raises(ResourceExhausted, match=r"holds 1 layers.*--max-layers 1"):
                nc.create_layer("second", "layer_norm", normalized_shape=3)
            assert [layer.name for layer in nc.list_layers()] == ["only"]  # nothing changed
        assert normserve("health", env={"NORMSERVE_PORT": str(proc.port)}).returncode == 0  # the default target
        assert normserve("health", env={"NORMSERVE_TARGET": proc.target}).returncode == 0
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("serve",), {"NORMSERVE_PORT": "fifty"}, "NORMSERVE_PORT='fifty': invalid literal for int()"),
        (("serve",), {"NORMSERVE_MAX_LAYERS": "0"}, "NORMSERVE_MAX_LAYERS='0': must be > 0"),
        (("serve",), {"NORMSERVE_SYNC": "sometimes"}, "NORMSERVE_SYNC='sometimes': choose from full, normal"),
        (("layers",), {"NORMSERVE_LAYERS_JSON": "maybe"}, "NORMSERVE_LAYERS_JSON='maybe': expected one of 1, true"),
    ],
)
def test_a_bad_environment_variable_is_named(args, env, message, tmp_path) -> None:
    result = normserve(*args, "--state-dir" if args == ("serve",) else "--prefix", str(tmp_path), env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_cli_commands_print_only_their_own_messages(start_server, tmp_path) -> None:
    """gRPC's C-core log lines stay out of CLI output unless --log-level debug; no empty or contradictory errors."""
    proc = start_server()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([NORMSERVE, *args], capture_output=True, text=True, timeout=patience(6))

    tls = run("health", "--target", proc.target, "--tls", "--timeout", "5")
    assert tls.returncode == 1
    assert "ssl_transport_security" not in tls.stderr
    assert "handshake" in tls.stderr.lower()
    assert not tls.stderr.rstrip().endswith(": OK")
    unknown = run("health", "--target", proc.target, "--service", "foo")
    assert unknown.returncode == 1
    assert "no health for service 'foo'" in unknown.stderr
    busy = ["serve", "--host", "127.0.0.1", "--port", str(proc.port), "--state-dir", str(tmp_path / "other")]
    quiet = run(*busy)
    assert quiet.returncode == 1
    assert "add_port" not in quiet.stderr
    assert "cannot listen" in quiet.stderr
    assert "add_port" not in run(*busy, "--log-level", "debug").stderr  # our debug lines, not gRPC's
    assert "add_port" in run(*busy, "--log-level", "debug", "--debug-libraries").stderr


@pytest.mark.parametrize(
    ("argv", "environ", "debug"),
    [
        ([], {}, False),
        (["serve", "--log-level", "debug", "--debug-libraries"], {}, True),
        (["serve", "--log-level=debug", "--debug-libraries"], {}, True),
        (["health"], {"NORMSERVE_LOG_LEVEL": "DEBUG", "NORMSERVE_DEBUG_LIBRARIES": "1"}, True),
        (["serve", "--log-level", "debug"], {}, False),  # our debug lines only
        (["serve", "--log-level", "info", "--debug-libraries"], {"NORMSERVE_LOG_LEVEL": "debug"}, False),
        (["serve", "--log-level", "--debug-libraries"], {}, False),
    ],
)
def test_debug_output_is_asked_by_the_flag_or_its_variable(argv, environ, debug) -> None:
    from normserve.tools.__main__ import debug_asked

    assert debug_asked(argv, environ) is debug


def test_default_outputs_land_in_folders_git_ignores(tmp_path) -> None:
    """`normserve bench` and the example write into named folders, ignored here, not loose files in the cwd."""
    root = Path(__file__).resolve().parents[1]
    bench = {a.dest: a.default for a in _commands()["bench"]._actions}
    example = subprocess.run(
        [sys.executable, str(root / "examples" / "train_digits.py"), "--help"], capture_output=True, text=True
    )
    assert "examples/out/" in " ".join(example.stdout.split())
    for path in (bench["json"], bench["plot"], Path("examples/out/digits.png")):
        assert len(Path(path).parts) > 1, path
        assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(path)]).returncode == 0, path
