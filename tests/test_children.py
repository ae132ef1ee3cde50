"""Every process a command, a benchmark or a test starts ends when its parent ends, SIGTERM or SIGKILL
(tools.children: the parent-death signal, and signal handlers that unwind)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from serverproc import NORMSERVE, patience

from normserve.tools import children
from normserve.tools.cluster import free_port_block

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a started tree may take to come up (a cluster of one replica: about 10 s alone).
STARTUP = patience(10)
#: Seconds its processes may take to end: at most a server's --grace-period (30 s) and its shutdown.
ENDING = 30 + patience(3)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` now, with its start time (so a reused pid is not mistaken for it)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if (fields := _stat(child)) is not None:
                found[child] = fields[19]
                todo.append(child)
    return found


def survivors(tree: dict[int, str], timeout: float = ENDING) -> list[str]:
    """The processes of ``tree`` still running after up to ``timeout`` seconds (zombies count as ended)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, start in tree.items() if (f := _stat(pid)) is not None and f[0] != "Z" and f[19] == start]
        if not alive or time.monotonic() > deadline:
            return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in alive]
        time.sleep(0.2)


def started(command: list[str], ready: str, **kwargs) -> tuple[subprocess.Popen, queue.Queue]:
    """``command`` running, once a line of its stdout contains ``ready`` (read on a thread: never blocks)."""
    process = children.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline, seen = time.monotonic() + STARTUP, []
    while not any(ready in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            process.kill()
            pytest.fail(f"{command[:3]} did not print {ready!r} within {STARTUP:g} s:\n{''.join(seen)}")
    return process, lines


def ended(process: subprocess.Popen, signum: int, tree: dict[int, str]) -> list[str]:
    os.kill(process.pid, signum)
    process.wait(ENDING)
    return survivors(tree)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_test_server_ends_with_the_test_process(tmp_path, signum) -> None:
    """What a timed-out test run is: pytest killed, its servers (tests/serverproc.py) must go with it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from serverproc import ServerProcess
        proc = ServerProcess(__import__("pathlib").Path({str(tmp_path / "state")!r})).start()
        print("serving", proc.process.pid, flush=True)
        time.sleep(600)
    """)
    process, _ = started([sys.executable, "-c", script], "serving")
    tree = descendants(process.pid)
    assert len(tree) == 1
    assert ended(process, signum, tree) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_normserve_bench_servers_end_with_it(tmp_path, signum) -> None:
    command = [NORMSERVE, "bench", "--quick", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    process, _ = started(command, "| op |")  # the table's header: its echo and its server are up
    tree = descendants(process.pid)
    assert len(tree) >= 2  # the echo server and `normserve serve`
    assert ended(process, signum, tree) == []


def _nginx() -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("normserve cluster runs nginx, which is not installed (apt-get install nginx-light)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_normserve_cluster_replicas_and_nginx_end_with_it(tmp_path, signum) -> None:
    _nginx()
    port = free_port_block(2)
    command = [NORMSERVE, "cluster", "--replicas", "1", "--port", str(port), "--state-dir", str(tmp_path)]
    command += ["--workers", "1", "--startup-timeout", str(min(600, STARTUP))]
    process, _ = started(command, "normserve cluster: serving on")
    tree = descendants(process.pid)
    assert len(tree) >= 3  # the replica, nginx's master and its worker(s)
    assert ended(process, signum, tree) == []


def test_the_cluster_benchmark_leaves_nothing_behind_on_sigterm(tmp_path) -> None:
    """benchmarks/cluster.py once ignored SIGINT and, after SIGTERM, left a replica, nginx and 8 clients."""
    _nginx()
    command = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--quick", "--json", str(tmp_path / "c.json")]
    process = children.popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, tree = time.monotonic() + STARTUP, {}
    while len(tree) < 8 + 3 and process.poll() is None:  # its 8 clients beside a replica and nginx
        assert time.monotonic() < deadline, f"the benchmark's clients did not start within {STARTUP:g} s"
        tree |= descendants(process.pid)
        time.sleep(0.1)
    assert process.poll() is None, "the benchmark ended before its clients ran"
    tree |= descendants(process.pid)
    assert ended(process, signal.SIGTERM, tree) == []
    assert process.returncode != 0
