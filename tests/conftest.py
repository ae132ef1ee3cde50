"""Shared test helpers: PyTorch twins of our layers, a float64 reference, random data."""

from __future__ import annotations

import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import normkernels as nk
from normkernels import compiled, core


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests cleanly when CuPy or a CUDA device is missing."""
    if nk.cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def torch_twin(layer: nk.NormLayer, rank: int):
    """The torch.nn module with the same config (and dtype) as ``layer``, for inputs of ``rank``."""
    import torch

    cfg = dict(layer.config)
    dtype = getattr(torch, cfg.pop("dtype"))
    cfg.pop("device")
    cfg.pop("biased_running_var", None)
    if layer.kind in ("batch_norm", "instance_norm"):
        spatial = rank - 2
        if layer.kind == "batch_norm":
            cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
        else:
            cls = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}
        module = cls[spatial](**cfg, dtype=dtype)
    elif layer.kind == "layer_norm_2d":
        module = _channels_first_layer_norm(cfg.pop("num_features"), **cfg, dtype=dtype)
    else:
        cls = {"group_norm": torch.nn.GroupNorm, "layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}
        module = cls[layer.kind](**cfg, dtype=dtype)
    return module


def _channels_first_layer_norm(*args: Any, **kwargs: Any):
    """timm's LayerNorm2d: torch.nn.LayerNorm over the channels of a channels-first input."""
    import torch

    class ChannelsFirstLayerNorm(torch.nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)

    return ChannelsFirstLayerNorm(*args, **kwargs)


def randomize(layer: nk.NormLayer, rng: np.random.Generator) -> None:
    """Give a layer random parameters and running statistics (never the init values)."""
    state = {}
    for key, value in layer.state_dict().items():
        if key == "num_batches_tracked":
            state[key] = np.asarray(int(rng.integers(0, 5)), dtype=np.int64)
        elif key == "running_var":
            state[key] = rng.uniform(0.5, 2.0, value.shape)
        else:
            state[key] = rng.normal(0.3, 0.8, value.shape)
    layer.load_state_dict(state)


def input_shape(layer: nk.NormLayer, batch: int, spatial: tuple[int, ...], lead: tuple[int, ...] = ()):
    """An input shape for ``layer``: (N, C, *spatial) or (*lead, *normalized_shape)."""
    if hasattr(layer, "normalized_shape"):
        return (*lead, *layer.normalized_shape)
    return (batch, layer.num_features, *spatial)


def reference_forward(layer: nk.NormLayer, x: np.ndarray, training: bool) -> np.ndarray:
    """Textbook float64 formulas, independent of normkernels.core."""
    eps = _eps(layer, x)  # of the input's compute dtype: taken before x becomes float64
    x = x.astype(np.float64)
    kind = layer.kind
    if kind in ("layer_norm", "rms_norm"):
        axes = tuple(range(x.ndim - len(layer.normalized_shape), x.ndim))
        w = 1.0 if layer.weight is None else layer.weight.astype(np.float64)
        b = 0.0 if layer.bias is None else layer.bias.astype(np.float64)
        if kind == "rms_norm":
            return x / np.sqrt(np.mean(x**2, axis=axes, keepdims=True) + eps) * w
        mean = x.mean(axis=axes, keepdims=True)
        return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps) * w + b
    n, c = x.shape[:2]
    bshape = (1, c) + (1,) * (x.ndim - 2)
    if kind == "layer_norm_2d":
        w = 1.0 if layer.weight is None else layer.weight.astype(np.float64).reshape(bshape)
        b = 0.0 if layer.bias is None else layer.bias.astype(np.float64).reshape(bshape)
        mean = x.mean(axis=1, keepdims=True)
        return (x - mean) / np.sqrt(x.var(axis=1, keepdims=True) + eps) * w + b
    w = 1.0 if layer.weight is None else layer.weight.astype(np.float64).reshape(bshape)
    b = 0.0 if layer.bias is None else layer.bias.astype(np.float64).reshape(bshape)
    if not training and layer.track_running_stats:
        mean = layer.running_mean.astype(np.float64).reshape(bshape)
        var = layer.running_var.astype(np.float64).reshape(bshape)
        return (x - mean) / np.sqrt(var + eps) * w + b
    if kind == "group_norm":
        g = layer.num_groups
        xg = x.reshape(n, g, -1)
        xhat = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
        return xhat.reshape(x.shape) * w + b
    axes = (0, *range(2, x.ndim)) if kind == "batch_norm" else tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps) * w + b


def clone(layer: nk.NormLayer) -> nk.NormLayer:
    """An independent copy with the same config and state."""
    twin = nk.make_layer(layer.kind, **layer.config)
    twin.load_state_dict(layer.state_dict())
    return twin


def snapshot(layer: nk.NormLayer) -> dict[str, bytes]:
    """The layer's state as bytes, for exact before/after comparisons."""
    out = {k: np.asarray(v).tobytes() + str(np.asarray(v).dtype).encode() for k, v in layer.state_dict().items()}
    out["__config__"] = repr(layer.config).encode()
    return out


def _groups(layer: nk.NormLayer, a: np.ndarray) -> np.ndarray:
    """Rows of the elements the layer normalizes together."""
    if layer.kind == "batch_norm":
        return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
    if layer.kind == "instance_norm":
        return a.reshape(a.shape[0] * a.shape[1], -1)
    if layer.kind == "group_norm":
        return a.reshape(a.shape[0] * layer.num_groups, -1)
    if layer.kind == "layer_norm_2d":
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    return a.reshape(-1, math.prod(layer.normalized_shape))


def _eps(layer: nk.NormLayer, x: np.ndarray) -> float:
    """The layer's eps; None (RMSNorm) is the machine epsilon of the compute dtype, as in PyTorch."""
    return layer.eps if layer.eps is not None else float(np.finfo(np.promote_types(x.dtype, np.float32)).eps)


def _entropy(layer: nk.NormLayer, a: np.ndarray) -> float:
    rows = _groups(layer, a.astype(np.float64))
    second = (rows**2).mean(axis=1) if layer.kind == "rms_norm" else rows.var(axis=1)
    return float(np.mean(0.5 * np.log(2 * np.pi * np.e * (second + _eps(layer, a)))))


def _folded_batch_stats(layer: nk.NormLayer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance as PyTorch folds them into running statistics."""
    ddof = 0 if layer.biased_running_var else 1
    x = x.astype(np.float64)
    if layer.kind == "batch_norm":
        rows = _groups(layer, x)
        return rows.mean(axis=1), rows.var(axis=1, ddof=ddof)
    per_instance = x.reshape(x.shape[0], x.shape[1], -1)
    return per_instance.mean(axis=2).mean(axis=0), per_instance.var(axis=2, ddof=ddof).mean(axis=0)


def reference_report(layer: nk.NormLayer, x: np.ndarray, y: np.ndarray, prior: dict) -> dict[str, float]:
    """normkernels.monitor's numbers from their definitions, in float64; ``prior``: the state before the batch."""
    report = {"input_entropy": _entropy(layer, x), "output_entropy": _entropy(layer, y)}
    if layer.track_running_stats:
        mean_b, var_b = _folded_batch_stats(layer, x)
        run_var = np.asarray(prior["running_var"], np.float64) + layer.eps
        report["mean_shift"] = float(np.mean(np.abs(mean_b - prior["running_mean"]) / np.sqrt(run_var)))
        report["log_var_shift"] = float(np.mean(np.abs(np.log((var_b + layer.eps) / run_var))))
    return report


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels() -> None:
    """Compile (or load) the CPU kernels once, first: the servers the tests start then load them from the cache."""
    compiled.warm_up()


@pytest.fixture(params=["numba", "numpy"])
def cpu_math(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a kernel test on both CPU paths: the compiled kernels and the NumPy core (NORMKERNELS_CPU)."""
    monkeypatch.setenv("NORMKERNELS_CPU", request.param)
    assert compiled.backend() is (compiled if request.param == "numba" else core)  # numba is a dependency
    return request.param


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's name: random, yet reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------- the real server
@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One ``normserve serve`` subprocess shared by the service tests (each test uses its own layer names)."""
    from serverproc import ServerProcess

    proc = ServerProcess(tmp_path_factory.mktemp("shared") / "state").start()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def client(server):
    from serverproc import patience

    from normserve.client import NormClient

    with NormClient(server.target, timeout=patience(6)) as nc:
        yield nc


@pytest.fixture
def layer_name(request: pytest.FixtureRequest) -> str:
    """A layer name unique to the test (valid under the service's name rule)."""
    return "t" + format(zlib.crc32(request.node.nodeid.encode()), "08x")


@pytest.fixture
def start_server(tmp_path):
    """Start servers of the test's own (on ``tmp_path/state`` by default); stops them afterwards."""
    from serverproc import ServerProcess

    started = []

    def start(*args: str, state_dir=None):
        proc = ServerProcess(state_dir or tmp_path / "state", *args).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.kill()


#: The cross-language test's Node.js client and its npm packages (`make test` installs them when node exists).
NODE_CLIENT = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node() -> tuple[str, dict[str, str]]:
    """(the ``node`` executable, an environment whose ``require`` finds tests/node's npm packages); skips
    the test, saying why, on a machine without Node.js or without those packages."""
    executable = shutil.which("node")
    if executable is None:
        pytest.skip("node is not installed: the cross-language (Node.js client) tests need Node.js 18+ and npm")
    modules = NODE_CLIENT / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"the Node.js client's npm packages are missing: run `make node-deps` (npm ci in {NODE_CLIENT})")
    return executable, {**os.environ, "NODE_PATH": str(modules)}


def stored(values: np.ndarray, storage: str) -> np.ndarray:
    """``values`` in a storage dtype: float16/32/64, or bfloat16 as its uint16 bit pattern (as on a device)."""
    if storage == "bfloat16":
        return values.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return values.astype(np.dtype(storage.split("-")[0]))


def stored_values(a: np.ndarray) -> np.ndarray:
    """What a stored array holds, in float64."""
    return a.view(ml_dtypes.bfloat16).astype(np.float64) if a.dtype == np.uint16 else a.astype(np.float64)


def core_float64(layer: nk.NormLayer, plan: nk.Plan, x: np.ndarray, dy: np.ndarray, training: bool):
    """core's float64 math on the values the kernels see."""
    xv, dyv = stored_values(x).reshape(plan.view), stored_values(dy).reshape(plan.view)
    f64 = np.dtype(np.float64)
    weight, bias = layer._params(plan, f64)
    eps = layer._eps_for(f64)
    if training:
        y, stats = nk.forward_train(xv, plan, weight, bias, eps, f64)
        grads = nk.backward(xv, dyv, plan, weight, eps, f64)
    else:
        running = layer._running_moments(plan)
        stats = nk.Moments(running.mean.astype(f64), running.var.astype(f64))
        y = nk.forward_eval(xv, plan, stats, weight, bias, eps, f64)
        grads = nk.backward(xv, dyv, plan, weight, eps, f64, stats)
    return y, stats, grads
