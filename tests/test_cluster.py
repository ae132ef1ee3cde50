"""Layer-sharded replicas behind real nginx, on loopback: routing, whole-cluster views, a crashed replica,
rebalance, and the ``normserve cluster`` and ``normserve rebalance`` commands.

Every test runs real ``normserve serve`` processes and a real nginx (tools.cluster starts them). Without
nginx they skip, saying how to get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from serverproc import NORMSERVE, patience
from test_hardening_state import stored_layers
from test_replicas import calls_about, refuses_misrouted_calls
from test_sync_batchnorm import sync_steps_match_torch

from normserve.client import AsyncNormClient, NormClient, NotFound, RetryPolicy, Unavailable
from normserve.tools import children
from normserve.tools.cluster import Cluster, free_port_block
from normserve.tools.nginx import NginxMissing, Ring, find_nginx, replicas_in_config
from normserve.tools.rebalance import rebalance
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

try:
    find_nginx()
except NginxMissing as missing:
    pytest.skip(
        f"the cluster tests run a real nginx: {missing} (.ci/run installs it when it runs as root)",
        allow_module_level=True,
    )

NO_RETRY = RetryPolicy(attempts=1)


def start_cluster(replicas: int, state_dir, port: int | None = None) -> Cluster:
    cluster = Cluster(replicas, port or free_port_block(replicas + 1), state_dir, serve_args=("--workers", "1"))
    cluster.start(timeout=patience(12))
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(3, tmp_path_factory.mktemp("cluster")) as running:
        yield running


def on_replicas(cluster: Cluster, prefix: str = "") -> dict[str, list[str]]:
    """Each replica's own layers (asked directly: no whole-cluster view)."""
    layers = {}
    for address in cluster.addresses:
        with NormClient(address) as nc:
            layers[address] = [layer.name for layer in nc.list_layers(prefix)]
    return layers


def batch(rng: np.random.Generator, shape=(8, 4)) -> np.ndarray:
    return rng.normal(1.0, 2.0, shape).astype(np.float32)


# ---------------------------------------------------------------------- routing and whole-cluster views
def test_layers_land_on_their_ring_owner_and_the_front_end_lists_them_all(cluster) -> None:
    names = [f"spread.{i}" for i in range(30)]
    with NormClient(cluster.front) as nc:
        for name in names:
            nc.create_layer(name, "batch_norm", num_features=4)
        listed = [layer.name for layer in nc.list_layers("spread.")]
        assert nc.health() == "SERVING"
    placed = on_replicas(cluster, "spread.")
    ring = Ring(cluster.addresses)
    assert sorted(n for names_there in placed.values() for n in names_there) == sorted(names)  # each once
    assert sum(bool(names_there) for names_there in placed.values()) > 1
    for address, names_there in placed.items():
        assert all(ring.owner(name) == address for name in names_there)  # tools.nginx.Ring is nginx's ring
        assert len(names_there) < len(names)
    assert listed == sorted(names)  # through the front end: every replica's layers

    result = subprocess.run(
        [NORMSERVE, "layers", "--target", cluster.front, "--prefix", "spread."], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + 30  # its header, then a row per layer
    result = subprocess.run([NORMSERVE, "health", "--target", cluster.front], capture_output=True, text=True)
    assert (result.returncode, result.stdout.split()[-1]) == (0, "SERVING")


def test_calls_through_the_proxy_equal_direct_calls_bit_for_bit(cluster, rng) -> None:
    """Two layers with the same state: one driven through nginx, one at its replica directly (Train, Infer,
    Gradient, TrainStatistics; unary, then streamed)."""
    state = {
        "weight": rng.normal(1, 0.3, 6),
        "bias": rng.normal(0, 0.3, 6),
        "running_mean": rng.normal(0, 1, 6),
        "running_var": rng.uniform(0.5, 2, 6),
    }
    ring = Ring(cluster.addresses)
    with NormClient(cluster.front) as front:
        for name in ("bits.proxy", "bits.direct"):
            front.create_layer(name, "batch_norm", num_features=6).load_state_dict(state, strict=False)
    # stream_threshold=1: every Train/Infer/Gradient of the second pass goes through the streaming RPCs
    for threshold in (1 << 30, 1):
        with (
            NormClient(cluster.front, stream_threshold=threshold) as front,
            NormClient(ring.owner("bits.direct"), stream_threshold=threshold) as direct,
        ):
            proxied, local = front.layer("bits.proxy"), direct.layer("bits.direct")
            for _ in range(2):
                x, dy = batch(rng, (16, 6, 5)), batch(rng, (16, 6, 5))
                for a, b in zip(
                    (proxied.train(x), proxied.infer(x), *proxied.gradient(x, dy)),
                    (local.train(x), local.infer(x), *local.gradient(x, dy)),
                    strict=True,
                ):
                    assert a.dtype == b.dtype
                    assert a.tobytes() == b.tobytes()
            mean, m2 = rng.normal(size=6), rng.uniform(1, 4, 6)  # statistics mode: the batch as its statistics
            a, b = proxied.train_statistics(40, mean, m2), local.train_statistics(40, mean, m2)
            assert [np.asarray(v).tobytes() for v in a] == [np.asarray(v).tobytes() for v in b]
            assert proxied.version == local.version
    with NormClient(cluster.front) as front:
        a, b = front.layer("bits.proxy").state_dict(), front.layer("bits.direct").state_dict()
    assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}


def test_a_sync_batchnorm_step_of_four_ranks_through_the_proxy_matches_torch(cluster, rng) -> None:
    sync_steps_match_torch(cluster.front, "sync.bn", rng, sizes=(3, 5, 2, 6), spatial=(2, 2))


def test_a_call_whose_routing_header_names_another_layer_is_refused_through_the_proxy(cluster, rng) -> None:
    with NormClient(cluster.front) as nc:
        nc.create_layer("route.a", "batch_norm", num_features=4)
        nc.create_layer("route.b", "batch_norm", num_features=4)
    # nginx routes the refused calls to route.b's replica, which must not act on its (absent) route.a
    refuses_misrouted_calls(cluster.front, "route.a", "route.b", codec.encode(batch(rng)))
    with NormClient(cluster.front) as nc:
        assert nc.layer("route.a").info.num_batches_tracked == 1  # the one accepted Train
        assert nc.layer("route.b").info.num_batches_tracked == 0


def test_a_layer_call_without_the_routing_header_is_refused_through_the_proxy(cluster, rng) -> None:
    """nginx sends a call without x-normserve-layer to any replica: that replica refuses it, so a CreateLayer
    cannot start a second copy of a layer on a replica that does not own it (it did, before)."""
    x = codec.encode(batch(rng))
    with grpc.insecure_channel(cluster.front) as channel:
        stub = pb_grpc.NormalizationStub(channel)
        config = pb.LayerConfig(kind=pb.BATCH_NORM, num_features=4)
        calls = {
            "CreateLayer": lambda: stub.CreateLayer(pb.CreateLayerRequest(name="headless", config=config)),
            **{method: functools.partial(call, ()) for method, call in calls_about(stub, "headless", x).items()},
        }
        for _ in range(3):  # nginx picks any replica each time: none may act
            for method, call in calls.items():
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                assert "without the x-normserve-layer header" in refused.value.details(), method
    assert not any(on_replicas(cluster, "headless").values())
    with NormClient(cluster.front) as nc:  # with the header (the Python client's), the layer lands on its owner
        nc.create_layer("headless", "batch_norm", num_features=4).train(batch(rng))
    owner = Ring(cluster.addresses).owner("headless")
    assert {address: names for address, names in on_replicas(cluster, "headless").items() if names} == {
        owner: ["headless"]
    }
    with grpc.insecure_channel(owner) as channel:  # a direct call carries no mark and needs no header
        layer = pb_grpc.NormalizationStub(channel).GetLayer(pb.GetLayerRequest(name="headless"))
    assert layer.num_batches_tracked == 1


def test_the_cluster_lists_more_than_4_mib_of_layers_a_page_at_a_time(tmp_path) -> None:
    """Issue 25, finding 4: past ~4 MiB of layers the cluster view answered UNAVAILABLE (peer channels kept
    gRPC's 4 MiB receive limit) and a replica's own list failed at send time. Now ListLayers pages (at most
    1000 layers, within one message), replicas merge their pages, and list_layers() walks them all."""
    names = {i: [f"r{i}.{j:05d}." + "n" * 240 for j in range(8000)] for i in (1, 2)}
    for i, replica_names in names.items():
        stored_layers(tmp_path / f"replica-{i}", replica_names)
    with start_cluster(2, tmp_path) as cluster:
        with grpc.insecure_channel(cluster.front) as channel:  # gRPC's default 4 MiB receive limit
            first = pb_grpc.NormalizationStub(channel).ListLayers(pb.ListLayersRequest(), timeout=patience(6))
        assert [layer.name for layer in first.layers] == names[1][:1000]
        assert first.next_page_token
        with NormClient(cluster.front, timeout=patience(6)) as nc:
            listed = nc.list_layers()
            assert [layer.name for layer in listed] == names[1] + names[2]
            assert sum(layer.info.ByteSize() for layer in listed) > 4 << 20
            assert [layer.name for layer in nc.list_layers("r2.0799")] == names[2][7990:8000]
        shown = subprocess.run(
            [NORMSERVE, "layers", "--target", cluster.front, "--timeout", "60"], capture_output=True, text=True
        )
        assert shown.returncode == 0, shown.stderr
        header, *rows = shown.stdout.splitlines()
        assert header.startswith("NAME\t")
        assert len(rows) == 16000


def test_the_asyncio_client_routes_by_layer_too(cluster, rng) -> None:
    async def work() -> list[str]:
        async with AsyncNormClient(cluster.front) as nc:
            for i in range(6):
                layer = await nc.create_layer(f"async.{i}", "batch_norm", num_features=4)
                await layer.train(batch(rng))
            return [layer.name for layer in await nc.list_layers("async.")]

    assert asyncio.run(work()) == [f"async.{i}" for i in range(6)]
    ring = Ring(cluster.addresses)
    for address, names in on_replicas(cluster, "async.").items():
        assert all(ring.owner(name) == address for name in names)


# ---------------------------------------------------------------------- a replica that crashes
def test_a_killed_replica_takes_only_its_layers_down_and_brings_them_back(cluster, rng) -> None:
    names = [f"crash.{i}" for i in range(12)]
    ring = Ring(cluster.addresses)
    victim = ring.owner(names[0])
    with NormClient(cluster.front) as nc:
        for name in names:
            nc.create_layer(name, "batch_norm", num_features=4).train(batch(rng))
        before = {name: nc.layer(name).state_dict() for name in names}
    index = cluster.addresses.index(victim) + 1
    cluster.replicas[index - 1].process.kill()
    cluster.replicas[index - 1].process.wait(patience(3))
    try:
        with NormClient(cluster.front, retry=NO_RETRY) as nc:
            for name in names:
                if ring.owner(name) == victim:
                    with pytest.raises(Unavailable):
                        nc.layer(name).infer(batch(rng))
                else:
                    nc.layer(name).train(batch(rng))  # the other replicas keep serving, Trains included
            assert nc.health() == "NOT_SERVING"  # the whole cluster's health
            with pytest.raises(Unavailable, match=re.escape(victim)):
                nc.list_layers()
    finally:
        cluster.start_replica(index)
    with NormClient(cluster.front) as nc:
        assert nc.health() == "SERVING"
        for name in names:
            if ring.owner(name) == victim:
                state = nc.layer(name).state_dict()
                assert {k: v.tobytes() for k, v in state.items()} == {k: v.tobytes() for k, v in before[name].items()}
                nc.layer(name).train(batch(rng))


# ---------------------------------------------------------------------- rebalance
def _elsewhere(cluster: Cluster, name: str) -> tuple[str, str]:
    """(the owner of layer ``name``, another replica)."""
    owner = Ring(cluster.addresses).owner(name)
    return owner, next(address for address in cluster.addresses if address != owner)


def test_rebalance_keeps_both_copies_when_they_disagree_and_finishes_an_interrupted_move(cluster, rng) -> None:
    state = {"running_mean": rng.normal(size=4), "running_var": rng.uniform(1, 2, 4), "num_batches_tracked": 3}
    for name in ("dup.conflict", "dup.interrupted"):
        owner, other = _elsewhere(cluster, name)
        with NormClient(owner) as at_owner, NormClient(other) as elsewhere:
            elsewhere.create_layer(name, "batch_norm", num_features=4).load_state_dict(state, strict=False)
            copy = at_owner.create_layer(name, "batch_norm", num_features=4)
            if name == "dup.conflict":
                copy.train(batch(rng))  # a Train of its own: the copies disagree
            else:
                copy.load_state_dict(state, strict=False)  # an earlier run copied it, then stopped before the delete
    clients = {address: NormClient(address) for address in cluster.addresses}
    try:
        moves = {move.layer: move for move in rebalance(cluster.addresses, clients, out=io.StringIO())}
    finally:
        for client in clients.values():
            client.close()
    assert set(moves) == {"dup.conflict", "dup.interrupted"}
    assert not moves["dup.conflict"].ok
    assert moves["dup.conflict"].outcome.startswith("CONFLICT")
    assert moves["dup.interrupted"].ok, moves["dup.interrupted"]
    placed = on_replicas(cluster, "dup.")
    owner, other = _elsewhere(cluster, "dup.conflict")
    assert "dup.conflict" in placed[owner]
    assert "dup.conflict" in placed[other]  # both kept
    owner, _ = _elsewhere(cluster, "dup.interrupted")
    assert [address for address, there in placed.items() if "dup.interrupted" in there] == [owner]
    with NormClient(owner) as nc:
        assert int(nc.layer("dup.interrupted").state_dict()["num_batches_tracked"]) == 3
    with NormClient(other) as nc:
        nc.delete_layer("dup.conflict")  # as a person resolving the conflict would


class _TrainsOnTheOldCopy(NormClient):
    """A client of the old owner that, right after rebalance reads the old copy's state, lets a Train land on
    it: the Train that was in flight on the old ring when the proxy changed."""

    def __init__(self, *args, layer: str, x: np.ndarray, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layer_name, self.x, self.trained = layer, x, 0

    def call(self, method, request, timeout=None):
        answer = super().call(method, request, timeout)
        if method == "GetState" and not self.trained:
            with NormClient(self.target) as other:
                other.layer(self.layer_name).train(self.x)
            self.trained += 1
        return answer


def test_a_train_that_lands_on_the_old_copy_during_the_move_is_carried_over(cluster, rng) -> None:
    _, old = _elsewhere(cluster, "late.train")
    with NormClient(old) as nc:
        nc.create_layer("late.train", "batch_norm", num_features=4).train(batch(rng))
    clients = {address: NormClient(address) for address in cluster.addresses}
    clients[old].close()
    clients[old] = _TrainsOnTheOldCopy(old, layer="late.train", x=batch(rng))
    try:
        (move,) = rebalance(cluster.addresses, clients, out=io.StringIO())
    finally:
        for client in clients.values():
            client.close()
    assert move.ok, move
    assert clients[old].trained == 1
    with NormClient(cluster.front) as nc:
        assert int(nc.layer("late.train").state_dict()["num_batches_tracked"]) == 2  # both Trains
    assert "late.train" not in on_replicas(cluster, "late.")[old]


def test_rebalance_from_3_to_4_replicas_moves_the_expected_layers_while_trains_run(tmp_path, rng) -> None:
    names = [f"move.{i}" for i in range(30)]
    port = free_port_block(5)
    with start_cluster(3, tmp_path, port) as three:
        old_ring = Ring(three.addresses)
        with NormClient(three.front) as nc:
            for name in names:
                nc.create_layer(name, "batch_norm", num_features=4).train(batch(rng))
    with start_cluster(4, tmp_path, port) as four:  # the same replicas and state, and one more
        new_ring = Ring(four.addresses)
        expected = {name for name in names if old_ring.owner(name) != new_ring.owner(name)}
        assert expected
        assert {new_ring.owner(name) for name in expected} == {four.addresses[3]}  # consistent hashing
        acknowledged = dict.fromkeys(names, 0)
        refused = [0]
        stop = threading.Event()

        def trainer(seed: int) -> None:
            local = np.random.default_rng(seed)
            with NormClient(four.front, retry=NO_RETRY) as nc:
                while not stop.is_set():
                    name = names[int(local.integers(len(names)))]
                    try:
                        nc.layer(name).train(batch(local))
                    except (NotFound, Unavailable):  # not acknowledged: the move has not reached it yet
                        refused[0] += 1
                    else:
                        acknowledged[name] += 1

        threads = [threading.Thread(target=trainer, args=(seed,)) for seed in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            moved = _normserve_rebalance("--nginx-config", str(four.nginx.config))
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(patience(6))
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert set(re.findall(r"^(move\.\d+): .* moved \(", moved.stdout, flags=re.M)) == expected
        placed = on_replicas(four, "move.")
        for address, there in placed.items():
            assert all(new_ring.owner(name) == address for name in there)
        assert sorted(n for there in placed.values() for n in there) == sorted(names)
        with NormClient(four.front) as nc:
            batches = {name: int(nc.layer(name).state_dict()["num_batches_tracked"]) for name in names}
        assert batches == {name: 1 + acknowledged[name] for name in names}  # no acknowledged Train lost
        assert sum(acknowledged.values()) > 0

        again = _normserve_rebalance("--replicas", ",".join(four.addresses))
        assert again.returncode == 0, again.stderr
        assert "0 of 0 misplaced layer(s) moved" in again.stdout


def _normserve_rebalance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NORMSERVE, "rebalance", *args], capture_output=True, text=True, timeout=patience(30))


# ---------------------------------------------------------------------- the commands
def test_the_cluster_command_serves_restarts_a_dead_replica_and_stops_cleanly(tmp_path, rng) -> None:
    port = free_port_block(3)
    (tmp_path / "replica-3").mkdir()  # left by an earlier cluster of 3
    command = [NORMSERVE, "cluster", "--replicas", "2", "--port", str(port), "--state-dir", str(tmp_path)]
    process = children.popen(  # with its replicas and nginx, it ends with the test run, however that ends
        [*command, "--workers", "1", "--startup-timeout", str(min(600, patience(12)))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = [process.stdout.readline() for _ in range(4)]
        assert lines[0].startswith(f"normserve cluster: serving on 127.0.0.1:{port}"), "".join(lines)
        pids = [int(re.search(r"pid (\d+)", line).group(1)) for line in lines[1:3]]
        assert f"{tmp_path / 'replica-3'} holds the state of a replica this cluster does not run" in lines[3]
        front = f"127.0.0.1:{port}"
        with NormClient(front) as nc:
            layers = [nc.create_layer(f"cli.{i}", "batch_norm", num_features=4) for i in range(8)]
            layers[0].train(batch(rng))
            assert len(nc.list_layers("cli.")) == 8
        victim = Ring([f"127.0.0.1:{port + 1}", f"127.0.0.1:{port + 2}"]).owner("cli.0")
        pid = pids[int(victim.rsplit(":", 1)[1]) - port - 1]
        subprocess.run(["kill", "-9", str(pid)], check=True)
        assert "exited with -9; starting it again" in process.stdout.readline()
        deadline = time.monotonic() + patience(6)
        with NormClient(front, retry=NO_RETRY) as nc:
            while True:  # back on its port, with its state
                with contextlib.suppress(Unavailable):
                    if nc.layer("cli.0").info.num_batches_tracked == 1:
                        break
                assert time.monotonic() < deadline, "the killed replica did not come back"
                time.sleep(0.2)
            assert nc.health() == "SERVING"
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30 + patience(6))
    assert process.returncode == 0, rest
    assert "stopping nginx, then the replicas" in rest
    assert not _running(pids)
    assert (tmp_path / "replica-1" / "normserve.sqlite3").exists()
    assert replicas_in_config((tmp_path / "nginx" / "nginx.conf").read_text()) == (
        f"127.0.0.1:{port + 1}",
        f"127.0.0.1:{port + 2}",
    )


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/stat") as stat:
            if stat.read().split()[2] != "Z":
                alive.append(pid)
    return alive


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--nginx", "/nonexistent/nginx"), "apt-get install nginx-light"),
        (("--peers", "127.0.0.1:1"), "--peers: the cluster sets these"),
        (("--workers", "0"), "--workers"),
        (("--replicas", "0"), "--replicas"),
        (("--replicas", "65"), "--replicas"),
        (("--port", "65535"), "--port"),
        (("--bogus",), "unrecognized arguments: --bogus"),
    ],
)
def test_the_cluster_command_refuses_bad_flags_before_starting_anything(tmp_path, args, says) -> None:
    result = subprocess.run(
        [NORMSERVE, "cluster", "--state-dir", str(tmp_path / "c"), *args],
        capture_output=True,
        text=True,
        timeout=patience(6),
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert not (tmp_path / "c").exists()


def test_rebalance_refuses_a_replica_it_cannot_reach_before_moving_anything(cluster) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    result = _normserve_rebalance("--replicas", ",".join([*cluster.addresses, nobody]), "--timeout", "2")
    assert result.returncode == 1
    assert f"{nobody} did not list its layers" in result.stderr
    assert "nothing was moved" in result.stderr


def test_ring_spreads_layers_evenly_and_moves_few_when_a_replica_joins() -> None:
    names = [f"layer.{i}" for i in range(4000)]
    three = Ring([f"10.0.0.{i}:50051" for i in range(1, 4)])
    four = Ring([f"10.0.0.{i}:50051" for i in range(1, 5)])
    counts = [sum(three.owner(n) == r for n in names) for r in three.replicas]
    assert min(counts) > len(names) / 3 * 0.7
    moved = [n for n in names if three.owner(n) != four.owner(n)]
    assert all(four.owner(n) == "10.0.0.4:50051" for n in moved)
    assert 0.15 < len(moved) / len(names) < 0.35  # about a quarter
