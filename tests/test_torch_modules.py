"""normserve.client.torch: remote modules against their torch twins, on the real server."""

from __future__ import annotations

import copy
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from normserve.client import NormClient, SyncGroup
from normserve.client import torch as remote

CASES = [
    (remote.RemoteBatchNorm1d, (4,), {}, (6, 4)),
    (remote.RemoteBatchNorm1d, (4,), {"momentum": None}, (5, 4, 3)),
    (remote.RemoteBatchNorm2d, (3,), {"eps": 1e-3}, (4, 3, 2, 5)),
    (remote.RemoteBatchNorm3d, (2,), {"track_running_stats": False}, (2, 2, 3, 2, 2)),
    (remote.RemoteInstanceNorm1d, (3,), {"affine": True, "track_running_stats": True}, (4, 3, 6)),
    (remote.RemoteInstanceNorm2d, (3,), {}, (3, 4, 4)),  # unbatched (C, H, W)
    (remote.RemoteInstanceNorm3d, (2,), {"affine": True}, (2, 2, 3, 3, 2)),
    (remote.RemoteGroupNorm, (2, 6), {}, (3, 6, 4)),
    (remote.RemoteLayerNorm, ([3, 4],), {}, (5, 3, 4)),
    (remote.RemoteLayerNorm, (4,), {"bias": False}, (2, 3, 4)),
    (remote.RemoteRMSNorm, (5,), {}, (4, 5)),
    (remote.RemoteRMSNorm, (5,), {"eps": 1e-4, "elementwise_affine": False}, (4, 5)),
]


def _randomize(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if key == "running_var":
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif tensor.is_floating_point():
                tensor.normal_(0.2, 0.7, generator=generator)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("cls", "args", "kwargs", "shape"), CASES, ids=lambda c: getattr(c, "__name__", None))
def test_remote_modules_match_their_torch_twins(client, layer_name, rng, cls, args, kwargs, shape):
    local = cls.torch_class(*args, **kwargs)
    _randomize(local, 1)
    module = cls.from_torch(local, client, layer_name)
    twin = cls.torch_class(*args, **kwargs)
    twin.load_state_dict(copy.deepcopy(local.state_dict()))
    assert list(module.state_dict()) == list(twin.state_dict())
    assert repr(module).startswith(f"{cls.__name__}({twin.extra_repr()}")

    for training in (True, True, False):
        module.train(training)
        twin.train(training)
        x = torch.tensor(rng.normal(0.5, 2.0, shape), dtype=torch.float32)
        x_remote, x_local = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_remote, y_local = module(x_remote), twin(x_local)
        _close(y_remote, y_local)
        dy = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
        y_remote.backward(dy)
        y_local.backward(dy)
        _close(x_remote.grad, x_local.grad)
        for (key, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
            _close(p.grad, q.grad)
            p.grad = q.grad = None
            assert key in ("weight", "bias")
        for key, value in twin.state_dict().items():
            _close(module.state_dict()[key], value)
    # The server holds what the module shows.
    for key, value in module.remote.state_dict().items():
        np.testing.assert_allclose(value, module.state_dict()[key].numpy(), rtol=1e-6)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.GroupNorm(2, 6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.BatchNorm1d(32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.LayerNorm(32),
        nn.Tanh(),
        nn.Linear(32, 16),
        nn.RMSNorm(16),
        nn.Linear(16, 10),
    )


@pytest.mark.parametrize(("build", "shape"), [(_cnn, (16, 1, 8, 8)), (_mlp, (32, 12))], ids=["cnn", "mlp"])
def test_training_with_remote_layers_follows_local_training(client, layer_name, build, shape):
    torch.manual_seed(0)
    local = build()
    converted = remote.convert_to_remote(copy.deepcopy(local), client, prefix=layer_name + ".")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for m in converted.modules())
    data = torch.Generator().manual_seed(1)
    teacher = torch.randn(int(np.prod(shape[1:])), 10, generator=data)  # a learnable labelling
    steps = []
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, converted)]
    # 40 steps: two float32 implementations agree to ~1e-7 a step (each layer's y, dx and dweight against
    # torch's), but training is chaotic: once a ReLU input lies within rounding of 0 the trajectories part.
    for step in range(40):
        x = torch.randn(shape, generator=data)
        target = (x.flatten(1) @ teacher).argmax(1)
        losses = []
        for model, optimizer in zip((local, converted), optimizers, strict=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        steps.append(losses)
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), f"step {step}"
    assert steps[-1][0] < steps[0][0]  # it learned something
    back = remote.convert_to_local(converted)
    assert type(back[1]) is type(local[1])
    for key, value in local.state_dict().items():
        np.testing.assert_allclose(back.state_dict()[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-5, err_msg=key)
    local.eval()
    back.eval()
    x = torch.randn(shape, generator=data)
    _close(back(x), local(x), 1e-4)


class _Calls:
    """Counts the RPCs a client makes (the real client and server; only counted)."""

    def __init__(self, client: NormClient) -> None:
        self.counts: Counter[str] = Counter()
        self.trains_with_parameters = 0
        call = client.call

        def counted(method: str, request, timeout=None):
            self.counts[method] += 1
            message = getattr(request, "message", request)
            self.trains_with_parameters += method == "Train" and len(message.parameters) > 0
            return call(method, request, timeout)

        client.call = counted


def test_a_training_step_costs_one_train_and_one_gradient(client, layer_name, rng):
    module = remote.RemoteBatchNorm1d(8, client=client, name=layer_name)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    calls = _Calls(client)
    for _ in range(5):
        optimizer.zero_grad()
        y = module(torch.tensor(rng.normal(size=(16, 8)), dtype=torch.float32))
        y.pow(3).sum().backward()
        optimizer.step()
    assert calls.counts == {"Train": 5, "Gradient": 5}
    assert calls.trains_with_parameters == 4  # each step after the first carries the optimizer's update
    server = module.remote.state_dict()
    assert not np.array_equal(server["weight"], module.weight.detach().numpy())  # the last step is not sent yet
    module.eval()
    with torch.no_grad():
        module(torch.ones(2, 8))
        module(torch.ones(2, 8))
    expected = {"Train": 5, "Gradient": 5, "GetState": 1, "SetState": 1, "Infer": 2}
    assert calls.counts == expected  # the parameters went once (SetState), then not again
    np.testing.assert_array_equal(module.remote.state_dict()["weight"], module.weight.detach().numpy())


def test_load_state_dict_writes_the_server_and_a_new_module_reads_it(client, layer_name):
    module = remote.RemoteBatchNorm2d(3, client=client, name=layer_name)
    state = {k: v.clone() for k, v in nn.BatchNorm2d(3).state_dict().items()}
    _randomize_state = {"weight": [1.5, 0.5, 2.0], "bias": [0.1, -0.2, 0.3], "running_mean": [1.0, 2.0, 3.0]}
    for key, value in _randomize_state.items():
        state[key] = torch.tensor(value)
    state["num_batches_tracked"] = torch.tensor(7)
    module.load_state_dict(state)
    on_server = module.remote.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(on_server[key], value.numpy())
    again = remote.RemoteBatchNorm2d(3, client=client, name=layer_name)  # an existing layer: its state wins
    for key, value in state.items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_sync_group_modules_on_threads_equal_batch_norm_over_the_whole_batch(server, layer_name, rng):
    sizes, channels = (5, 2, 9), 4
    local = nn.BatchNorm1d(channels)
    steps = [[torch.tensor(rng.normal(1, 2, (n, channels)), dtype=torch.float32) for n in sizes] for _ in range(3)]

    def rank(r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with NormClient(server.target) as nc:
            module = remote.RemoteBatchNorm1d(
                channels, client=nc, name=layer_name, sync_group=SyncGroup("job", len(sizes), r)
            )
            out = []
            for xs in steps:
                x = xs[r].clone().requires_grad_()
                module(x).pow(3).sum().backward()
                out.append((x.grad, module.weight.grad.clone()))
                module.weight.grad = None
            return out

    with ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(rank, range(len(sizes))))
    for step, xs in enumerate(steps):
        x = torch.cat(xs).requires_grad_()
        local.weight.grad = None
        local(x).pow(3).sum().backward()
        _close(torch.cat([results[r][step][0] for r in range(len(sizes))]), x.grad, 1e-4)
        _close(sum(results[r][step][1] for r in range(len(sizes))), local.weight.grad, 1e-4)
    with NormClient(server.target) as nc:
        state = nc.layer(layer_name).state_dict()
    np.testing.assert_allclose(state["running_var"], local.running_var.numpy(), rtol=1e-5)
    assert int(state["num_batches_tracked"]) == 3


def test_unsupported_configs_say_so(client, layer_name):
    with pytest.raises(ValueError, match="bias=False is not supported"):
        remote.RemoteBatchNorm1d(3, bias=False, client=client, name=layer_name)
    with pytest.raises(ValueError, match="float32 or float64"):
        remote.RemoteLayerNorm(3, dtype=torch.float16, client=client, name=layer_name)
    with pytest.raises(ValueError, match="leaves it no name"):
        remote.convert_to_remote(nn.BatchNorm1d(3), client, prefix="")
    unnamed = [remote.convert_to_remote(nn.BatchNorm1d(3), client) for _ in range(2)]  # new names, no collision
    assert unnamed[0].layer_name.startswith("BatchNorm1d-")
    assert unnamed[0].layer_name != unnamed[1].layer_name
    lone = remote.convert_to_remote(nn.BatchNorm1d(3), client, prefix=layer_name)
    assert isinstance(lone, remote.RemoteBatchNorm1d)
    assert lone.layer_name == layer_name


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)])
def test_half_and_double_inputs_come_back_in_their_dtype(client, layer_name, rng, dtype, tol):
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    module = remote.RemoteLayerNorm(6, client=client, name=layer_name, dtype=parameter_dtype)
    twin = nn.LayerNorm(6, dtype=parameter_dtype)
    x = torch.tensor(rng.normal(size=(4, 6))).to(dtype).requires_grad_()
    y = module(x)
    assert y.dtype == dtype
    expected = twin(x.detach().to(parameter_dtype))
    _close(y.to(torch.float64), expected.to(torch.float64), tol)
    y.sum().backward()
    assert x.grad.dtype == dtype
    assert module.weight.grad.dtype == parameter_dtype


def test_forwards_the_server_cannot_keep_are_sent_again_by_the_backward(start_server, rng):
    """--forward-cache-bytes 3500: a 2 KB input is never kept, and of two 512 B ones the first is evicted (a kept
    forward counts its message, the layer's 256 B of state and 2 KiB of records)."""
    proc = start_server("--forward-cache-bytes", "3500")
    local = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.BatchNorm1d(16))
    with NormClient(proc.target) as nc:
        model = remote.convert_to_remote(copy.deepcopy(local), nc, prefix="m.")
        calls = _Calls(nc)
        for batch in (8, 32):  # x of each layer: 512 B, then 2 KB
            x = torch.tensor(rng.normal(size=(batch, 16)), dtype=torch.float32)
            for net in (local, model):
                net.zero_grad()
                net(x).pow(3).sum().backward()
            for p, q in zip(model.parameters(), local.parameters(), strict=True):
                _close(p.grad, q.grad, 1e-4)
        assert calls.counts["Train"] == 2 + 4  # the 2 KB Trains were refused (keep_forward) and sent again
        assert calls.counts["Gradient"] == 4 + 1  # the evicted 512 B forward: sent again with x


def test_converting_onto_a_trained_server_layer_is_an_explicit_choice(client, layer_name):
    """A rerun script's fresh model must not silently replace (or silently take) a trained layer's state."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    trained = remote.convert_to_remote(copy.deepcopy(model), client, prefix=layer_name + ".")
    for _ in range(3):
        trained(torch.randn(8, 4)).sum().backward()
    server_before = client.layer(layer_name + ".1").state_dict()
    assert int(server_before["num_batches_tracked"]) == 3

    with pytest.raises(remote.ExistingLayerError, match=r"running_mean.*existing='adopt'"):
        remote.convert_to_remote(copy.deepcopy(model), client, prefix=layer_name + ".")
    after = client.layer(layer_name + ".1").state_dict()
    for key, value in server_before.items():
        np.testing.assert_array_equal(after[key], value)

    replica = copy.deepcopy(model)  # the trained state, as a data-parallel replica converting it would hold
    replica[1].load_state_dict({key: torch.as_tensor(value) for key, value in server_before.items()})
    same = remote.convert_to_remote(replica, client, prefix=layer_name + ".")
    assert int(same[1].num_batches_tracked) == 3  # equal states never conflict

    resumed = remote.convert_to_remote(copy.deepcopy(model), client, prefix=layer_name + ".", existing="adopt")
    assert int(resumed[1].num_batches_tracked) == 3
    np.testing.assert_array_equal(resumed[1].running_mean.numpy(), server_before["running_mean"])

    remote.convert_to_remote(copy.deepcopy(model), client, prefix=layer_name + ".", existing="overwrite")
    assert int(client.layer(layer_name + ".1").state_dict()["num_batches_tracked"]) == 0
    with pytest.raises(ValueError, match="existing must be one of"):
        remote.convert_to_remote(copy.deepcopy(model), client, prefix=layer_name + ".", existing="merge")
