"""A full state directory, end to end on a small real filesystem: every write answers
RESOURCE_EXHAUSTED and changes nothing, reads and health carry on, the next write after space
returns succeeds without a restart, and SIGTERM still exits 0 with the acknowledged state kept."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import NORMSERVE, ServerProcess, everything, patience

from normserve.server.errors import StateDirFull
from normserve.server.store import StateStore, _out_of_space
from normserve.tools import children
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class SmallDisk:
    """A 4 MiB tmpfs mounted on ``state_dir``, and the server on it (its logs numbered by start).

    ``path`` is where this process reaches the filesystem and ``enter`` the command prefix a
    server needs to see it: the mount point and nothing when root mounted it here; a
    ``/proc/PID/root`` path and ``nsenter`` when it lives in a user namespace of ``PID``'s.
    """

    def __init__(self, state_dir: Path, path: Path, enter: list[str]) -> None:
        self.state_dir = state_dir
        self.path = path
        self.enter = enter
        self.filler = path / "filler"
        command = [*enter, NORMSERVE, "serve", "--port", "0", "--state-dir", str(state_dir)]
        self.server = ServerProcess(state_dir, command=command)

    def start(self) -> ServerProcess:
        return self.server.start()

    def fill(self) -> None:
        """Write a filler file until the filesystem answers ENOSPC."""
        chunk = bytes(1 << 16)
        with open(self.filler, "ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        assert shutil.disk_usage(self.path).free < 4096

    def free(self) -> None:
        self.filler.unlink()

    def stop_server(self) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.kill()


def _namespace_holder(mount: list[str], why_not_here: str) -> subprocess.Popen:
    """A process that holds a user and mount namespace of its own with ``mount`` done in it (or skip)."""
    script = f"{shlex.join(mount)} && echo mounted && exec sleep infinity"
    try:
        holder = children.popen(  # `sleep infinity` must not outlive the test run
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip(f"{why_not_here}, and no unshare for a user namespace")
    if holder.stdout.readline().strip() != "mounted":
        holder.kill()
        pytest.skip(f"{why_not_here}, and no tmpfs in a user namespace: {holder.communicate()[1].strip()}")
    return holder


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Root mounts the tmpfs (as here and in CI); others try a user namespace of their own, else skip."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state_dir)]
    mounted = subprocess.run(mount, capture_output=True, text=True) if os.geteuid() == 0 else None
    with contextlib.ExitStack() as cleanup:  # runs last in, first out, on failures too
        if mounted is not None and mounted.returncode == 0:
            cleanup.callback(subprocess.run, ["umount", "--lazy", str(state_dir)], check=True)
            disk = SmallDisk(state_dir, state_dir, [])
        else:
            why_not_here = "not root" if mounted is None else f"mount failed: {mounted.stderr.strip()}"
            holder = _namespace_holder(mount, why_not_here)
            cleanup.callback(holder.communicate)
            cleanup.callback(holder.kill)  # the tmpfs goes with the namespace
            enter = ["nsenter", f"--target={holder.pid}", "--user", "--mount", "--preserve-credentials"]
            disk = SmallDisk(state_dir, Path(f"/proc/{holder.pid}/root{state_dir}"), enter)
        cleanup.callback(disk.stop_server)
        yield disk


def t(array: np.ndarray) -> pb.Tensor:
    return codec.encode(np.asarray(array, dtype=np.float32))


def refused(call, request, disk: SmallDisk) -> None:
    """``call(request)`` answers RESOURCE_EXHAUSTED, saying the state dir is full and where."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=patience(1))
    assert info.value.code() == EXHAUSTED, info.value.details()
    assert "full" in info.value.details()
    assert str(disk.state_dir) in info.value.details()
    assert "nothing was changed" in info.value.details()


def test_full_state_dir_refuses_writes_changes_nothing_and_recovers_without_restart(small_disk, rng) -> None:
    proc = small_disk.start()
    bn = pb.LayerConfig(kind=pb.BATCH_NORM, num_features=8)
    x = rng.normal(0.5, 2.0, (16, 8, 5)).astype(np.float32)
    train = pb.TrainRequest(layer="bn", x=t(x))
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn", config=bn))
        stub.CreateLayer(
            pb.CreateLayerRequest(name="ln", config=pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[5]))
        )
        for _ in range(3):
            stub.Train(pb.TrainRequest(layer="bn", x=t(rng.normal(size=(16, 8, 5)))))
        infer = pb.InferRequest(layer="bn", x=t(rng.normal(size=(4, 8, 5))))
        before, inferred = everything(stub), stub.Infer(infer)
        assert stub.GetLayer(pb.GetLayerRequest(name="bn")).version == 4

        small_disk.fill()
        refused(stub.Train, train, small_disk)
        refused(stub.CreateLayer, pb.CreateLayerRequest(name="new", config=bn), small_disk)
        state = {"running_mean": t(rng.normal(size=8)), "running_var": t(rng.uniform(0.5, 2.0, 8))}
        refused(stub.SetState, pb.SetStateRequest(name="bn", tensors=state, partial=True), small_disk)
        refused(stub.DeleteLayer, pb.DeleteLayerRequest(name="ln"), small_disk)
        refused(stub.Train, train, small_disk)  # still refused, still the same answer
        # Nothing changed, in memory: the same layers and states byte for byte, the same version.
        assert everything(stub) == before
        assert stub.GetLayer(pb.GetLayerRequest(name="bn")).version == 4
        # Reads, health and writes that store nothing carry on.
        assert stub.Infer(infer) == inferred
        stub.Train(pb.TrainRequest(layer="ln", x=t(rng.normal(size=(3, 5)))))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert proc.log_lines("Train failed: RESOURCE_EXHAUSTED")  # the access log's warning, not a server error
        assert "Traceback" not in proc.log()

        small_disk.free()
        trained = stub.Train(train)  # the same request, no restart
        assert trained.version == 5
        after = everything(stub)
    assert proc.kill() == -signal.SIGKILL

    restarted = small_disk.start()  # and it was durable, database and all
    with grpc.insecure_channel(restarted.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        assert stub.GetLayer(pb.GetLayerRequest(name="bn")).version == 5
        assert everything(stub) == after


def test_sigterm_on_a_full_state_dir_exits_0_and_keeps_the_acknowledged_state(small_disk, rng) -> None:
    proc = small_disk.start()
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn", config=pb.LayerConfig(kind=pb.BATCH_NORM, num_features=6)))
        for _ in range(4):
            stub.Train(pb.TrainRequest(layer="bn", x=t(rng.normal(1.0, 3.0, (8, 6, 7)))))
        acknowledged = everything(stub)
        small_disk.fill()
        refused(stub.Train, pb.TrainRequest(layer="bn", x=t(rng.normal(size=(8, 6, 7)))), small_disk)
    assert proc.stop() == 0, proc.log()
    assert "is full: the WAL stays and is replayed at the next start" in proc.log()
    assert "stopped; state is in" in proc.log()
    assert "Traceback" not in proc.log()

    restarted = small_disk.start()  # the disk still full: the WAL holds what the checkpoint could not fold in
    with grpc.insecure_channel(restarted.target) as channel:
        assert everything(pb_grpc.NormalizationStub(channel)) == acknowledged
    small_disk.free()


# ---------------------------------------------------------------------- the store itself
def bn_state(rng: np.random.Generator, features: int) -> dict[str, np.ndarray]:
    return {"running_mean": rng.normal(size=features), "running_var": rng.uniform(0.5, 2.0, features)}


def stored(store: StateStore) -> list[tuple]:
    """What the store holds, tensors as bytes, for exact comparisons."""
    return [
        (s.name, s.config, s.version, s.num_batches_tracked, {k: v.tobytes() for k, v in s.tensors.items()})
        for s in store.load_all()
    ]


def test_store_write_that_meets_a_full_disk_mid_statement_answers_state_dir_full(small_disk, rng) -> None:
    """A spill to the WAL that meets ENOSPC makes SQLite roll the whole transaction back itself; a
    second ROLLBACK ("cannot rollback - no transaction is active") must not replace the error."""
    if small_disk.enter:
        pytest.skip("SQLite resolves /proc/PID/root to this namespace's path: the store needs the tmpfs mounted here")
    store = StateStore(small_disk.path)
    store.create_layer("a", b"config", 1, 0, bn_state(rng, 4))
    store._db.execute("PRAGMA cache_size = 8")  # a large write spills to the WAL before COMMIT
    before = stored(store)
    big = bn_state(rng, 1 << 15)
    small_disk.fill()
    with pytest.raises(StateDirFull, match="is full") as info:
        store.create_layer("b", b"config", 1, 0, big)
    assert str(small_disk.state_dir) in str(info.value)
    assert info.value.__cause__.sqlite_errorname == "SQLITE_FULL"
    assert not store._db.in_transaction
    assert stored(store) == before
    small_disk.free()
    store.create_layer("b", b"config", 1, 0, big)  # room again: no reopening needed
    assert [layer.name for layer in store.load_all()] == ["a", "b"]
    store.close()


def test_store_full_within_one_statement_rolls_back_the_open_transaction(tmp_path, rng) -> None:
    """SQLITE_FULL may also undo just the statement (here: over max_page_count); the store rolls back the rest."""
    store = StateStore(tmp_path)
    store.create_layer("a", b"config", 1, 0, bn_state(rng, 4))
    before = stored(store)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StateDirFull, match="is full"):
        store.create_layer("b", b"config", 1, 0, bn_state(rng, 1 << 14))  # the layers row fits, the tensors not
    assert not store._db.in_transaction
    assert stored(store) == before
    store.close()


def test_store_other_errors_roll_back_and_surface_unchanged(tmp_path, rng) -> None:
    store = StateStore(tmp_path)
    store.create_layer("a", b"config", 1, 0, bn_state(rng, 4))
    store._db.execute("DROP TABLE tensors")  # the UPDATE of layers succeeds, the tensors fail
    with pytest.raises(sqlite3.OperationalError, match="no such table: tensors"):
        store.update_state("a", 2, 1, bn_state(rng, 4))
    assert not store._db.in_transaction
    assert store._db.execute("SELECT version FROM layers").fetchall() == [(1,)]
    store.close()


def test_only_an_io_error_on_a_filesystem_without_room_counts_as_full(small_disk, tmp_path) -> None:
    """SQLite reports ENOSPC found late (at fsync) as SQLITE_IOERR; a failing disk must still be an error."""
    io_error = sqlite3.OperationalError("disk I/O error")
    io_error.sqlite_errorcode = 10 | (4 << 8)  # SQLITE_IOERR_FSYNC
    assert not _out_of_space(io_error, tmp_path)
    small_disk.fill()
    assert _out_of_space(io_error, small_disk.path)
    assert not _out_of_space(sqlite3.OperationalError("database is locked"), small_disk.path)
