"""Converted models in real training jobs, on the real server: torchrun and DDP, kill and resume, torch.compile,
copies (EMA, SWA, torch.save), sync groups that cannot meet, and the client's Python surface."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchrun_job
from serverproc import patience
from torch import nn

from normserve.client import Aborted, DeadlineExceeded, InvalidArgument, NormClient, NormServeError, SyncGroup
from normserve.client import torch as remote

JOB = Path(__file__).with_name("torchrun_job.py")


# ---------------------------------------------------------------------- torchrun
def _ends_with_parent() -> None:
    """In the child before it runs: SIGTERM when this process (pytest) ends, however it ends (Linux's
    PR_SET_PDEATHSIG); torchrun then stops its workers, and they stop holding when torchrun is gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _torchrun(target: str, out: Path, prefix: str, *extra: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2`` of the job, in a session of its own (the test kills it whole)."""
    out.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(JOB), "--target", target, "--out", str(out), "--prefix", prefix, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parent)}
    with (out / "torchrun.log").open("a") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_ends_with_parent
        )


def _kill(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(patience(3))


def _finish(job: subprocess.Popen, out: Path) -> dict:
    try:
        assert job.wait(patience(24)) == 0, (out / "torchrun.log").read_text()[-4000:]
    finally:
        _kill(job)
    return json.loads((out / "result.json").read_text())


def _single_process_reference(steps: int) -> dict:
    """The job's training with torch's own batch norm, one process, each step's whole batch."""
    model = torchrun_job.resnet()
    optimizer = torchrun_job.optimizer(model)
    losses = []
    for step in range(steps):
        x, target = torchrun_job.batch(step, 2)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.tolist() for k, v in model.state_dict().items()}}


def _assert_same_training(result: dict, expected: dict, rtol: float) -> None:
    """``result``'s models (each mode's) trained as ``expected``'s (one, or one per mode): losses and state."""
    for mode in remote.MODES:
        losses, state = expected["losses"], expected["state"]
        if isinstance(losses, dict):
            losses, state = losses[mode], state[mode]
        np.testing.assert_allclose(result["losses"][mode], losses, rtol=rtol, err_msg=mode)
        for key, value in state.items():
            np.testing.assert_allclose(result["state"][mode][key], value, rtol=rtol, atol=rtol, err_msg=f"{mode} {key}")


def test_torchrun_ddp_job_matches_one_process_and_resumes_after_a_kill(server, tmp_path, layer_name):
    """Two gloo ranks, DDP with its defaults, both modes, synchronized batch norms: the same training as one
    process on the whole batch; killed in the middle of a step and run again with the same command, it
    continues from its checkpoint to the same result."""
    steps = 4
    whole = _torchrun(server.target, tmp_path / "whole", layer_name + "-whole", "--steps", str(steps))
    hold = tmp_path / "hold"
    hold.write_text("2")  # steps 0 and 1 checkpointed, step 2's forward run: the server is past the checkpoint
    killed_out = tmp_path / "killed"
    command = ("--steps", str(steps), "--hold-file", str(hold))
    killed = _torchrun(server.target, killed_out, layer_name + "-killed", *command)
    try:
        reference = _single_process_reference(steps)
        uninterrupted = _finish(whole, tmp_path / "whole")
        _assert_same_training(uninterrupted, reference, rtol=2e-4)
        # The ranks desynchronized on purpose (rank 0: one more forward) failed at once, then realigned.
        assert "wait at different steps" in uninterrupted["desynchronized"]
        assert "rank 0 at training forward step 2" in uninterrupted["desynchronized"]

        deadline = time.monotonic() + patience(24)
        holding = [killed_out / f"holding.{rank}" for rank in range(2)]
        while not all(path.exists() for path in holding):
            assert killed.poll() is None, (killed_out / "torchrun.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the job never reached step 2"
            time.sleep(0.1)
        for path in holding:  # the workers, killed in the middle of step 2, then torchrun
            os.kill(int(path.read_text()), signal.SIGKILL)
    finally:
        _kill(killed)
    assert torch.load(killed_out / "checkpoint.pt")["step"] == 2
    assert not (killed_out / "result.json").exists()

    hold.unlink()
    resumed = _finish(_torchrun(server.target, killed_out, layer_name + "-killed", *command), killed_out)
    _assert_same_training(resumed, uninterrupted, rtol=1e-5)
    with NormClient(server.target) as nc:  # the server's layers hold what the resumed models hold
        state = nc.layer(f"{layer_name}-killed.statistics.1").state_dict()
        np.testing.assert_allclose(state["running_var"], resumed["state"]["statistics"]["1.running_var"], rtol=1e-6)
        assert int(state["num_batches_tracked"]) == steps


# ---------------------------------------------------------------------- torch.compile
def _small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5), nn.LayerNorm(5)
    )


@pytest.mark.parametrize("mode", remote.MODES)
def test_torch_compile_gives_eager_numbers(client, layer_name, mode, rng):
    eager = remote.convert_to_remote(_small_model(1), client, prefix=f"{layer_name}.{mode}.e.", mode=mode)
    compiled_model = remote.convert_to_remote(_small_model(1), client, prefix=f"{layer_name}.{mode}.c.", mode=mode)
    compiled = torch.compile(compiled_model, backend="aot_eager")  # Dynamo and AOT autograd: the graph breaks
    xs = [torch.tensor(rng.normal(0.5, 2.0, (6, 3, 4, 4)), dtype=torch.float32) for _ in range(3)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for x in xs:
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for model in (eager, compiled):
        model.eval()
    y_eager, y_compiled = eager(xs[0]), compiled(xs[0])
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for (key, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    assert client.layer(f"{layer_name}.{mode}.c.1").info.num_batches_tracked == len(xs)


# ---------------------------------------------------------------------- copies
def test_ema_swa_and_deepcopy_copies_never_change_the_original_layer(client, layer_name, rng):
    model = remote.convert_to_remote(_small_model(2), client, prefix=layer_name + ".", mode="statistics")
    swa = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema = copy.deepcopy(model).eval()  # timm's ModelEmaV2
    assert type(ema[1]) is nn.BatchNorm2d  # a torch twin, computing locally
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.tensor(rng.normal(size=(5, 3, 4, 4)), dtype=torch.float32)).square().mean().backward()
        optimizer.step()
        swa.update_parameters(model)
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
                e.mul_(0.9).add_(m, alpha=0.1) if e.is_floating_point() else e.copy_(m)
    layer = client.layer(layer_name + ".1")
    before = (layer.refresh().version, layer.state_dict())
    x = torch.tensor(rng.normal(size=(4, 3, 4, 4)), dtype=torch.float32)
    swa.train()
    swa(x)  # a training forward of the copy: its own statistics, locally
    ema(x)
    after = (layer.refresh().version, layer.state_dict())
    assert after[0] == before[0]
    for key, value in before[1].items():
        np.testing.assert_array_equal(after[1][key], value)
    np.testing.assert_allclose(after[1]["weight"], model[1].weight.detach().numpy())
    assert not torch.equal(ema[1].weight, model[1].weight)  # the copy keeps its own, averaged parameters


def test_torch_save_and_load_of_a_converted_model_round_trip(client, layer_name, rng):
    model = remote.convert_to_remote(_small_model(3), client, prefix=layer_name + ".")
    model(torch.tensor(rng.normal(size=(5, 3, 4, 4)), dtype=torch.float32))  # a Train: the server's statistics
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(loaded[i]) for i in (1, 5)] == [nn.BatchNorm2d, nn.LayerNorm]  # the torch twins
    for (key, value), again in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(again, value, msg=key)
    model.eval()
    loaded.eval()
    x = torch.tensor(rng.normal(size=(2, 3, 4, 4)), dtype=torch.float32)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # Reconnecting is converting again: to the same layers (existing="adopt" or "overwrite"), or new ones.
    again = remote.convert_to_remote(loaded, client, prefix=layer_name + ".", existing="adopt")
    assert again[1].layer_name == layer_name + ".1"
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- sync groups that cannot meet
def _ranks(target: str, work, world_size: int) -> list:
    def run(rank: int):
        with NormClient(target, timeout=patience(6)) as nc:
            try:
                return work(nc, rank)
            except NormServeError as error:
                return error

    with ThreadPoolExecutor(world_size) as pool:
        return list(pool.map(run, range(world_size)))


def _steps(model: nn.Module, x: torch.Tensor, count: int) -> None:
    for _ in range(count):
        model(x.requires_grad_()).sum().backward()


def test_a_desynchronized_rank_fails_fast_naming_the_ranks_and_realigns(server, layer_name, rng):
    """Rank 0 runs one extra training forward: every rank then waits at a step the others are not at. The server
    fails those steps at once (not after --sync-timeout), naming each rank's step; realigned, training goes on."""
    xs = [torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32) for _ in range(2)]

    def work(nc: NormClient, rank: int):
        group = SyncGroup(layer_name, 2, rank)
        model = nn.Sequential(
            remote.RemoteBatchNorm1d(3, client=nc, name=f"{layer_name}.a", sync_group=group),
            remote.RemoteBatchNorm1d(3, client=nc, name=f"{layer_name}.b", sync_group=group),
        )
        model(xs[rank].requires_grad_()).sum().backward()  # step 0: together
        if rank == 0:
            with torch.no_grad():
                model(xs[rank])  # a "validation" pass in train mode: meets rank 1's step 1 training forward
        start = time.monotonic()
        with pytest.raises(Aborted) as failure:
            _steps(model, xs[rank], 3)
        waited = time.monotonic() - start
        for module in model:  # what realign_sync_steps does over a process group
            module.sync_step = 5
        model(xs[rank].requires_grad_()).sum().backward()
        return waited, failure.value.details

    results = _ranks(server.target, work, 2)
    for waited, details in results:
        assert waited < patience(1), waited  # at once (Aborted): the server's --sync-timeout is 60 s
        assert "wait at different steps, so none can complete" in details
        assert "rank 0 at training forward step 2 on layer" in details
        assert "rank 1 at gradient step 1" in details
        assert "realign_sync_steps" in details


def test_ranks_with_different_group_ids_fail_at_once_naming_both(server, client, layer_name, rng):
    client.create_layer(layer_name, "batch_norm", num_features=3)

    def work(nc: NormClient, rank: int):
        start = time.monotonic()
        try:
            nc.layer(layer_name).train(rng.normal(size=(4, 3)), sync=SyncGroup(f"own-id-{rank}", 2, rank))
        except Aborted as error:
            return time.monotonic() - start, error.details

    for waited, details in _ranks(server.target, work, 2):  # Aborted at once, not after the --sync-timeout
        assert waited < patience(1)
        assert "gave different sync group ids" in details
        assert "rank(s) 0 with 'own-id-0'" in details
        assert "rank(s) 1 with 'own-id-1'" in details


def test_a_sync_timeout_explanation_reaches_the_client_before_its_deadline(start_server, rng):
    """The server's --sync-timeout equals the client's timeout (60 s by default, 3 s times the slowdown here): the
    server answers shortly before the client's deadline, with the missing ranks named, not a bare DEADLINE_EXCEEDED."""
    seconds = round(patience(0.3), 1)
    quick = start_server("--sync-timeout", str(seconds))
    with NormClient(quick.target, timeout=seconds) as nc:
        layer = nc.create_layer("bn", "batch_norm", num_features=3)
        with pytest.raises(DeadlineExceeded, match=r"rank\(s\) 1 \(1 of 2\) did not arrive before rank 0's call"):
            layer.train(rng.normal(size=(4, 3)), sync=SyncGroup("job", 2, 0))


# ---------------------------------------------------------------------- the client's Python surface
def test_client_side_checks_raise_normserve_errors(client, layer_name, rng):
    with pytest.raises(InvalidArgument, match="rank 3 must be in"):
        SyncGroup("g", 2, 3)
    with pytest.raises(InvalidArgument, match="cannot go on the wire"):
        client.create_layer(layer_name, "batch_norm", num_features=3).train(rng.integers(0, 9, (2, 3), np.int32))
    with pytest.raises(InvalidArgument) as unknown:
        client.create_layer(layer_name + "x", "batch_norm", num_feature=3)
    assert isinstance(unknown.value, TypeError)  # as Python's own unknown keyword is
    with pytest.raises(InvalidArgument, match="mode must be one of"):
        remote.RemoteBatchNorm1d(3, client=client, name=layer_name, mode="fast")
    with pytest.raises(InvalidArgument, match=r"needs torch\.distributed initialized"):
        remote.convert_to_remote(_small_model(4), client, process_group="world")
    remote.convert_to_remote(nn.BatchNorm1d(3), client, prefix=layer_name + ".refused")
    trained = nn.BatchNorm1d(3)
    trained.running_mean.fill_(2.0)
    with pytest.raises(NormServeError, match="already has a history"):
        remote.convert_to_remote(trained, client, prefix=layer_name + ".refused")


def test_layers_describe_themselves_as_python_values(client, layer_name):
    layer = client.create_layer(layer_name, "batch_norm", num_features=3, momentum=None)
    assert layer.config == {
        "kind": "batch_norm",
        "num_features": 3,
        "eps": 1e-5,
        "momentum": None,
        "affine": True,
        "track_running_stats": True,
        "biased_running_var": False,
        "dtype": "float32",
        "device": "cpu",
    }
    layer.train(np.random.default_rng(0).normal(size=(4, 3)))
    info = layer.refresh()
    assert (info.name, info.kind, info.version, info.num_batches_tracked) == (layer_name, "batch_norm", 2, 1)
    assert info.config == layer.config
    assert info.param_shape == (3,)
    assert client.create_layer(layer_name + "r", "rms_norm", normalized_shape=[2, 4]).config["normalized_shape"] == (
        2,
        4,
    )


def test_ranks_training_several_layers_at_once_are_not_taken_for_desynchronized(server, client, layer_name, rng):
    """A rank may train two synchronized layers at once (asyncio, threads): rank 0 reaching layer a while rank 1
    reaches layer b is every rank waiting, each at a step the other is not at, yet both steps complete once the
    other calls arrive. Only different step numbers are a desync (a false one failed all four calls)."""
    names = [f"{layer_name}.a", f"{layer_name}.b"]
    for name in names:
        client.create_layer(name, "batch_norm", num_features=3)
    xs = {(rank, name): rng.normal(size=(4, 3)).astype(np.float32) for rank in range(2) for name in names}
    order = ((0, names[0]), (1, names[1]), (0, names[1]), (1, names[0]))
    clients = [NormClient(server.target, timeout=60) for _ in range(2)]
    try:
        with ThreadPoolExecutor(4) as pool:
            calls = []
            for rank, name in order:
                group = SyncGroup(layer_name, 2, rank)
                calls.append(pool.submit(clients[rank].layer(name).train, xs[rank, name], sync=group.at(0)))
                time.sleep(0.5)  # this order: the first two calls wait at different layers' steps
            outputs = [call.result() for call in calls]
    finally:
        for nc in clients:
            nc.close()
    for (rank, name), y in zip(order, outputs, strict=True):
        both = np.concatenate([xs[0, name], xs[1, name]])  # synchronized: the statistics of both ranks' batches
        expected = (xs[rank, name] - both.mean(0)) / np.sqrt(both.var(0) + 1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
