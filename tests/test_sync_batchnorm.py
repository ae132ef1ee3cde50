"""SyncBatchNorm through the server: k worker threads, each with its own client, against one real server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from serverproc import everything, patience

from normserve.client import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    NormClient,
    SyncGroup,
)
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc


def _ranks(target: str, work, world: int):
    """``work(layer_handle_of_rank, rank)`` on ``world`` threads, each with its own client; results or errors."""

    def run(rank: int):
        with NormClient(target, timeout=patience(3)) as nc:
            try:
                return work(nc, rank)
            except Exception as exc:  # returned, so every rank's outcome is checked
                return exc

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(run, range(world)))


def _state(target: str) -> list[bytes]:
    import grpc

    with grpc.insecure_channel(target) as channel:
        return everything(pb_grpc.NormalizationStub(channel))


def sync_steps_match_torch(target: str, layer_name: str, rng, sizes, spatial, steps: int = 2) -> None:
    """Ranks of ``sizes`` samples each train and differentiate a batch norm layer at ``target`` together for
    ``steps`` steps; their answers and the layer's state equal torch.nn.BatchNorm over the whole batch."""
    channels = 3
    weight, bias = rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels)
    with NormClient(target, timeout=patience(6)) as client:
        client.create_layer(layer_name, "batch_norm", num_features=channels, momentum=0.3)
        client.layer(layer_name).load_state_dict({"weight": weight, "bias": bias}, strict=False)
    twin = (torch.nn.BatchNorm2d if len(spatial) == 2 else torch.nn.BatchNorm1d)(channels, momentum=0.3)
    twin.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias)}, strict=False)

    for step in range(steps):
        xs = [rng.normal(1.0, 2.0, (n, channels, *spatial)).astype(np.float32) for n in sizes]
        dys = [rng.normal(0.0, 1.0, x.shape).astype(np.float32) for x in xs]

        def work(nc: NormClient, rank: int, xs=xs, dys=dys, step=step):
            layer = nc.layer(layer_name)
            group = SyncGroup("job", world_size=len(sizes), rank=rank).at(step)
            y = layer.train(xs[rank], keep_forward=True, sync=group)
            return (y, *layer.gradient(None, dys[rank], sync=group))

        results = _ranks(target, work, len(sizes))
        x = torch.tensor(np.concatenate(xs), requires_grad=True)
        twin.zero_grad()
        y = twin(x)
        y.backward(torch.tensor(np.concatenate(dys)))
        tol = {"rtol": 1e-5, "atol": 1e-5}
        np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y.detach().numpy(), **tol)
        np.testing.assert_allclose(np.concatenate([r[1] for r in results]), x.grad.numpy(), **tol)
        np.testing.assert_allclose(sum(r[2] for r in results), twin.weight.grad.numpy(), **tol)
        np.testing.assert_allclose(sum(r[3] for r in results), twin.bias.grad.numpy(), **tol)

    with NormClient(target, timeout=patience(6)) as client:
        state = client.layer(layer_name).state_dict()
        np.testing.assert_allclose(state["running_mean"], twin.running_mean.numpy(), **tol)
        np.testing.assert_allclose(state["running_var"], twin.running_var.numpy(), **tol)
        assert int(state["num_batches_tracked"]) == steps  # once per step, not once per rank
        assert client.layer(layer_name).version == 2 + steps  # created, weights loaded, one update per step


@pytest.mark.parametrize(("sizes", "spatial"), [((3, 5, 1, 7), (2, 2)), ((1, 1, 2), ()), ((6,), (4,))])
def test_ranks_with_uneven_batches_equal_one_batch_norm_over_the_whole_batch(server, layer_name, rng, sizes, spatial):
    sync_steps_match_torch(server.target, layer_name, rng, sizes, spatial)


def test_synced_train_sends_parameters_and_returns_running_stats(server, client, layer_name, rng):
    client.create_layer(layer_name, "batch_norm", num_features=2)
    weight = rng.normal(1.0, 0.3, 2).astype(np.float32)
    xs = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(2)]

    def work(nc: NormClient, rank: int):
        layer = nc.layer(layer_name)
        y = layer.train(
            xs[rank], sync=SyncGroup("p", 2, rank), parameters={"weight": weight}, return_running_stats=True
        )
        return y, layer.running_stats

    (y0, stats0), (y1, stats1) = _ranks(server.target, work, 2)
    x = np.concatenate(xs).astype(np.float64)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(np.concatenate([y0, y1]), xhat * weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats0["running_var"], 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_array_equal(stats0["running_mean"], stats1["running_mean"])
    np.testing.assert_array_equal(client.layer(layer_name).state_dict()["weight"], weight)


def test_ranks_that_disagree_on_parameters_fail_the_step(server, client, layer_name, rng):
    client.create_layer(layer_name, "batch_norm", num_features=2)
    before = _state(server.target)

    def work(nc: NormClient, rank: int):
        weight = np.full(2, 1.0 + rank, np.float32)
        return nc.layer(layer_name).train(
            rng.normal(size=(3, 2)), sync=SyncGroup("d", 2, rank), parameters={"weight": weight}
        )

    results = _ranks(server.target, work, 2)
    assert all(isinstance(r, InvalidArgument) and "different parameters" in r.details for r in results), results
    assert _state(server.target) == before


@pytest.fixture
def quick_server(start_server):
    """A server whose synchronized steps give up after a second (times the slowdown: the ranks of a step
    start together, within that)."""
    return start_server("--sync-timeout", f"{patience(0.1):g}")


def test_a_rank_that_never_arrives_fails_the_step_for_all_and_changes_nothing(quick_server, rng):
    with NormClient(quick_server.target) as nc:
        nc.create_layer("bn", "batch_norm", num_features=3)
    before = _state(quick_server.target)
    sync_timeout = quick_server.args[1]
    missing = rf"rank\(s\) 2 \(1 of 3\) did not arrive within the server's --sync-timeout of {sync_timeout} s"

    def work(nc: NormClient, rank: int):
        layer = nc.layer("bn")
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=missing) as failure:
            layer.train(rng.normal(size=(4, 3)), sync=SyncGroup("job", 3, rank, step=5))
        return time.monotonic() - start, failure.value

    for waited, _ in _ranks(quick_server.target, work, 2):  # ranks 0 and 1 of 3
        assert 0.9 * float(sync_timeout) < waited < float(sync_timeout) + patience(1)
    assert _state(quick_server.target) == before
    with NormClient(quick_server.target) as nc:
        # The late rank learns at once that its step is gone; the next step works.
        with pytest.raises(DeadlineExceeded, match="start the next step"):
            nc.layer("bn").train(rng.normal(size=(4, 3)), sync=SyncGroup("job", 3, 2, step=5))
        nc.layer("bn").train(rng.normal(size=(4, 3)), sync=SyncGroup("job", 1, 0, step=6))
        assert nc.layer("bn").info.num_batches_tracked == 1


def test_a_gradient_rank_that_never_arrives_times_out(quick_server, rng):
    with NormClient(quick_server.target) as nc:
        layer = nc.create_layer("bn", "batch_norm", num_features=3)
        x = rng.normal(size=(4, 3))
        with pytest.raises(DeadlineExceeded, match="gradient step 0"):
            layer.gradient(x, rng.normal(size=x.shape), sync=SyncGroup("job", 2, 0))


def test_a_rank_twice_is_refused_alone_another_world_size_fails_the_step(server, client, layer_name, rng):
    client.create_layer(layer_name, "batch_norm", num_features=3)
    x = [rng.normal(size=(4, 3)) for _ in range(2)]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: client.layer(layer_name).train(x[0], sync=SyncGroup("g", 2, 0)))
        time.sleep(patience(0.05))  # rank 0 is waiting
        with NormClient(server.target) as other:
            with pytest.raises(InvalidArgument, match="rank 0 already joined"):
                other.layer(layer_name).train(x[1], sync=SyncGroup("g", 2, 0))
            y1 = other.layer(layer_name).train(x[1], sync=SyncGroup("g", 2, 1))  # the step still completes
        y0 = first.result(timeout=patience(3))
    whole = np.concatenate(x)
    np.testing.assert_allclose(
        np.concatenate([y0, y1]), (whole - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-5), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(InvalidArgument, match=r"has finished \(every rank joined it\).*realign_sync_steps"):
        client.layer(layer_name).train(x[0], sync=SyncGroup("g", 2, 0))
    # Another world size for one step fails it for every rank at once, naming both sizes.
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        first = pool.submit(lambda: client.layer(layer_name).train(x[0], sync=SyncGroup("g", 2, 0, step=1)))
        time.sleep(patience(0.05))
        with (
            NormClient(server.target) as other,
            pytest.raises(InvalidArgument, match=r"rank 1 gave sync.world_size 3, rank\(s\) 0 gave 2"),
        ):
            other.layer(layer_name).train(x[1], sync=SyncGroup("g", 3, 1, step=1))
        with pytest.raises(Aborted, match=r"rank 1 gave sync.world_size 3, rank\(s\) 0 gave 2"):
            first.result(timeout=patience(3))  # Aborted, not the --sync-timeout's (60 s) DeadlineExceeded: at once
        assert time.monotonic() - start < patience(1)


def test_a_rank_with_a_bad_batch_aborts_the_others_and_nothing_changes(server, client, layer_name, rng):
    client.create_layer(layer_name, "batch_norm", num_features=3)
    before = _state(server.target)

    def work(nc: NormClient, rank: int):
        x = rng.normal(size=(4, 3))
        if rank == 1:
            x[0, 0] = np.nan
        else:
            time.sleep(0.3)  # rank 1 fails first, or while the others wait: both must abort them
        return nc.layer(layer_name).train(x, sync=SyncGroup("bad", 3, rank))

    results = _ranks(server.target, work, 3)
    assert isinstance(results[1], InvalidArgument)
    assert "NaN" in results[1].details
    for rank in (0, 2):
        assert isinstance(results[rank], Aborted), results[rank]
        assert "rank 1 was refused" in results[rank].details
    assert _state(server.target) == before


@pytest.mark.parametrize(
    ("kind", "config", "sync", "message"),
    [
        ("layer_norm", {"normalized_shape": [3]}, pb.SyncGroup(id="g", world_size=1), "only batch norm"),
        (
            "batch_norm",
            {"num_features": 3},
            pb.SyncGroup(id="g", world_size=2, rank=2),
            r"rank 2 must be in .* = \[0, 2\)",
        ),
        ("batch_norm", {"num_features": 3}, pb.SyncGroup(id="g", world_size=0), "world_size must be at least 1"),
        ("batch_norm", {"num_features": 3}, pb.SyncGroup(id="bad id!", world_size=1), "sync.id"),
    ],
)
def test_bad_sync_requests_are_invalid_argument(server, client, layer_name, rng, kind, config, sync, message):
    from normserve.client import protocol

    client.create_layer(layer_name, kind, **config)
    before = _state(server.target)
    request = protocol.forward_request("Train", layer_name, rng.normal(size=(4, 3)), None).message
    request.message.sync.CopyFrom(sync)
    with pytest.raises(InvalidArgument, match=message):
        client.call("Train", request)
    assert _state(server.target) == before


def test_synced_gradient_is_for_training_mode_only(client, layer_name, rng):
    layer = client.create_layer(layer_name, "batch_norm", num_features=3)
    x = rng.normal(size=(4, 3))
    with pytest.raises(InvalidArgument, match="training-mode gradients only"):
        layer.gradient(x, x, training=False, sync=SyncGroup("g", 1, 0))


def test_async_clients_on_one_event_loop_are_ranks_too(server, client, layer_name, rng):
    import asyncio

    from normserve.client import AsyncNormClient

    client.create_layer(layer_name, "batch_norm", num_features=2)
    xs = [rng.normal(size=(n, 2)).astype(np.float32) for n in (3, 6)]

    async def rank(r: int) -> np.ndarray:
        async with AsyncNormClient(server.target) as nc:
            layer = await nc.layer(layer_name)
            return await layer.train(xs[r], sync=SyncGroup("aio", 2, r))

    async def both() -> list[np.ndarray]:
        return await asyncio.gather(rank(0), rank(1))

    whole = np.concatenate(xs)
    expected = (whole - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-5)
    np.testing.assert_allclose(np.concatenate(asyncio.run(both())), expected, rtol=1e-5, atol=1e-5)
