"""Issue 25's findings about state and resources, each against the real server: a list of layers larger than
a message (4), a failed synchronized step with a huge step number (6), and shared-memory registrations that
ran the server out of descriptors (11)."""

from __future__ import annotations

import sqlite3
import time

import grpc
import numpy as np
import pytest
from serverproc import patience

from normserve.client import NormClient
from normserve.server.store import DATABASE_NAME, StateStore
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

SYNC_TIMEOUT = patience(0.1)  # a second alone: the ranks of a step, sent together, meet well within it


def stored_layers(state_dir, names: list[str]) -> None:
    """A replica's state dir holding ``names`` (RMSNorm layers without parameters), written straight into its
    SQLite file: far faster than that many CreateLayers."""
    StateStore(state_dir, "NORMAL").close()  # the schema
    config = pb.LayerConfig(kind=pb.RMS_NORM, normalized_shape=[4], affine=False).SerializeToString()
    db = sqlite3.connect(state_dir / DATABASE_NAME)
    with db:
        db.executemany("INSERT INTO layers VALUES (?, ?, 1, 0)", [(name, config) for name in names])
    db.close()


def test_a_list_larger_than_a_message_is_answered_in_pages_that_fit(start_server, tmp_path) -> None:
    """Finding 4: a replica's own ListLayers over --max-message-bytes failed at send time, after the work."""
    names = [f"layer.{j:04d}." + "n" * 200 for j in range(3000)]  # about 0.8 MB of descriptions
    stored_layers(tmp_path / "state", names)
    proc = start_server("--max-message-bytes", str(128 << 10))
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        first = stub.ListLayers(pb.ListLayersRequest(page_size=5000))
        assert 0 < len(first.layers) < 1000  # cut to fit the message, not at the page size
        assert first.ByteSize() <= 128 << 10
        assert first.next_page_token == first.layers[-1].name
        second = stub.ListLayers(pb.ListLayersRequest(page_size=3, page_token=first.next_page_token))
        assert [layer.name for layer in second.layers] == names[len(first.layers) : len(first.layers) + 3]
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListLayers(pb.ListLayersRequest(page_token="no\nsuch"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with NormClient(proc.target) as nc:
        assert [layer.name for layer in nc.list_layers()] == names


def _train(stub, layer: str, x: np.ndarray, step: int, rank: int = 0, world_size: int = 2, **request) -> grpc.Future:
    sync = pb.SyncGroup(id="job", world_size=world_size, rank=rank, step=step)
    return stub.Train.future(pb.TrainRequest(layer=layer, x=codec.encode(x), sync=sync, **request), timeout=patience(6))


def _status(future: grpc.Future) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_failed_step_with_any_number_leaves_later_steps_open(start_server, rng) -> None:
    """Finding 6: one rank alone at sync.step 2**64-1 timed out, changed nothing, and yet closed every later
    step (0, 1, 10**9) of its group on that layer until restart. Now step numbers are bounded (< 2**63) and
    only a step that gathered all its ranks and committed moves the group's mark."""
    proc = start_server("--sync-timeout", str(SYNC_TIMEOUT))
    x = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2)]
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn", config=pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3)))
        with pytest.raises(grpc.RpcError) as refused:
            _train(stub, "bn", x[0], 2**64 - 1).result()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "2**63" in refused.value.details()
        started = time.monotonic()
        assert _status(_train(stub, "bn", x[0], 2**63 - 1)) == grpc.StatusCode.DEADLINE_EXCEEDED  # rank 1 never came
        assert time.monotonic() - started >= SYNC_TIMEOUT
        # a step that gathered both ranks but failed to commit (the ranks disagree on the weight) moves nothing
        weights = [codec.encode(rng.normal(size=3).astype(np.float32)) for _ in range(2)]
        disagreeing = [_train(stub, "bn", x[r], 10**9, rank=r, parameters={"weight": weights[r]}) for r in range(2)]
        assert [_status(f) for f in disagreeing] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        assert stub.GetLayer(pb.GetLayerRequest(name="bn")).version == 1
        for step in (0, 3):  # later (and lower) steps run
            ranks = [_train(stub, "bn", x[r], step, rank=r) for r in range(2)]
            assert [_status(f) for f in ranks] == [grpc.StatusCode.OK] * 2
        assert stub.GetLayer(pb.GetLayerRequest(name="bn")).num_batches_tracked == 2
        with pytest.raises(grpc.RpcError) as closed:  # a committed step does move the mark: steps go forward
            _train(stub, "bn", x[0], 2).result()
        assert closed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "step 3 of the group has finished already" in closed.value.details()


def _register(stub, name: str, key: str) -> grpc.StatusCode:
    try:
        stub.RegisterSharedMemory(
            pb.RegisterSharedMemoryRequest(name=name, key=key, byte_size=4096), timeout=patience(1)
        )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_shared_memory_registrations_are_bounded_and_leave_descriptors_for_connections(tmp_path) -> None:
    """Finding 11: one 4 KiB object registered under 1006 names took the server to its 1024-descriptor limit;
    from then on new connections (health checks too) timed out. Registrations are now bounded in all, per
    client (connection), and by the descriptors left under RLIMIT_NOFILE (here 400, soft and hard)."""
    from multiprocessing import shared_memory

    from serverproc import NORMSERVE, ServerProcess, wait_serving

    state = tmp_path / "state"
    serve = [NORMSERVE, "serve", "--port", "0", "--state-dir", str(state), "--shared-memory", "--workers", "1"]
    per_client = ["--max-shared-memory-regions-per-client", "50"]
    proc = ServerProcess(state, command=["prlimit", "--nofile=400:400", "--", *serve, *per_client]).start()
    shm = shared_memory.SharedMemory(create=True, size=4096)
    # a connection of its own each (channels in one process share one by default): a client each
    channels = [grpc.insecure_channel(proc.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    try:
        stubs = [pb_grpc.NormalizationStub(channel) for channel in channels]
        codes = [_register(stubs[0], f"a{i}", shm.name) for i in range(51)]
        assert codes == [grpc.StatusCode.OK] * 50 + [grpc.StatusCode.RESOURCE_EXHAUSTED]  # one client's share
        registered = 50
        for i, stub in enumerate(stubs[1:]):  # more clients, until the descriptors kept for connections are reached
            codes = [_register(stub, f"c{i}.{j}", shm.name) for j in range(50)]
            registered += codes.count(grpc.StatusCode.OK)
            if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
                break
        assert 50 < registered < 400 - 100, registered  # stopped with a quarter of 400 (at least 256) still free
        for _ in range(50):  # new connections, as load balancers' health checks open them, are still served
            wait_serving(proc.target)
        stubs[0].UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest())
        assert _register(stubs[0], "again", shm.name) == grpc.StatusCode.OK
    finally:
        for channel in channels:
            channel.close()
        shm.close()
        shm.unlink()
        assert proc.stop() == 0, proc.log()
