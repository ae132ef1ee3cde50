"""Statistics mode's updates off the training step's critical path (normserve.client.statistics_pipeline).

On the real server: a training step never waits for it (a stopped server does not stop training), an update
counts only once stored, a refused or unanswered update raises at its module's next interaction naming the
step with the layer unchanged, what is in flight is bounded, state reads and closing wait, and a kill -9 in
the middle of a window loses nothing that was acknowledged.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading

import grpc
import numpy as np
import pytest
import torch
from serverproc import patience, wait_for

from normserve.client import NormClient
from normserve.client.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from normserve.client.torch import RemoteBatchNorm1d, RemoteInstanceNorm1d, convert_to_remote
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb


def _paused(proc):
    """A context in which the server process is stopped (SIGSTOP): it takes connections, answers nothing."""

    class Paused:
        def __enter__(self):
            os.kill(proc.process.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            if proc.process.poll() is None:
                os.kill(proc.process.pid, signal.SIGCONT)

    return Paused()


def _step(module: torch.nn.Module, x: torch.Tensor) -> None:
    module(x).square().sum().backward()


def _batches(count: int, shape=(16, 6), seed: int = 0) -> list[torch.Tensor]:
    data = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=data) * (1 + i % 3) + i for i in range(count)]


def _replayed(batches: list[torch.Tensor], **config) -> torch.nn.BatchNorm1d:
    """torch's own batch norm after training forwards on ``batches``."""
    twin = torch.nn.BatchNorm1d(batches[0].shape[1], **config)
    for x in batches:
        twin(x)
    return twin


def test_a_training_step_does_not_wait_for_the_server(start_server) -> None:
    proc = start_server()
    with NormClient(proc.target, timeout=patience(6)) as nc:
        bn = RemoteBatchNorm1d(6, client=nc, name="bn", mode="statistics")
        batches = _batches(4)
        _step(bn, batches[0])
        bn.settle_updates()  # the stream is open
        with _paused(proc):
            for x in batches[1:]:  # the server answers nothing: the steps go on regardless
                _step(bn, x)
            assert nc._statistics_pipeline().in_flight == 3
            with pytest.raises(DeadlineExceeded, match="still in flight"):
                nc._statistics_pipeline().wait(timeout=0.2)
        state = bn.state_dict()  # waits for the three, then reads
        want = _replayed(batches).state_dict()
        for key, value in want.items():
            torch.testing.assert_close(state[key], value, msg=key)
        assert bn.remote.state_dict()["num_batches_tracked"] == 4


def test_a_refused_update_raises_at_the_next_forward_naming_its_step_and_the_layer_is_unchanged(client, layer_name):
    bn = RemoteBatchNorm1d(6, client=client, name=layer_name, mode="statistics")
    good, bad = _batches(2)
    _step(bn, good)
    bn.settle_updates()
    before = bn.remote.state_dict()
    bad[3, 2] = float("nan")
    _step(bn, bad)  # step 1: its statistics hold a NaN, which the server refuses
    client._statistics_pipeline().wait()  # its answer is in (a forward never waits for one)
    with pytest.raises(InvalidArgument, match=r"training step\(s\) 1 were refused: .*NaN") as refused:
        _step(bn, good)
    assert refused.value.steps == (1,)
    assert refused.value.layer == layer_name
    after = bn.remote.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    # The module's running statistics are the server's again (not the NaN of its local update).
    torch.testing.assert_close(bn.running_mean, torch.as_tensor(before["running_mean"]))
    assert int(bn.num_batches_tracked) == 1
    _step(bn, good)  # and training goes on
    assert bn.state_dict()["num_batches_tracked"] == 2


def test_updates_of_a_deleted_layer_raise_not_found_at_the_next_state_read(client, layer_name) -> None:
    bn = RemoteBatchNorm1d(6, client=client, name=layer_name, mode="statistics")
    _step(bn, _batches(1)[0])
    bn.settle_updates()
    client.delete_layer(layer_name)
    _step(bn, _batches(1)[0])
    with pytest.raises(NotFound, match=r"step\(s\) 1 were refused") as refused:
        bn.state_dict()
    assert refused.value.steps == (1,)


def test_what_is_in_flight_is_bounded(start_server) -> None:
    proc = start_server()
    with NormClient(proc.target, timeout=patience(6)) as nc:
        pipeline = nc._statistics_pipeline()
        pipeline.max_in_flight = 3
        bn = RemoteBatchNorm1d(6, client=nc, name="bn", mode="statistics")
        _step(bn, _batches(1)[0])
        bn.settle_updates()
        with _paused(proc):
            for x in _batches(3, seed=1):
                _step(bn, x)
            nc.timeout = 0.3  # the next forward waits for room that never comes: refused, nothing queued
            with pytest.raises(DeadlineExceeded, match=r"step 4 of layer 'bn' waited .* this one was not sent"):
                _step(bn, _batches(1)[0])
            assert pipeline.in_flight == 3
            nc.timeout = patience(6)
        bn.settle_updates()
        assert bn.remote.state_dict()["num_batches_tracked"] == 4  # step 4 was never sent


def test_closing_the_client_waits_for_the_updates_in_flight(start_server) -> None:
    proc = start_server()
    batches = _batches(5)
    nc = NormClient(proc.target, timeout=patience(6))
    bn = RemoteBatchNorm1d(6, client=nc, name="bn", mode="statistics")
    _step(bn, batches[0])
    bn.settle_updates()
    with _paused(proc):
        for x in batches[1:]:
            _step(bn, x)
        threading.Timer(0.5, lambda: os.kill(proc.process.pid, signal.SIGCONT)).start()
        nc.close()  # returns once the server (resumed) stored all four
    with NormClient(proc.target, timeout=patience(6)) as reader:
        state = reader.layer("bn").state_dict()
    assert state["num_batches_tracked"] == 5
    np.testing.assert_allclose(state["running_var"], _replayed(batches).running_var.numpy(), rtol=1e-6)


def test_a_server_killed_mid_window_loses_nothing_acknowledged(start_server, tmp_path) -> None:
    proc = start_server()
    batches = _batches(400, seed=3)
    with NormClient(proc.target, timeout=patience(6)) as nc:
        bn = RemoteBatchNorm1d(6, client=nc, name="bn", mode="statistics", momentum=0.2)
        pipeline = nc._statistics_pipeline()
        taken = 0
        for taken, x in enumerate(batches, 1):
            _step(bn, x)
            if taken == 100:
                assert wait_for(lambda: pipeline.in_flight == 0, patience(6))
            if taken >= 120 and pipeline.in_flight >= 3:
                proc.kill()  # kill -9 with updates sent and unanswered
                break
        assert proc.process.poll() is not None, "the server was never killed with updates in flight"
        with pytest.raises(Unavailable, match="were not acknowledged") as lost:
            bn.state_dict()
    unacknowledged = lost.value.steps
    assert unacknowledged
    assert list(unacknowledged) == list(range(unacknowledged[0], taken))
    acknowledged = taken - len(unacknowledged)
    proc.start()
    with NormClient(proc.target, timeout=patience(6)) as nc:
        state = nc.layer("bn").state_dict()
    stored = int(state["num_batches_tracked"])
    assert acknowledged <= stored <= taken  # an update may be stored and its answer lost with the server
    want = _replayed(batches[:stored], momentum=0.2)
    np.testing.assert_allclose(state["running_mean"], want.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["running_var"], want.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_updates_still_in_flight_at_exit_are_stored(start_server, tmp_path) -> None:
    proc = start_server()
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch
            from normserve.client import NormClient
            from normserve.client.torch import RemoteBatchNorm1d
            nc = NormClient({proc.target!r})
            bn = RemoteBatchNorm1d(6, client=nc, name="exit", mode="statistics")
            for _ in range(30):
                bn(torch.randn(16, 6)).sum().backward()
            # no close, no state read: the interpreter exits with updates in flight
            """
        )
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=patience(30))
    with NormClient(proc.target, timeout=patience(6)) as nc:
        assert nc.layer("exit").state_dict()["num_batches_tracked"] == 30


def test_a_whole_model_sends_its_layers_updates_together(client, layer_name) -> None:
    local = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.BatchNorm1d(8, momentum=None),
        torch.nn.Unflatten(1, (2, 4)),
        torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
    )
    remote = convert_to_remote(copy.deepcopy(local), client, prefix=layer_name + ".", mode="statistics")
    for x in _batches(20):
        for model in (local, remote):
            model(x).square().mean().backward()
    got, want = remote.state_dict(), local.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert client.layer(layer_name + ".4").state_dict()["num_batches_tracked"] == 20


def _update(layer: str, step: int, groups: int, **overrides) -> pb.StatisticsUpdate:
    rng = np.random.default_rng(step)
    fields = {
        "layer": layer,
        "step": step,
        "count": 8,
        "mean": codec.encode(rng.normal(size=groups)),
        "m2": codec.encode(rng.uniform(1, 2, size=groups)),
        **overrides,
    }
    return pb.StatisticsUpdate(**fields)


def _push(client: NormClient, *messages: pb.PushStatisticsRequest) -> list[pb.PushStatisticsResponse]:
    return list(client._rpc("PushStatistics")(iter(messages), timeout=patience(6)))


def test_each_update_of_a_message_is_stored_or_refused_on_its_own(client, layer_name) -> None:
    client.create_layer(layer_name, "batch_norm", num_features=3)
    bad_mean = codec.encode(np.zeros(3, np.float32))
    updates = [
        _update(layer_name, 0, 3),
        _update(layer_name, 1, 3, mean=bad_mean),  # float32: refused
        _update("nowhere", 2, 3),  # no such layer
        _update(layer_name, 3, 4),  # four groups for three channels
        _update(layer_name, 4, 3, count=0),
        _update(layer_name, 5, 3),  # the layer's second update of the message, after its first
    ]
    (answer,) = _push(client, pb.PushStatisticsRequest(sequence=1, updates=updates))
    codes = [outcome.code for outcome in answer.outcomes]
    assert answer.sequence == 1
    assert codes == [0, 3, 5, 3, 3, 0], [o.message for o in answer.outcomes]
    assert "FLOAT64" in answer.outcomes[1].message
    assert answer.outcomes[2].reason == "LAYER_NOT_FOUND"
    first, last = answer.outcomes[0], answer.outcomes[5]
    assert (first.num_batches_tracked, last.num_batches_tracked) == (1, 2)
    assert last.version == first.version + 1
    state = client.layer(layer_name).state_dict()
    np.testing.assert_array_equal(state["running_var"], codec.decode(last.running_var))


def test_a_stream_numbered_wrongly_is_ended_with_nothing_of_it_applied(client, layer_name) -> None:
    client.create_layer(layer_name, "batch_norm", num_features=3)
    messages = [pb.PushStatisticsRequest(sequence=s, updates=[_update(layer_name, s, 3)]) for s in (1, 3)]
    with pytest.raises(grpc.RpcError) as ended:
        _push(client, *messages)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 3 of the stream, expected 2" in ended.value.details()
    assert client.layer(layer_name).info.num_batches_tracked == 1


def test_a_message_over_the_update_cap_is_refused(client, layer_name) -> None:
    from normserve.server.servicer import MAX_UPDATES_PER_MESSAGE

    client.create_layer(layer_name, "batch_norm", num_features=1)
    updates = [_update(layer_name, s, 1) for s in range(MAX_UPDATES_PER_MESSAGE + 2)]
    (answer,) = _push(client, pb.PushStatisticsRequest(sequence=1, updates=updates))
    assert [o.code for o in answer.outcomes[-2:]] == [3, 3]
    assert "at most" in answer.outcomes[-1].message
    assert client.layer(layer_name).info.num_batches_tracked == MAX_UPDATES_PER_MESSAGE


def test_instance_norm_tracks_in_statistics_mode_as_torch(client, layer_name) -> None:
    torch.manual_seed(0)
    local = torch.nn.InstanceNorm1d(4, affine=True, track_running_stats=True, momentum=0.3)
    remote = RemoteInstanceNorm1d.from_torch(copy.deepcopy(local), client, layer_name, mode="statistics")
    for x in _batches(6, shape=(5, 4, 7)):
        for module in (local, remote):
            module(x).sum().backward()
    for key, value in local.state_dict().items():
        torch.testing.assert_close(remote.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
