"""Statistics mode: tensors stay with the trainer, per-group statistics travel (TrainStatistics,
GradientStatistics), against local torch and a real server."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import clone, randomize
from serverproc import everything, patience

import normkernels as nk
from normkernels import statistics
from normserve.client import InvalidArgument, NormClient, SyncGroup
from normserve.client.torch import RemoteBatchNorm1d, convert_to_remote, settle_updates
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

TRACKED = [
    ("batch_norm", {"num_features": 4}, (6, 4, 5)),
    ("batch_norm", {"num_features": 3, "momentum": None, "affine": False}, (5, 3)),
    ("instance_norm", {"num_features": 3, "track_running_stats": True, "affine": True}, (2, 3, 7)),
    ("batch_norm", {"num_features": 2, "biased_running_var": True, "dtype": "float64"}, (4, 2, 3, 3)),
]


def _as_sent(part: nk.core.GradSums) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, m2) as a client sends them."""
    return part.count, part.moments.mean.reshape(-1), part.moments.var.reshape(-1) * part.count


# ---------------------------------------------------------------------- normkernels
@pytest.mark.parametrize(("kind", "config", "shape"), TRACKED)
def test_tracking_statistics_equals_a_training_forward(kind, config, shape, rng) -> None:
    layer = nk.make_layer(kind, **config)
    randomize(layer, rng)
    twin = clone(layer)
    x = rng.normal(1.5, 2.0, shape).astype(np.float32)
    _, want = layer.train_with_report(x)
    got = twin.track_statistics(statistics.batch_statistics(twin, x))
    for key, value in layer.state_dict().items():
        np.testing.assert_allclose(twin.state_dict()[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the report, from statistics alone


@pytest.mark.parametrize(
    ("kind", "config", "shape"),
    [
        ("group_norm", {"num_groups": 2, "num_channels": 4}, (3, 4, 5)),
        ("layer_norm", {"normalized_shape": [6]}, (4, 6)),
        ("rms_norm", {"normalized_shape": [5]}, (3, 5)),
        ("layer_norm_2d", {"num_features": 3}, (2, 3, 4)),
        *TRACKED,
    ],
)
def test_the_pieces_with_one_part_are_the_layers_forward_and_backward(kind, config, shape, rng) -> None:
    layer = nk.make_layer(kind, **config)
    randomize(layer, rng)
    x, dy = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    part = statistics.batch_statistics(layer, x)
    np.testing.assert_allclose(statistics.normalize(layer, x, part), clone(layer).forward(x), rtol=1e-5, atol=1e-6)
    sums, pending = statistics.gradient_sums(layer, x, dy)
    dx, grads = statistics.finish_backward(layer, pending, sums, nk.distributed.combine([sums]))
    want_dx, want = layer.backward(x, dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    for key, value in want.items():
        if value is not None:
            np.testing.assert_allclose(grads[key], value, rtol=1e-4, atol=1e-5)


def test_statistics_that_do_not_fit_are_refused_and_change_nothing(rng) -> None:
    layer = nk.BatchNorm(3)
    randomize(layer, rng)
    before = layer.state_dict()
    good = statistics.batch_statistics(layer, rng.normal(size=(5, 3)))

    def with_(count=good.count, mean=good.moments.mean, var=good.moments.var):
        return nk.core.GradSums(count, nk.Moments(np.asarray(mean), np.asarray(var)), None, None)

    for bad, error in (
        (with_(mean=np.zeros(6), var=np.ones(6)), "one mean and one m2 per channel"),
        (with_(mean=np.zeros(3), var=np.ones(2)), "got 3 means and 2 m2"),
        (with_(mean=[0.0, np.nan, 0.0]), "NaN"),
        (with_(var=[1.0, -1.0, 1.0]), "negative"),
        (with_(count=1), "more than 1 value per channel"),
    ):
        with pytest.raises(nk.NormError, match=error):
            layer.track_statistics(bad)
    with pytest.raises(nk.ConfigError, match="keeps no running statistics"):
        nk.InstanceNorm(3).track_statistics(good)
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)


# ---------------------------------------------------------------------- the service
def test_train_statistics_updates_the_server_as_train_does(client, layer_name, rng) -> None:
    by_tensors = client.create_layer(layer_name + "t", "batch_norm", num_features=4, momentum=0.2)
    by_statistics = client.create_layer(layer_name + "s", "batch_norm", num_features=4, momentum=0.2)
    local = nk.BatchNorm(4, momentum=0.2)
    for step in range(3):
        x = rng.normal(step, 2.0, (8, 4, 3)).astype(np.float32)
        weight = rng.normal(1.0, 0.2, 4).astype(np.float32)
        by_tensors.train(x, parameters={"weight": weight})
        result = by_statistics.train_statistics(
            *_as_sent(statistics.batch_statistics(local, x)), parameters={"weight": weight}
        )
        assert result.count == 24
        assert result.version == by_tensors.version == step + 2
        np.testing.assert_allclose(result.mean, x.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(result.var, x.var(axis=(0, 2)), rtol=1e-5)
    want, got = by_tensors.state_dict(), by_statistics.state_dict()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(result.running_var, want["running_var"], rtol=1e-6)
    stats_t, stats_s = by_tensors.refresh().stats, by_statistics.refresh().stats
    assert stats_s.train_calls == 3
    for field in ("mean_shift", "log_var_shift", "input_entropy", "output_entropy"):
        assert getattr(stats_s, field) == pytest.approx(getattr(stats_t, field), rel=1e-4), field


def test_bad_statistics_requests_are_refused_with_a_clear_error_and_change_nothing(server, client, layer_name) -> None:
    bn = client.create_layer(layer_name, "batch_norm", num_features=2)
    client.create_layer(layer_name + "ln", "layer_norm", normalized_shape=[2])
    stub = pb_grpc.NormalizationStub(client._channel)
    before = everything(stub)
    good = pb.BatchStatistics(count=4, mean=[0.5, 1.0], m2=[2.0, 3.0])
    cases = [
        (pb.TrainStatisticsRequest(layer=layer_name), "statistics is required"),
        (pb.TrainStatisticsRequest(layer=layer_name, statistics=pb.BatchStatistics(mean=[0, 0], m2=[1, 1])), "count"),
        (
            pb.TrainStatisticsRequest(layer=layer_name, statistics=pb.BatchStatistics(count=4, mean=[0], m2=[1, 1])),
            "one mean and one m2",
        ),
        (
            pb.TrainStatisticsRequest(
                layer=layer_name, statistics=pb.BatchStatistics(count=4, mean=[0, 0, 0], m2=[1, 1, 1])
            ),
            "per channel",
        ),
        (
            pb.TrainStatisticsRequest(
                layer=layer_name, statistics=pb.BatchStatistics(count=4, mean=[0, float("nan")], m2=[1, 1])
            ),
            "NaN",
        ),
        (
            pb.TrainStatisticsRequest(
                layer=layer_name, statistics=pb.BatchStatistics(count=4, mean=[0, 0], m2=[1, -1])
            ),
            "negative",
        ),
        (
            pb.TrainStatisticsRequest(layer=layer_name, statistics=pb.BatchStatistics(count=1, mean=[0, 0], m2=[0, 0])),
            "more than 1 value",
        ),
        (pb.TrainStatisticsRequest(layer=layer_name + "ln", statistics=good), "keeps no running statistics"),
        (pb.TrainStatisticsRequest(layer="bad name!", statistics=good), "not a valid layer name"),
        (pb.GradientStatisticsRequest(layer=layer_name, count=4, sum_dy=[1, 2], sum_dy_xmu=[1, 2]), "sync is required"),
        (
            pb.GradientStatisticsRequest(
                layer=layer_name, count=4, sum_dy=[1], sum_dy_xmu=[1], sync=pb.SyncGroup(id="g", world_size=1)
            ),
            "one entry per channel",
        ),
        (
            pb.GradientStatisticsRequest(
                layer=layer_name + "ln",
                count=4,
                sum_dy=[1, 2],
                sum_dy_xmu=[1, 2],
                sync=pb.SyncGroup(id="g", world_size=1),
            ),
            "only batch norm",
        ),
    ]
    for request, message in cases:
        method = type(request).__name__.removesuffix("Request")
        with pytest.raises(InvalidArgument, match=message):
            client.call(method, request)
    assert everything(stub) == before
    assert bn.refresh().stats.train_calls == 0


def _ranks(target: str, world: int, work):
    def run(rank: int):
        with NormClient(target, timeout=patience(3)) as nc:
            return work(nc, rank)

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(run, range(world)))


def test_a_step_of_ranks_mixing_train_and_train_statistics_combines_them(server, client, layer_name, rng) -> None:
    client.create_layer(layer_name, "batch_norm", num_features=3)
    xs = [rng.normal(1.0, 2.0, (n, 3, 4)).astype(np.float32) for n in (2, 5, 1)]
    group = SyncGroup(layer_name, world_size=3, rank=0)

    def work(nc: NormClient, rank: int):
        layer, sync = nc.layer(layer_name), SyncGroup(group.id, 3, rank).at(1)
        if rank == 1:
            return layer.train(xs[rank], sync=sync)
        sent = _as_sent(statistics.batch_statistics(nk.BatchNorm(3), xs[rank]))
        return layer.train_statistics(*sent, sync=sync)

    answers = _ranks(server.target, 3, work)
    whole = np.concatenate(xs)
    local = nk.BatchNorm(3)
    np.testing.assert_allclose(answers[1], local.forward(whole)[2:7], rtol=1e-5, atol=1e-5)
    for rank in (0, 2):
        assert answers[rank].count == whole.size // 3
        np.testing.assert_allclose(answers[rank].mean, whole.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(answers[rank].var, whole.var(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(client.layer(layer_name).state_dict()["running_var"], local.running_var, rtol=1e-6)


# ---------------------------------------------------------------------- torch modules
def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.BatchNorm1d(32, momentum=None),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 10),
        torch.nn.RMSNorm(10),
    )


@pytest.mark.parametrize(("make", "shape"), [(_cnn, (16, 3, 8, 8)), (_mlp, (32, 12))])
def test_fifty_sgd_steps_in_statistics_mode_match_local_torch(client, layer_name, make, shape) -> None:
    torch.manual_seed(0)
    local = make()
    remote = convert_to_remote(copy.deepcopy(local), client, prefix=layer_name + ".", mode="statistics")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
    data = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, target = torch.randn(shape, generator=data), torch.randint(0, 10, (shape[0],), generator=data)
        losses = []
        for model, optimizer in zip((local, remote), optimizers, strict=True):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    want = local.state_dict()
    got = remote.state_dict()  # also brings the locally stepped parameters to the server
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)
    for name, module in remote.named_modules():
        if hasattr(module, "remote"):
            for key, value in module.remote.state_dict().items():
                np.testing.assert_allclose(value, want[f"{name}.{key}"].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    local.eval(), remote.eval()
    x = torch.randn(shape, generator=data)
    torch.testing.assert_close(remote(x), local(x), rtol=1e-5, atol=1e-5)


def test_eval_and_kinds_without_running_statistics_make_no_call(start_server) -> None:
    proc = start_server()
    with NormClient(proc.target, timeout=patience(1)) as nc:
        model = convert_to_remote(_mlp(), nc, prefix="offline.", mode="statistics")
        model(torch.randn(8, 12)).sum().backward()  # trains: one update of the batch norm, sent behind the step
        settle_updates(model)  # ... and stored, before the server goes
        proc.kill()  # from here on, no server
        model.eval()
        assert torch.isfinite(model(torch.randn(4, 12))).all()
        norm = model[4]
        norm.train()
        norm(torch.randn(4, 16)).sum().backward()  # a layer norm training step: local
        assert norm.weight.grad is not None


@pytest.mark.parametrize("sizes", [(6,), (3, 5), (1, 4, 2), (2, 3, 1, 5)])
def test_sync_batch_norm_in_statistics_mode_matches_torch_on_the_whole_batch(server, client, layer_name, sizes) -> None:
    channels, world = 3, len(sizes)
    torch.manual_seed(len(sizes))
    twin = torch.nn.BatchNorm1d(channels, momentum=0.3)
    with torch.no_grad():
        twin.weight.normal_(1.0, 0.3), twin.bias.normal_(0.0, 0.3)
    group = SyncGroup(layer_name, world_size=world, rank=0)
    for step in range(2):
        xs = [torch.randn(n, channels, 4) * 2 + step for n in sizes]
        dys = [torch.randn(n, channels, 4) for n in sizes]

        def work(nc: NormClient, rank: int, xs=xs, dys=dys, step=step):
            module = RemoteBatchNorm1d(
                channels,
                momentum=0.3,
                client=nc,
                name=layer_name,
                mode="statistics",
                sync_group=SyncGroup(group.id, world, rank),
            )
            module.sync_step = step
            with torch.no_grad():
                module.weight.copy_(twin.weight), module.bias.copy_(twin.bias)
            x = xs[rank].clone().requires_grad_()
            y = module(x)
            y.backward(dys[rank])
            return y.detach(), x.grad, module.weight.grad, module.bias.grad, module.running_var.clone()

        if step == 0:
            client.create_layer(layer_name, "batch_norm", num_features=channels, momentum=0.3)
            client.layer(layer_name).load_state_dict(
                {"weight": twin.weight.detach(), "bias": twin.bias.detach()}, strict=False
            )
        answers = _ranks(server.target, world, work)
        x = torch.cat(xs).requires_grad_()
        y = twin(x)
        y.backward(torch.cat(dys))
        torch.testing.assert_close(torch.cat([a[0] for a in answers]), y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([a[1] for a in answers]), x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sum(a[2] for a in answers), twin.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sum(a[3] for a in answers), twin.bias.grad, rtol=1e-4, atol=1e-5)
        for answer in answers:
            torch.testing.assert_close(answer[4], twin.running_var, rtol=1e-5, atol=1e-6)
        twin.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_batch_norm_without_running_statistics_in_statistics_mode(server, client, layer_name, dtype) -> None:
    """Untracked batch norm still shares its batch statistics (as torch's SyncBatchNorm); float64 stays float64."""
    channels, sizes = 3, (4, 2)
    twin = torch.nn.BatchNorm1d(channels, track_running_stats=False, dtype=dtype)
    torch.manual_seed(7)
    xs = [torch.randn(n, channels, 5, dtype=dtype) * 3 + 1 for n in sizes]
    dys = [torch.randn(n, channels, 5, dtype=dtype) for n in sizes]
    group = SyncGroup(layer_name, world_size=len(sizes), rank=0)

    def work(nc: NormClient, rank: int):
        module = RemoteBatchNorm1d(
            channels,
            track_running_stats=False,
            dtype=dtype,
            client=nc,
            name=layer_name,
            mode="statistics",
            sync_group=SyncGroup(group.id, len(sizes), rank),
        )
        x = xs[rank].clone().requires_grad_()
        y = module(x)
        y.backward(dys[rank])
        return y.detach(), x.grad

    answers = _ranks(server.target, len(sizes), work)
    x = torch.cat(xs).requires_grad_()
    y = twin(x)
    y.backward(torch.cat(dys))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([a[0] for a in answers]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([a[1] for a in answers]), x.grad, **tol)


def test_a_synchronized_backward_without_input_gradients_makes_no_call(server, client, layer_name) -> None:
    """Frozen inputs (no dx wanted): like SyncBatchNorm, no rank combines backward sums, and none waits."""
    group = SyncGroup(layer_name, world_size=2, rank=0)
    xs = [torch.randn(3, 2, 4), torch.randn(5, 2, 4)]

    def work(nc: NormClient, rank: int):
        module = RemoteBatchNorm1d(
            2, client=nc, name=layer_name, mode="statistics", sync_group=SyncGroup(group.id, 2, rank)
        )
        module(xs[rank]).square().sum().backward()
        return module.weight.grad.clone()

    grads = _ranks(server.target, 2, work)
    twin = torch.nn.BatchNorm1d(2)
    twin(torch.cat(xs)).square().sum().backward()
    torch.testing.assert_close(grads[0] + grads[1], twin.weight.grad, rtol=1e-4, atol=1e-5)


def test_counts_beyond_any_batch_are_refused(client, layer_name) -> None:
    bn = client.create_layer(layer_name, "batch_norm", num_features=2)
    with pytest.raises(InvalidArgument, match=r"in \[1, 2\*\*40\]"):
        bn.train_statistics(2**41, [0.0, 0.0], [1.0, 1.0])
    assert bn.refresh().version == 1


@pytest.mark.parametrize("mode", ["tensors", "statistics"])
def test_a_sync_group_given_to_a_whole_model_applies_to_its_batch_norms(client, layer_name, mode) -> None:
    group = SyncGroup(f"{layer_name}-{mode}", world_size=1, rank=0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.LayerNorm(6))
    remote = convert_to_remote(model, client, prefix=f"{layer_name}.{mode}.", mode=mode, sync_group=group)
    assert remote[1].sync_group == group
    assert remote[2].sync_group is None
    remote(torch.randn(5, 4)).sum().backward()  # the layer norm trains as ever; the batch norm in the group
    assert remote[1].sync_step == 1
