"""Concurrent clients: Train is atomic per layer, readers never wait, layers are independent."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from serverproc import patience

from normserve.client import NormClient
from normserve.server.registry import INLINE_ELEMENTS, Registry
from normserve.server.store import StateStore
from normserve.v1 import normalization_pb2 as pb

CLIENTS, CALLS = 8, 40


def test_concurrent_trains_on_one_layer_are_atomic(server, layer_name) -> None:
    with NormClient(server.target) as nc:
        nc.create_layer(layer_name, "batch_norm", num_features=4, momentum=None)  # cumulative average
    batches = [
        [
            np.random.default_rng(1000 * c + i).normal(c, 1.0 + i % 3, (16, 4, 3)).astype(np.float32)
            for i in range(CALLS)
        ]
        for c in range(CLIENTS)
    ]
    versions: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            with NormClient(server.target) as nc:
                layer = nc.layer(layer_name)
                for x in batches[c]:
                    layer.train(x)
                    with lock:
                        versions.append(layer.version)  # the version this Train produced
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    with NormClient(server.target) as nc:
        state = nc.layer(layer_name).state_dict()
    every = [x.astype(np.float64) for per_client in batches for x in per_client]
    assert int(state["num_batches_tracked"]) == CLIENTS * CALLS
    # momentum=None: the running statistics are the plain average of the batch statistics, whatever the order
    mean = np.mean([x.mean(axis=(0, 2)) for x in every], axis=0)
    var = np.mean([x.var(axis=(0, 2), ddof=1) for x in every], axis=0)
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-5, atol=1e-6)
    assert sorted(versions) == list(range(2, 2 + CLIENTS * CALLS))  # each Train its own step


@pytest.fixture
def registry(tmp_path):
    store = StateStore(tmp_path / "state")
    registry = Registry(store, default_device="cpu", workers=2)
    yield registry
    if not registry._closing:
        asyncio.run(registry.close())


def test_readers_never_wait_for_a_writer_and_layers_are_independent(registry) -> None:
    async def scenario() -> None:
        for name in ("a", "b"):
            await registry.create(name, pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3))
        x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
        entry = registry._entry("a")
        async with entry.lock:  # a writer of "a" is mid-update
            train_a = asyncio.ensure_future(registry.train("a", x))
            await asyncio.sleep(0.05)
            assert not train_a.done()  # queued behind the writer
            _, snapshot = await asyncio.wait_for(registry.infer("a", x), patience(1))  # readers do not wait
            assert snapshot.version == 1
            await asyncio.wait_for(registry.gradient("a", x, x, True), patience(1))
            _, trained_b, _ = await asyncio.wait_for(registry.train("b", x), patience(1))  # other layers do not wait
            assert trained_b.version == 2
        _, trained_a, _ = await asyncio.wait_for(train_a, patience(1))
        assert trained_a.version == 2
        await registry.close()

    asyncio.run(scenario())


def test_a_cancelled_train_still_commits_whole(registry) -> None:
    """A client that gives up mid-Train never leaves memory and the database disagreeing."""

    async def scenario() -> None:
        await registry.create("a", pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3))
        x = np.random.default_rng(1).normal(size=(64, 3, 100)).astype(np.float32)
        call = asyncio.ensure_future(registry.train("a", x))
        await asyncio.sleep(0)  # started
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await registry.close()  # waits for started writes
        assert registry.get("a").version == 2

    asyncio.run(scenario())
    reopened = StateStore(registry._store.directory)
    try:
        (stored,) = reopened.load_all()
        assert stored.version == 2
        assert stored.num_batches_tracked == 1
    finally:
        reopened.close()


def test_delete_lets_queued_writes_finish_and_refuses_later_ones(registry) -> None:
    from normserve.server.errors import LayerNotFound

    async def scenario() -> None:
        config = pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3)
        await registry.create("a", config)
        x = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
        async with registry._entry("a").lock:  # a writer is mid-update
            first = asyncio.ensure_future(registry.train("a", x))
            await asyncio.sleep(0.01)
            delete = asyncio.ensure_future(registry.delete("a"))
            await asyncio.sleep(0.01)
            last = asyncio.ensure_future(registry.train("a", x))
            await asyncio.sleep(0.01)
        assert (await first)[1].version == 2  # queued before the delete: applied
        assert (await delete).version == 2
        with pytest.raises(LayerNotFound):
            await last  # queued after the delete: the layer is gone
        snapshot, created = await registry.create("a", config)
        assert (created, snapshot.version, snapshot.layer.num_batches_tracked) == (True, 1, 0)
        await registry.close()

    asyncio.run(scenario())


def test_a_queued_write_gives_up_at_its_deadline_and_changes_nothing(registry) -> None:
    from normserve.server.errors import WaitTimeout

    async def scenario() -> None:
        await registry.create("a", pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3))
        x = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
        async with registry._entry("a").lock:  # a writer is mid-update
            with pytest.raises(WaitTimeout, match=r"earlier writes of layer 'a'.*nothing was changed"):
                await registry.train("a", x, wait=0.05)
            with pytest.raises(WaitTimeout):
                await registry.set_state("a", {"running_mean": np.ones(3, np.float32)}, partial=True, wait=0.05)
            with pytest.raises(WaitTimeout):
                await registry.delete("a", wait=0.05)
            abandoned = asyncio.ensure_future(registry.train("a", x))
            await asyncio.sleep(0.01)
            abandoned.cancel()  # the client went away before the write started: it never happens
        assert registry.get("a").version == 1
        _, snapshot, _ = await registry.train("a", x, wait=1)  # the lock is free again
        assert snapshot.version == 2
        assert snapshot.layer.num_batches_tracked == 1
        await registry.close()

    asyncio.run(scenario())


def test_max_layers_refuses_new_names_only(tmp_path) -> None:
    from normserve.server.errors import TooManyLayers

    async def scenario() -> None:
        registry = Registry(StateStore(tmp_path / "state"), default_device="cpu", workers=1, max_layers=2)
        config = pb.LayerConfig(kind=pb.LAYER_NORM, normalized_shape=[4])
        for name in ("a", "b"):
            await registry.create(name, config)
        with pytest.raises(TooManyLayers, match=r"holds 2 layers.*--max-layers 2"):
            await registry.create("c", config)
        assert (await registry.create("a", config))[1] is False  # an existing name is still answered
        await registry.delete("a")
        assert (await registry.create("c", config))[1] is True
        assert [s.name for s in registry.list()] == ["b", "c"]
        await registry.close()

    asyncio.run(scenario())


def test_a_read_gives_up_when_no_kernel_thread_frees_in_time(tmp_path) -> None:
    from normserve.server.errors import WaitTimeout

    async def scenario() -> None:
        registry = Registry(StateStore(tmp_path / "state"), default_device="cpu", workers=1)
        await registry.create("a", pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3))
        # Larger than INLINE_ELEMENTS: small batches compute on the event loop and never wait.
        x = np.random.default_rng(4).normal(size=(INLINE_ELEMENTS, 3)).astype(np.float32)
        release = threading.Event()
        busy = asyncio.get_running_loop().run_in_executor(registry._kernels, release.wait, 10)  # the only thread
        with pytest.raises(WaitTimeout, match="kernel threads"):
            await registry.infer("a", x, wait=0.05)
        with pytest.raises(WaitTimeout):
            await registry.gradient("a", x, x, True, wait=0.05)
        release.set()
        await busy
        y, snapshot = await registry.infer("a", x, wait=5)
        assert y.shape == x.shape
        assert snapshot.version == 1
        await registry.close()

    asyncio.run(scenario())


def test_small_batches_compute_inline_while_the_kernel_threads_are_busy(tmp_path) -> None:
    async def scenario() -> None:
        registry = Registry(StateStore(tmp_path / "state"), default_device="cpu", workers=1)
        await registry.create("a", pb.LayerConfig(kind=pb.BATCH_NORM, num_features=3))
        x = np.random.default_rng(5).normal(size=(INLINE_ELEMENTS // 3, 3)).astype(np.float32)
        release = threading.Event()
        busy = asyncio.get_running_loop().run_in_executor(registry._kernels, release.wait, 10)
        y, _ = await registry.infer("a", x, wait=0.05)  # no kernel thread needed
        np.testing.assert_allclose(y, (x - 0) / np.sqrt(1 + 1e-5), rtol=1e-6)
        release.set()
        await busy
        await registry.close()

    asyncio.run(scenario())


def test_max_concurrent_rpcs_refuses_the_excess_and_applies_the_rest(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from serverproc import ServerProcess

    from normserve.client import ResourceExhausted, RetryPolicy

    proc = ServerProcess(tmp_path / "state", "--max-concurrent-rpcs", "1").start()
    try:
        x = np.random.default_rng(5).normal(size=(64, 64, 512)).astype(np.float32)  # 8 MB: calls overlap
        with NormClient(proc.target, retry=RetryPolicy(attempts=1)) as nc:
            layer = nc.create_layer("busy", "batch_norm", num_features=64)

            def train(_: int) -> str:
                try:
                    layer.train(x)
                    return "ok"
                except ResourceExhausted as error:
                    return error.details

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(train, range(6)))
            applied = answers.count("ok")
            assert 1 <= applied < 6, answers
            assert all(a == "ok" or "as --max-concurrent-rpcs allows" in a for a in answers), answers
            assert nc.layer("busy").info.num_batches_tracked == applied  # refused calls changed nothing
    finally:
        assert proc.stop() == 0
